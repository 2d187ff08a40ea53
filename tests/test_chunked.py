import pytest
import torch

from fastunlearn.losses import unlearn_loss, unlearn_loss_ref
from tests.loss_cases import make_case, run_with_grads


@pytest.mark.parametrize("shape", [(37, 31, 123), (5, 3, 7), (64, 16, 300)])
@pytest.mark.parametrize("chunk_rows", [None, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_matches_reference(shape, chunk_rows, reduction):
    h, w, y, k, rh, rw = make_case(*shape, dtype=torch.float32, seed=sum(shape))
    ref, gh, gw, _ = run_with_grads(lambda a, b_, _c: unlearn_loss_ref(
        a.double(), b_.double(), y, k, rh.double(), rw.double(), reduction=reduction), h, w)
    got, ch, cw, _ = run_with_grads(lambda a, b_, _c: unlearn_loss(
        a, b_, y, k, rh, rw, reduction=reduction, backend="chunked", chunk_rows=chunk_rows), h, w)
    assert got.backend == "chunked"
    for name in ("loss", "forget_nll", "mismatch_nll", "normal_kl"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(ref, name),
                                   rtol=1e-5, atol=1e-6)
    for name in ("n_forget", "n_mismatch", "n_normal"):
        assert int(getattr(got, name)) == int(getattr(ref, name))
    torch.testing.assert_close(ch.double(), gh.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cw.double(), gw.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grad_output", [1.0, 2.0, -1.0])
def test_chunked_grad_output_bias_softcap(grad_output):
    h, w, y, k, rh, rw = make_case(29, 12, 77, dtype=torch.float32, seed=3, scale=3.0)
    b = torch.randn(77)
    kw = dict(softcap=8.0, eps_forget=0.7, eps_mismatch=1.3, eps_normal=0.9)
    ref, gh, gw, gb = run_with_grads(lambda a, b_, c: unlearn_loss_ref(
        a.double(), b_.double(), y, k, rh.double(), rw.double(), bias=c.double(),
        ref_bias=c.double(), **kw), h, w, b, grad_output)
    got, ch, cw, cb = run_with_grads(lambda a, b_, c: unlearn_loss(
        a, b_, y, k, rh, rw, bias=c, ref_bias=c.detach(), backend="chunked", chunk_rows=8, **kw),
        h, w, b, grad_output)
    torch.testing.assert_close(got.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ch.double(), gh.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cw.double(), gw.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cb.double(), gb.double(), rtol=1e-4, atol=1e-6)


def test_chunked_edge_cases():
    h, w, y, k, rh, rw = make_case(20, 8, 50, dtype=torch.float32, kinds=(0, 2))
    out = unlearn_loss(h, w, y, k, rh, rw, backend="chunked")
    assert int(out.n_mismatch) == 0 and out.mismatch_nll == 0
    # all ignored
    hg = h.clone().requires_grad_()
    out = unlearn_loss(hg, w, torch.full_like(y, -100), k, rh, rw, backend="chunked")
    out.loss.backward()
    assert out.loss == 0 and hg.grad.abs().max() == 0
    # reference is the policy itself: KL exactly 0, and its gradient 0
    only_normal = torch.full_like(k, 2)
    hg = h.clone().requires_grad_()
    out = unlearn_loss(hg, w, y, only_normal, h, w, backend="chunked")
    out.loss.backward()
    assert out.normal_kl.abs() < 1e-6 and hg.grad.abs().max() < 1e-6


def test_chunked_non_contiguous_and_tied():
    h, w, y, k, rh, rw = make_case(30, 16, 40, dtype=torch.float32)
    wide = torch.randn(30, 32)
    wide[:, ::2] = h
    h_nc = wide[:, ::2]
    assert not h_nc.is_contiguous()
    emb = torch.nn.Embedding(40, 16)
    wt = emb.weight  # tied: head is the input embedding
    out = unlearn_loss(h_nc, wt, y, k, rh, wt, backend="chunked")
    ref = unlearn_loss_ref(h.double(), wt.double(), y, k, rh.double(), wt.double())
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert emb.weight.grad is not None
