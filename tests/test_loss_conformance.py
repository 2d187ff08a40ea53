"""One conformance suite for every loss backend that runs here, against the float64 specification.

Backends: reference, chunked, cpp (when its extension builds) and triton (through the Triton
interpreter, ``TRITON_INTERPRET=1``). Each runs every case below in float32 and bfloat16, and its
loss, terms, counts and gradients are compared with ``unlearn_loss_ref`` in float64 on the same
(rounded) inputs. Tolerances, one table:

* float32: ``FP32_TOL`` (relative to the size of the quantity);
* bfloat16: at most twice the error of plain PyTorch in bfloat16 (the reference computed with
  bfloat16 logits and autograd), plus a floor of ``BF16_FLOOR`` for quantities plain PyTorch
  gets exactly.

Shapes are tiny (the interpreter runs every Triton program in Python, so triton runs the bf16
cases in ``TRITON_BF16_CASES`` only); tiles of 32 columns over V = 40 and chunks of 7 rows (13
for triton) make every vocabulary span a full and a masked tile, and every batch several chunks.
"""
from __future__ import annotations

import pytest
import torch

from fastunlearn.losses import IGNORE_INDEX, unlearn_loss, unlearn_loss_ref
from tests.loss_cases import loss_backends, make_case, no_tf32  # noqa: F401 (fixture)

BT, H, V = 26, 12, 40
CHUNK = {"triton": 13}  # rows per chunk; 7 for the others
TRITON_BF16_CASES = ("plain", "softcap", "logit_scale", "large_logits", "masked_vocab")
FP32_TOL = 2e-5
BF16_FLOOR = 1e-4

# name -> what the case changes (see _inputs / _call)
CASES = {
    "plain": {},
    "bias": {"bias": True},
    "softcap": {"softcap": 2.5, "scale": 3.0, "bias": True},
    "logit_scale": {"logit_scale": 0.37, "bias": True},
    "scale_and_cap": {"logit_scale": 4.0, "softcap": 3.0},
    "sum": {"reduction": "sum", "eps": (0.7, 1.3, 0.9)},
    "absent_kinds": {"kinds": (0, 2)},
    "only_normal": {"kinds": (2,)},
    "no_reference": {"no_reference": True},
    "all_ignored": {"ignore_frac": 1.0},
    "non_contiguous": {"strided": True, "bias": True},
    "grad_output": {"grad_output": -2.5, "bias": True},
    "frozen_head": {"frozen_head": True},
    "masked_vocab": {"masked_vocab": True},
    "large_logits": {"scale": 300.0},
}
QUANTITIES = ("loss", "forget_nll", "mismatch_nll", "normal_kl", "dh", "dw", "db")


def _inputs(case: dict, dtype: torch.dtype):
    h, w, y, k, rh, rw = make_case(BT, H, V, dtype=torch.float64, seed=11,
                                   ignore_frac=case.get("ignore_frac", 0.25),
                                   kinds=case.get("kinds", (0, 1, 2)), scale=case.get("scale", 1.0))
    g = torch.Generator().manual_seed(5)
    b = rb = None
    if case.get("bias") or case.get("masked_vocab"):
        b = torch.randn(V, generator=g, dtype=torch.float64)
        rb = b + 0.1 * torch.randn(V, generator=g, dtype=torch.float64)
    if case.get("masked_vocab"):  # padded vocabulary entries masked by the bias
        b[-5:] = float("-inf")
        rb[-5:] = float("-inf")
        y = torch.where(y >= V - 5, y % (V - 5), y)
        y[y == IGNORE_INDEX % (V - 5)] = IGNORE_INDEX  # keep the ignored rows ignored
    rnd = (lambda t: None if t is None else t.to(dtype))
    if case.get("no_reference"):
        rh = rw = None
    return [rnd(t) for t in (h, w)] + [y, k] + [rnd(t) for t in (rh, rw, b, rb)]


def _strided(t):
    """A non-contiguous view with the same values (differentiable)."""
    return None if t is None else torch.stack([t, t], dim=-1)[..., 0]


