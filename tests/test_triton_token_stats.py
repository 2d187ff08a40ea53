"""Token-stats primitive of the Triton backend vs ``token_stats_ref`` (CPU interpreter)."""
import pytest
import torch

pytest.importorskip("triton")

from fastunlearn.losses import token_stats_ref  # noqa: E402
from tests.loss_cases import make_case  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTUNLEARN_TRITON_BLOCK_V", "32")


def _token_stats(*args, **kw):
    from fastunlearn.losses.triton_backend import token_stats

    return token_stats(*args, **kw)


def _both(h, w, y, rh, rw, g_logp, g_kl, b=None, **kw):
    """Forward both implementations, backprop sum(g_logp * logp + g_kl * kl)."""
    out = []
    chunk_rows = kw.pop("chunk_rows", None)
    for impl in ("triton", "ref"):
        hh = h.clone().double().requires_grad_() if impl == "ref" else h.clone().requires_grad_()
        ww = w.clone().double().requires_grad_() if impl == "ref" else w.clone().requires_grad_()
        bb = None
        if b is not None:
            bb = b.clone().double() if impl == "ref" else b.clone()
            bb.requires_grad_()
        if impl == "ref":
            logp, logp_ref, kl = token_stats_ref(
                hh, ww, y, None if rh is None else rh.double(),
                None if rw is None else rw.double(), bias=bb,
                ref_bias=None if bb is None else bb.detach(), **kw)
        else:
            logp, logp_ref, kl = _token_stats(hh, ww, y, rh, rw, bias=bb,
                                              ref_bias=None if bb is None else bb.detach(),
                                              chunk_rows=chunk_rows, **kw)
        (g_logp.to(logp.dtype) * logp + g_kl.to(kl.dtype) * kl).sum().backward()
        out.append((logp, logp_ref, kl, hh.grad, ww.grad, None if bb is None else bb.grad))
    return out


@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize("shape", [(37, 31, 123), (9, 5, 40)])
def test_token_stats_match_reference(shape, with_ref):
    h, w, y, _k, rh, rw = make_case(*shape, dtype=torch.float32, seed=sum(shape))
    if not with_ref:
        rh = rw = None
    g = torch.Generator().manual_seed(1)
    g_logp = torch.randn(shape[0], generator=g)
    g_kl = torch.randn(shape[0], generator=g)
    got, ref = _both(h, w, y, rh, rw, g_logp, g_kl, chunk_rows=16)
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3].double(), ref[3], rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(got[4].double(), ref[4], rtol=2e-4, atol=1e-6)
    ignored = y == -100
    assert ignored.any() and (got[0][ignored] == 0).all() and (got[2][ignored] == 0).all()
    assert not got[1].requires_grad


def test_token_stats_bias_softcap_and_zero_upstream():
    h, w, y, _k, rh, rw = make_case(21, 12, 70, dtype=torch.float32, seed=4, scale=3.0)
    b = torch.randn(70, generator=torch.Generator().manual_seed(2))
    g_logp = torch.randn(21, generator=torch.Generator().manual_seed(3))
    got, ref = _both(h, w, y, rh, rw, g_logp, torch.zeros(21), b=b, softcap=6.0)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.double(), r.double(), rtol=2e-4, atol=1e-6)


def test_token_stats_only_kl_used():
    """An upstream gradient on kl only (logp unused) must still reach hidden and weight."""
    h, w, y, _k, rh, rw = make_case(13, 6, 50, dtype=torch.float32, seed=8)
    hh = h.clone().requires_grad_()
    _, _, kl = _token_stats(hh, w, y, rh, rw)
    kl.sum().backward()
    hd = h.double().requires_grad_()
    _, _, kl_ref = token_stats_ref(hd, w.double(), y, rh.double(), rw.double())
    kl_ref.sum().backward()
    torch.testing.assert_close(hh.grad.double(), hd.grad, rtol=2e-4, atol=1e-6)


def test_token_stats_opcheck():
    """torch.library.opcheck: schema, fake tensor and autograd registration are consistent."""
    from fastunlearn.losses import triton_backend

    h, w, y, _k, rh, rw = make_case(7, 4, 20, dtype=torch.float32, seed=9)
    h.requires_grad_()
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    opcheck(triton_backend._token_stats_op, (h, w, y, rh, rw, None, None, None, -100, None),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_token_stats_no_sync_mode_and_out_of_range_labels(monkeypatch):
    """FASTUNLEARN_TRITON_SYNC=0 (every row through the GEMMs) gives the same values; labels
    outside [0, V) count as ignored (0, no gradient) instead of reading out of bounds."""
    h, w, y, _k, rh, rw = make_case(15, 6, 40, dtype=torch.float32, seed=12)
    bad = y.clone()
    bad[0], bad[1] = 40, -7
    base = _token_stats(h, w, bad, rh, rw)
    monkeypatch.setenv("FASTUNLEARN_TRITON_SYNC", "0")
    hh = h.clone().requires_grad_()
    nosync = _token_stats(hh, w, bad, rh, rw)
    for a, b in zip(base, nosync):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(float(t[0]) == 0 and float(t[1]) == 0 for t in nosync)
    (nosync[0].sum() + nosync[2].sum()).backward()
    assert hh.grad[:2].abs().max() == 0 and hh.grad[2:].abs().max() > 0
