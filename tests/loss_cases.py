"""Random inputs for loss tests, shared by every backend's tests."""
from __future__ import annotations

import pytest
import torch

from fastunlearn.losses import IGNORE_INDEX


def make_case(bt=37, h=31, v=123, *, dtype=torch.float64, seed=0, ignore_frac=0.3,
              kinds=(0, 1, 2), scale=1.0, device="cpu", separate_ref=True):
    """hidden, weight, labels, kind, ref_hidden, ref_weight with a mix of kinds and ignores."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(bt, h, generator=g, dtype=torch.float64) * scale).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5).to(dtype)
    labels = torch.randint(0, v, (bt,), generator=g)
    labels[torch.rand(bt, generator=g) < ignore_frac] = IGNORE_INDEX
    kind = torch.tensor(kinds)[torch.randint(0, len(kinds), (bt,), generator=g)]
    if separate_ref:
        ref_hidden = hidden + 0.3 * torch.randn(bt, h, generator=g, dtype=torch.float64).to(dtype)
        ref_weight = weight + 0.05 * torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype)
    else:
        ref_hidden, ref_weight = hidden.clone(), weight
    return [t.to(device) for t in (hidden, weight, labels, kind, ref_hidden, ref_weight)]


def run_with_grads(fn, h, w, b=None, grad_output=1.0):
    """Call ``fn(h, w, b) -> LossOutput`` on fresh leaf copies, backprop ``grad_output * loss``;
    return ``(out, dh, dw, db)`` (db None without a bias)."""
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    if b is not None:
        b = b.clone().requires_grad_()
    out = fn(h, w, b)
    (out.loss * grad_output).backward()
    return out, h.grad, w.grad, (b.grad if b is not None else None)


def loss_backends(fused_only: bool = False) -> list[str]:
    """The loss backends that run on CPU here: reference (unless ``fused_only``), chunked, cpp
    (when its extension builds) and triton (through the interpreter, when Triton imports)."""
    from fastunlearn.losses.registry import get_backend

    names = ([] if fused_only else ["reference"]) + ["chunked"]
    cpp = get_backend("cpp")
    if cpp is not None and cpp.available("cpu")[0]:
        names.append("cpp")
    try:
        import triton  # noqa: F401

        names.append("triton")
    except ImportError:
        pass
    return names


@pytest.fixture
def no_tf32():
    """fp32 comparisons on a GPU need true fp32 GEMMs, whatever another test module set."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