def _call(backend: str, case: dict, inputs, compute_dtype=None):
    h, w, y, k, rh, rw, b, rb = inputs
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_(not case.get("frozen_head"))
    b = None if b is None else b.clone().requires_grad_()
    args = [h, w, y, k, rh, rw, b, rb]
    if case.get("strided"):
        args = [_strided(t) for t in args]
        assert not args[0].is_contiguous() and not args[6].is_contiguous()
    ef, em, en = case.get("eps", (0.5, 1.0, 1.0))
    kw = dict(eps_forget=ef, eps_mismatch=em, eps_normal=en, bias=args[6], ref_bias=args[7],
              softcap=case.get("softcap"), logit_scale=case.get("logit_scale", 1.0),
              reduction=case.get("reduction", "mean"))
    if compute_dtype is not None:  # the specification, or plain PyTorch in the inputs' dtype
        cast = (lambda t: t if t is None or compute_dtype != torch.float64 else t.double())
        kw.update(bias=cast(kw["bias"]), ref_bias=cast(kw["ref_bias"]))
        out = unlearn_loss_ref(*[cast(t) for t in args[:2]], args[2], args[3],
                               *[cast(t) for t in args[4:6]], compute_dtype=compute_dtype, **kw)
    else:
        out = unlearn_loss(*args[:6], backend=backend, chunk_rows=CHUNK.get(backend, 7), **kw)
    (out.loss * case.get("grad_output", 1.0)).backward()
    res = {name: getattr(out, name).detach().double() for name in QUANTITIES[:4]}
    res.update(dh=h.grad, dw=w.grad, db=None if b is None else b.grad)
    res["counts"] = tuple(int(getattr(out, n)) for n in ("n_forget", "n_mismatch", "n_normal"))
    res["backend"] = out.backend
    return res


def _err(got, want):
    if want is None:
        return 0.0
    return float((got.double() - want.double()).abs().max()) if want.numel() else 0.0


@pytest.fixture
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors only: CUDA ones run compiled
    monkeypatch.setenv("FASTUNLEARN_TRITON_BLOCK_V", "32")


def _params():
    runs = [(b, "cpu") for b in loss_backends()]
    if torch.cuda.is_available():  # the same suite on the GPU (marker gpu)
        runs += [("cuda", "cuda"), ("triton", "cuda"), ("chunked", "cuda")]
    for backend, device in runs:
        marks = [pytest.mark.gpu] if device == "cuda" else []
        for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            for case_name in CASES:
                if (backend, device) == ("triton", "cpu") and dname == "bf16" \
                        and case_name not in TRITON_BF16_CASES:
                    continue
                yield pytest.param(backend, device, dtype, case_name, marks=marks,
                                   id=f"{backend}-{device}-{dname}-{case_name}")


@pytest.mark.usefixtures("triton_interpreter", "no_tf32")
@pytest.mark.parametrize("backend, device, dtype, case_name", list(_params()))
def test_backend_matches_float64_specification(backend, device, dtype, case_name):
    case = CASES[case_name]
    inputs = [None if t is None else t.to(device) for t in _inputs(case, dtype)]
    spec = _call("spec", case, inputs, compute_dtype=torch.float64)
    got = _call(backend, case, inputs)
    assert got["backend"] == backend
    assert got["counts"] == spec["counts"]
    if case.get("frozen_head"):
        assert got["dw"] is None
    plain = _call("plain", case, inputs, compute_dtype=dtype) if dtype == torch.bfloat16 \
        else None
    for q in QUANTITIES:
        want = spec[q]
        if want is None:
            assert got[q] is None, q
            continue
        assert torch.isfinite(got[q]).all(), f"{q} has NaN / inf"
        err = _err(got[q], want)
        if plain is None:
            bound = FP32_TOL * max(1.0, float(want.double().abs().max()))
        else:
            bound = 2.0 * _err(plain[q], want) + BF16_FLOOR * max(1.0, float(
                want.double().abs().max()))
        assert err <= bound, f"{q}: error {err:.3g} > {bound:.3g}"
