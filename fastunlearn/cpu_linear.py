"""oneDNN GEMMs for the ``nn.Linear`` layers of a model on CPU, in fp32.

Why: torch's CPU wheel runs fp32 matmuls through MKL, which takes a slower code path on AMD
processors; the oneDNN copy inside libtorch uses the CPU's AVX-512 units. On the 2-core AMD EPYC
CI machine the trunk's GEMMs of SmolLM2-135M run 2.2-3x faster through oneDNN, with fp32
results (no bf16 rounding). The C++ extension of the ``cpp`` loss backend already reaches
oneDNN's matmul (``gemm``); this module routes the forward and backward of every ``nn.Linear``
through it.

``use_onednn_linears(model)`` swaps the forward of each ``nn.Linear`` instance (peft's LoRA
base layers included); state dicts, saving and deep copies are unaffected. A swapped layer falls
back to ``F.linear`` for anything but fp32 CPU tensors outside autocast.
"""
from __future__ import annotations

import functools
import statistics
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

from .log import get_logger

MODES = ("auto", "onednn", "torch")
# What a layer runs per step: the forward GEMM only (a frozen reference under no_grad), the
# forward and dX (a frozen layer that gradients pass through: LoRA base layers), or all three.
GEMMS = ("forward", "forward+dx", "forward+dx+dw")
_FASTER: dict[tuple[int, int, int, str], bool] = {}  # (in, out, rows, gemms) -> oneDNN wins


@functools.cache  # called on every linear forward / backward; a failed build is not cached
def _ext():
    from .losses import cpp_backend

    return cpp_backend.load()


def _gemm(a: torch.Tensor, b: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = torch.empty(rows, cols, dtype=torch.float32)
    _ext().gemm(a, b, out, 0.0)
    return out


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN fp32 GEMMs; dX = dY W, dW = dY^T X, db = colsum(dY)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = _gemm(x2, weight.t(), x2.shape[0], weight.shape[0])
        if bias is not None:
            y += bias
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _gemm(g2, weight, g2.shape[0], weight.shape[1]).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = _gemm(g2.t(), x2, weight.shape[0], weight.shape[1])
        if ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0
            and self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        return _OneDnnLinear.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


# Work per timing call is capped so that vocabulary-sized heads do not make ``auto`` slow.
_TIMING_FLOP_BUDGET = 2e9
_TIMING_ROUNDS = 7


def median_ratio(first, second, rounds: int) -> float:
    """Median over interleaved rounds of time(first) / time(second), the order alternating.

    Why paired rounds: on a shared machine a burst of other load during one library's timing
    would decide for the other one; each round compares the two under the same load, and the
    median ignores the rounds that a burst hit anyway."""
    first(), second()  # warm-up: oneDNN primitive creation, first-touch of the outputs
    ratios = []
    for i in range(rounds):
        times = {}
        for name, fn in ((("a", first), ("b", second)) if i % 2 == 0
                         else (("b", second), ("a", first))):
            start = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - start
        ratios.append(times["a"] / max(times["b"], 1e-9))
    return statistics.median(ratios)


def onednn_is_faster(in_features: int, out_features: int, rows: int = 256,
                     gemms: str = "forward+dx+dw") -> bool:
    """Whether oneDNN runs this layer's GEMMs faster than torch's (once per shape and use).

    Times what the layer runs for a (rows, in) input: the forward ``x W^T`` and, as ``gemms``
    says, the backward GEMMs ``dX = dY W`` and ``dW = dY^T X``, in each library; their sum
    decides. A single forward shape is not enough: the backward GEMMs have other layouts, and
    on some CPUs the libraries rank differently on them. The two libraries are timed in
    alternating rounds and the median ratio decides (see ``median_ratio``).
    """
    if gemms not in GEMMS:
        raise ValueError(f"gemms must be one of {', '.join(GEMMS)}, got {gemms!r}")
    flop_rows = int(_TIMING_FLOP_BUDGET / (2 * in_features * out_features))
    rows = max(16, min(rows, flop_rows))
    key = (in_features, out_features, rows, gemms)
    if key not in _FASTER:
        ext = _ext()
        if ext.gemm_engine() != "onednn":
            _FASTER[key] = False
            return False
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, in_features, generator=g)
        w = torch.randn(out_features, in_features, generator=g)
        dy = torch.randn(rows, out_features, generator=g)
        y = torch.empty(rows, out_features)
        dx = torch.empty(rows, in_features)
        dw = torch.empty(out_features, in_features)
        need_dx, need_dw = "dx" in gemms, "dw" in gemms

        def onednn():
            ext.gemm(x, w.t(), y, 0.0)
            if need_dx:
                ext.gemm(dy, w, dx, 0.0)
            if need_dw:
                ext.gemm(dy.t(), x, dw, 0.0)

        def torch_blas():
            torch.mm(x, w.t(), out=y)
            if need_dx:
                torch.mm(dy, w, out=dx)
            if need_dw:
                torch.mm(dy.t(), x, out=dw)

        _FASTER[key] = median_ratio(onednn, torch_blas, _TIMING_ROUNDS) < 1.0
    return _FASTER[key]


