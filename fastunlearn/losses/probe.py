"""Diagnostics of the loss engine: which tensors a piece of code allocates, and how long each
phase of the chunk driver takes. Used by the tests and by benchmarks/bench_loss.py."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(tree) -> set:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"}


class AllocationRecorder(TorchDispatchMode):
    """Records every op run while active: ``calls`` holds (op name, shapes of its newly
    allocated outputs) and ``outputs`` (op name, shape) of every output, allocated or written
    in place. An output sharing storage with an input (in-place and out= ops) is not an
    allocation. The fused ops (namespace ``fastunlearn``) are entered, so the ops inside their
    CPU implementation are recorded too.

    Example:
        >>> with AllocationRecorder() as rec:
        ...     out.loss.backward()
        >>> rec.big_allocations(V * H)
    """

    def __init__(self, parent: AllocationRecorder | None = None):
        super().__init__()
        self.calls = [] if parent is None else parent.calls
        self.outputs = [] if parent is None else parent.outputs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = _storages((args, kwargs))
        if func.namespace == "fastunlearn":
            cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tree_flatten(args)[0])
            key = torch._C.DispatchKey.CUDA if cuda else torch._C.DispatchKey.CPU
            with AllocationRecorder(parent=self):  # the op's own kernel, still recorded
                out = func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        self.calls.append((name, [tuple(o.shape) for o in outs
                                  if o.untyped_storage().data_ptr() not in before]))
        self.outputs += [(name, tuple(o.shape)) for o in outs]
        return out

    def big_allocations(self, numel: int) -> list:
        """(op, shape) of every allocation of ``numel`` elements or more. ``set_`` is left out:
        the Triton interpreter's byte copies of kernel arguments (no device buffer)."""
        return [(f, s) for f, shapes in self.calls for s in shapes
                if torch.Size(s).numel() >= numel and f != "set_"]

    def gemms_with_output(self, shape: tuple) -> list:
        """GEMMs that wrote an output of ``shape`` (allocated or out=), e.g. dW's (V, H)."""
        gemms = ("mm", "addmm", "addmm_", "bmm", "matmul", "mkldnn_matmul")
        return [(f, s) for f, s in self.outputs if f in gemms and s == tuple(shape)]


class PhaseTimes:
    """Milliseconds per phase of the chunk driver (logits, ref_logits, row_pass, dx, dw,
    glue), summed over chunks. CUDA phases are timed with events, CPU ones with the clock."""

    def __init__(self):
        self._marks = []

    def mark(self, name: str, device: torch.device) -> None:
        """Close the phase that ends now (``name``), starting at the previous mark."""
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append((name, ev))
        else:
            self._marks.append((name, time.perf_counter()))

    def totals(self) -> dict[str, float]:
        out = defaultdict(float)
        for (_, a), (name, b) in zip(self._marks, self._marks[1:]):
            if isinstance(a, float):
                out[name] += (b - a) * 1000
            else:
                b.synchronize()
                out[name] += a.elapsed_time(b)
        return dict(out)


_ACTIVE: PhaseTimes | None = None


def active_phases() -> PhaseTimes | None:
    return _ACTIVE


@contextmanager
def record_phases():
    """Time the chunk driver's phases of every loss call inside the block.

    Example:
        >>> with record_phases() as phases:
        ...     unlearn_loss(..., backend="triton").loss.backward()
        >>> phases.totals()   # {"logits": ..., "row_pass": ..., "dw": ..., ...}
    """
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, PhaseTimes()
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous
