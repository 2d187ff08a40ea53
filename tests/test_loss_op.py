"""The one custom-op wrapper of the fused backends: schema, fake implementation, autograd
registration and torch.compile, for every fused backend that runs here."""
from __future__ import annotations

import pytest
import torch

from fastunlearn.losses import unlearn_loss
from fastunlearn.losses.options import LossOptions
from fastunlearn.losses.registry import get_backend
from tests.loss_cases import loss_backends, make_case


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTUNLEARN_TRITON_BLOCK_V", "32")


def _op(backend):
    get_backend(backend)  # imports the module that registers it
    return getattr(torch.ops.fastunlearn, f"{backend}_unlearn_loss").default


@pytest.mark.parametrize("backend", loss_backends(fused_only=True))
def test_opcheck(backend):
    h, w, y, k, rh, rw = make_case(9, 4, 11, dtype=torch.float32, seed=1)
    b = torch.randn(11)
    args = (h.requires_grad_(), w.requires_grad_(), y, k, rh, rw, b.requires_grad_(), b.detach(),
            0.5, 1.0, 1.0, False, 3.0, 0.5, -100, 4, None, True, True, True)
    torch.library.opcheck(_op(backend), args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


@pytest.mark.parametrize("backend", loss_backends(fused_only=True))
def test_fake_outputs_follow_the_needed_gradients(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    h, w, y, k, rh, rw = make_case(9, 4, 11, dtype=torch.bfloat16)
    with FakeTensorMode() as mode:
        fh, fw, fy, fk, frh = (mode.from_tensor(t) for t in (h, w, y, k, rh))
        loss, terms, counts, dx, dw, db = _op(backend)(
            fh, fw, fy, fk, frh, None, None, None, 0.5, 1.0, 1.0, False, None, 1.0, -100, None,
            None, True, False, False)
    assert loss.shape == () and terms.shape == (3,) and counts.dtype == torch.int64
    assert dx.shape == h.shape and dx.dtype == torch.bfloat16
    assert dw.shape == (0,) and db.shape == (0,)


@pytest.mark.parametrize("backend", loss_backends(fused_only=True))
def test_torch_compile(backend):
    h, w, y, k, rh, rw = make_case(12, 8, 40, dtype=torch.float32, seed=19)
    opts = LossOptions(logit_scale=0.5, chunk_rows=5)

    def step(h_, w_):
        return unlearn_loss(h_ * 1.5, w_, y, k, rh, rw, backend=backend, options=opts).loss * 2

    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = torch.compile(step, backend="aot_eager")(hg, wg)
    loss.backward()
    he, we = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = step(he, we)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(hg.grad, he.grad)
    torch.testing.assert_close(wg.grad, we.grad)


def test_terms_detached_counts_int64_and_no_grad():
    h, w, y, k, rh, rw = make_case(20, 8, 30, dtype=torch.float32)
    out = unlearn_loss(h.requires_grad_(), w, y, k, rh, rw, backend="chunked")
    assert out.loss.requires_grad
    assert not out.forget_nll.requires_grad and not out.normal_kl.requires_grad
    assert out.n_forget.dtype == torch.int64
    with torch.no_grad():
        assert not unlearn_loss(h, w, y, k, rh, rw, backend="chunked").loss.requires_grad