def layer_gemms(layer: nn.Linear, model_trains: bool) -> str:
    """The GEMMs ``layer`` runs in a training step (a key of ``GEMMS``): dW only for a weight
    that trains, dX when anything in the model trains (gradients pass through frozen layers
    to trainable ones before them), the forward alone in a fully frozen model (a reference)."""
    if layer.weight.requires_grad:
        return "forward+dx+dw"
    return "forward+dx" if model_trains else "forward"


def use_onednn_linears(model: nn.Module, mode: str = "auto", rows: int = 256) -> int:
    """Route the model's ``nn.Linear`` layers through oneDNN; returns how many were swapped.

    ``auto`` decides per weight shape and use (``layer_gemms``: a frozen reference runs only
    forward GEMMs), from the GEMMs of ``rows`` input rows (the tokens a micro-batch passes
    through this model): a layer is swapped when oneDNN runs them faster (and the extension uses
    oneDNN at all); ``onednn`` swaps every layer (if the extension builds); ``torch`` none.
    """
    if mode not in MODES:
        raise ValueError(f"cpu_linear must be one of {', '.join(MODES)}, got {mode!r}")
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    if mode == "torch" or not linears:
        return 0
    total = len(linears)
    if mode == "auto":
        trains = any(p.requires_grad for p in model.parameters())
        uses = {m: (*m.weight.shape, layer_gemms(m, trains)) for m in linears}
        faster = {(out, inp, gemms): onednn_is_faster(inp, out, rows, gemms)
                  for out, inp, gemms in set(uses.values())}
        linears = [m for m in linears if faster[uses[m]]]
    else:
        _ext()  # build errors surface here, not inside the first forward
    for m in linears:
        m.forward = types.MethodType(_forward, m)
    get_logger(__name__).info(f"cpu_linear={mode}: {len(linears)} of {total} linear layers run "
                              "through oneDNN")
    return len(linears)


def try_onednn_linears(model: nn.Module, rows: int = 256) -> int:
    """``auto`` that never fails: nothing is swapped when the C++ extension cannot be built."""
    from .losses._build import ExtensionBuildError

    try:
        return use_onednn_linears(model, "auto", rows)
    except ExtensionBuildError as exc:
        get_logger(__name__).info("cpu_linear=auto: the C++ extension is unavailable, linear "
                                  f"layers keep torch's GEMMs ({str(exc).splitlines()[0]})")
        return 0


def restore_linears(model: nn.Module) -> None:
    """Undo ``use_onednn_linears``."""
    for m in model.modules():
        if type(m) is nn.Linear and "forward" in m.__dict__:
            del m.forward
