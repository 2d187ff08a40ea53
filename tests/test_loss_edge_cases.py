"""Kernel and API edge cases, on every backend that runs here (triton through its interpreter).

Bad labels and kinds, masked (-inf) logits, saturated soft-caps, large logits, fp16, integer and
meta tensors, the reference bias default, the options object and NaN propagation.
"""
from __future__ import annotations

import pytest
import torch

from fastunlearn.losses import IGNORE_INDEX, unlearn_loss, unlearn_loss_ref
from fastunlearn.losses.checks import defer_error_flag, raise_deferred_errors
from fastunlearn.losses.options import LossOptions
from fastunlearn.losses.registry import get_backend
from tests.loss_cases import loss_backends, make_case

BT, H, V = 12, 8, 24


BACKENDS = loss_backends()


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTUNLEARN_TRITON_BLOCK_V", "32")


def _case(dtype=torch.float32, **kw):
    return make_case(BT, H, V, dtype=dtype, seed=3, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("field, value", [("label", V), ("label", -1), ("kind", 3),
                                          ("kind", -1)])
def test_invalid_labels_and_kinds_raise_the_same_error(backend, field, value):
    h, w, y, k, rh, rw = _case(ignore_frac=0.0)
    if field == "label":
        y[5] = value
    else:
        k[5] = value
    with pytest.raises(ValueError, match=r"1 row\(s\) have a label outside \[0, 24\) .*"
                                         r"kind outside \{0, 1, 2\} \(first: row 5"):
        unlearn_loss(h, w, y, k, rh, rw, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_may_carry_any_kind(backend):
    h, w, y, k, rh, rw = _case(ignore_frac=0.0)
    y[3] = IGNORE_INDEX
    k[3] = 7  # padding: its kind is never read
    out = unlearn_loss(h, w, y, k, rh, rw, backend=backend)
    spec = unlearn_loss_ref(h.double(), w.double(), y, torch.where(k == 7, 0, k), rh.double(),
                            rw.double())
    torch.testing.assert_close(out.loss.double(), spec.loss, rtol=1e-5, atol=1e-5)


def test_wrong_num_rows_is_an_error():
    h, w, y, k, rh, rw = _case(ignore_frac=0.0)
    with pytest.raises(ValueError, match="num_rows=.* does not match"):
        unlearn_loss(h, w, y, k, rh, rw, backend="chunked", num_rows=(1, 1, 1))


def test_device_flags_are_raised_at_the_next_call():
    """The path of accelerator backends that read no count: a flag left by one call is an
    error at the next (here with a CPU flag; on CUDA it is copied without a sync)."""
    defer_error_flag(torch.tensor(2), ValueError("2 bad rows in an earlier call"))
    h, w, y, k, rh, rw = _case()
    with pytest.raises(ValueError, match="2 bad rows in an earlier call"):
        unlearn_loss(h, w, y, k, rh, rw, backend="chunked")
    unlearn_loss(h, w, y, k, rh, rw, backend="chunked")  # reported once
    defer_error_flag(torch.tensor(0), ValueError("never"))
    raise_deferred_errors()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_integer_and_meta_inputs_are_refused(backend):
    h, w, y, k, rh, rw = _case()
    with pytest.raises(ValueError, match="float16 hidden is not supported.*bfloat16 or float32"):
        unlearn_loss(h.half(), w.half(), y, k, rh.half(), rw.half(), backend=backend)
    with pytest.raises(ValueError, match="hidden must be a float32, bfloat16 or float64"):
        unlearn_loss(h.long(), w, y, k, rh, rw, backend=backend)
    with pytest.raises(ValueError, match="weight is a meta tensor"):
        unlearn_loss(h, w.to("meta"), y, k, rh, rw, backend=backend)


def test_backend_dtype_capabilities_are_declared():
    h, w, y, k, rh, rw = _case(dtype=torch.float64)
    if "triton" in BACKENDS:
        with pytest.raises(ValueError, match="the triton backend takes hidden in float32, "
                                             "bfloat16, got float64"):
            unlearn_loss(h, w, y, k, rh, rw, backend="triton")
    assert get_backend("chunked").dtypes == (torch.float32, torch.bfloat16, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_bias_defaults_to_the_policy_bias(backend):
    h, w, y, k, rh, _ = _case()
    b = torch.randn(V)
    out = unlearn_loss(h, w, y, k, rh, None, bias=b, backend=backend)
    spec = unlearn_loss_ref(h.double(), w.double(), y, k, rh.double(), w.double(),
                            bias=b.double(), ref_bias=b.double())
    torch.testing.assert_close(out.normal_kl.double(), spec.normal_kl, rtol=1e-5, atol=1e-6)
    without = unlearn_loss_ref(h.double(), w.double(), y, k, rh.double(), w.double(),
                               bias=b.double())
    assert abs(float(without.normal_kl) - float(spec.normal_kl)) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_softcap_gives_exactly_zero_gradient(backend):
    """Vocabulary entries whose logits saturate tanh on every row get exactly 0 in dW
    (1 - tanh^2, not 1 - (c tanh)^2 / c^2, which is 6e-8 for c = 11)."""
    h, w, y, k, rh, rw = _case(ignore_frac=0.0)
    h = h.abs() + 1.0
    w = w.clone()
    w[:4] = 1e4  # rows 0-3: logits ~1e4 >> c
    y = torch.where(y < 4, 4, y)
    w.requires_grad_()
    out = unlearn_loss(h, w, y, k, rh, w.detach(), softcap=11.0, backend=backend)
    out.loss.backward()
    assert torch.isfinite(w.grad).all()
    assert (w.grad[:4] == 0).all(), w.grad[:4].abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_keep_gradient_precision(backend):
    """Logits around 1e4: probabilities as exp(z - max) / sum keep the gradient error at plain
    fp32 PyTorch's."""
    h, w, y, k, rh, rw = _case(ignore_frac=0.0, scale=1.0)
    h = h * (1e4 / h.abs().max())
    w = w / w.abs().max()

    def grads(fn, dtype):
        hh = h.to(dtype).clone().requires_grad_()
        fn(hh).loss.backward()
        return hh.grad.double()

    want = grads(lambda x: unlearn_loss_ref(x, w.double(), y, k, rh.double(), rw.double()),
                 torch.float64)
    torch_fp32 = grads(lambda x: unlearn_loss_ref(x, w, y, k, rh, rw), torch.float32)
    got = grads(lambda x: unlearn_loss(x, w, y, k, rh, rw, backend=backend), torch.float32)
    scale = float(want.abs().max())
    err, base = float((got - want).abs().max()), float((torch_fp32 - want).abs().max())
    # exp(z - lse) with an fp32 lse gave 18x plain PyTorch's error here (3.9e-7 vs 2.2e-8)
    assert err <= 3 * base + 1e-9 * scale, (err, base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inputs_propagate(backend):
    h, w, y, k, rh, rw = _case(ignore_frac=0.0)
    h[2] = float("nan")
    out = unlearn_loss(h, w, y, k, rh, rw, backend=backend)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_takes_the_options_object(backend):
    h, w, y, k, rh, rw = _case()
    opts = LossOptions(eps_forget=0.3, reduction="sum", softcap=5.0, logit_scale=0.5)
    out = unlearn_loss(h, w, y, k, rh, rw, backend=backend, options=opts)
    spec = unlearn_loss_ref(h.double(), w.double(), y, k, rh.double(), rw.double(),
                            eps_forget=0.3, reduction="sum", softcap=5.0, logit_scale=0.5)
    torch.testing.assert_close(out.loss.double(), spec.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, match", [
    ({"reduction": "avg"}, "reduction must be one of"),
    ({"softcap": 0.0}, "softcap must be positive"),
    ({"logit_scale": 0.0}, "logit_scale must be finite and non-zero"),
    ({"logit_scale": float("inf")}, "logit_scale must be finite and non-zero"),
    ({"chunk_rows": 0}, "chunk_rows must be positive"),
    ({"num_rows": (1, 2)}, "num_rows must be three non-negative counts"),
    ({"eps_forget": float("nan")}, "eps_forget must be finite"),
])
def test_options_are_validated_in_one_line(kw, match):
    with pytest.raises(ValueError, match=match):
        LossOptions(**kw)


def test_options_are_frozen_and_the_module_reads_them():
    from dataclasses import FrozenInstanceError

    from fastunlearn.losses import UnlearnLoss

    with pytest.raises(FrozenInstanceError):
        LossOptions().softcap = 3.0
    mod = UnlearnLoss(eps_forget=0.2, logit_scale=0.125, backend="chunked")
    assert mod.eps_forget == 0.2 and mod.logit_scale == 0.125
    h, w, y, k, rh, rw = _case()
    spec = unlearn_loss_ref(h.double(), w.double(), y, k, rh.double(), rw.double(),
                            eps_forget=0.2, logit_scale=0.125)
    torch.testing.assert_close(mod(h, w, y, k, rh, rw).loss.double(), spec.loss, rtol=1e-5,
                               atol=1e-6)
