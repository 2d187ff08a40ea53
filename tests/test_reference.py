import pytest
import torch
import torch.nn.functional as F

from fastunlearn.losses import IGNORE_INDEX, token_stats_ref, unlearn_loss_ref
from tests.loss_cases import make_case


def test_gradcheck_each_term():
    h, w, y, k, rh, rw = make_case(9, 5, 11, seed=1)
    for eps in [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 1.0, 1.0)]:
        def f(h_, w_, eps=eps):
            return unlearn_loss_ref(h_, w_, y, k, rh, rw, eps_forget=eps[0],
                                    eps_mismatch=eps[1], eps_normal=eps[2]).loss
        assert torch.autograd.gradcheck(f, (h.clone().requires_grad_(),
                                            w.clone().requires_grad_()))


def test_gradcheck_bias_softcap_sum():
    h, w, y, k, rh, rw = make_case(7, 4, 9, seed=2, scale=3.0)
    b = torch.randn(9, dtype=torch.float64)

    def f(h_, w_, b_):
        return unlearn_loss_ref(h_, w_, y, k, rh, rw, bias=b_, softcap=5.0,
                                reduction="sum").loss
    assert torch.autograd.gradcheck(f, (h.requires_grad_(), w.requires_grad_(),
                                        b.requires_grad_()))


def test_ascent_sign_and_term_values():
    h, w, y, k, rh, rw = make_case(40, 8, 17, seed=3)
    out = unlearn_loss_ref(h, w, y, k, rh, rw, eps_forget=1.0, eps_mismatch=0.0, eps_normal=0.0)
    valid = (y != IGNORE_INDEX) & (k == 0)
    nll = F.cross_entropy(h[valid] @ w.T, y[valid])
    torch.testing.assert_close(out.forget_nll, nll)
    torch.testing.assert_close(out.loss, -nll)  # ascent: the loss is minus the NLL
    # a gradient step on the loss raises the forget NLL
    h2 = h.clone().requires_grad_()
    unlearn_loss_ref(h2, w, y, k, rh, rw, eps_forget=1.0, eps_mismatch=0, eps_normal=0).loss\
        .backward()
    after = F.cross_entropy((h - 0.1 * h2.grad)[valid] @ w.T, y[valid])
    assert after > nll


def test_mismatch_is_plain_nll():
    h, w, y, k, rh, rw = make_case(40, 8, 17, seed=4)
    out = unlearn_loss_ref(h, w, y, k, rh, rw)
    valid = (y != IGNORE_INDEX) & (k == 1)
    torch.testing.assert_close(out.mismatch_nll, F.cross_entropy(h[valid] @ w.T, y[valid]))
    assert int(out.n_mismatch) == int(valid.sum())


def test_kl_nonnegative_and_zero_for_same_model():
    h, w, y, k, rh, rw = make_case(30, 6, 13, seed=5)
    out = unlearn_loss_ref(h, w, y, k, rh, rw)
    assert out.normal_kl > 0
    same = unlearn_loss_ref(h, w, y, k, h.clone(), w.clone())
    assert same.normal_kl == 0
    valid = (y != IGNORE_INDEX) & (k == 2)
    kl = F.kl_div(F.log_softmax(h[valid] @ w.T, -1), F.log_softmax(rh[valid] @ rw.T, -1),
                  log_target=True, reduction="batchmean")
    torch.testing.assert_close(out.normal_kl, kl)


def test_masked_rows_contribute_nothing():
    h, w, y, k, rh, rw = make_case(30, 6, 13, seed=6)
    out = unlearn_loss_ref(h, w, y, k, rh, rw)
    ignored = y == IGNORE_INDEX
    h2, rh2 = h.clone(), rh.clone()
    h2[ignored] = 1e3 * torch.randn_like(h2[ignored])
    rh2[ignored] = -1e3
    out2 = unlearn_loss_ref(h2, w, y, k, rh2, rw)
    torch.testing.assert_close(out.loss, out2.loss)
    hg = h.clone().requires_grad_()
    unlearn_loss_ref(hg, w, y, k, rh, rw).loss.backward()
    assert hg.grad[ignored].abs().max() == 0


def test_absent_kind_and_all_ignored():
    h, w, y, k, rh, rw = make_case(20, 6, 13, seed=7, kinds=(0, 2))
    out = unlearn_loss_ref(h, w, y, k, rh, rw)
    assert out.mismatch_nll == 0 and int(out.n_mismatch) == 0
    y_all = torch.full_like(y, IGNORE_INDEX)
    hg = h.clone().requires_grad_()
    out = unlearn_loss_ref(hg, w, y_all, k, rh, rw)
    assert out.loss == 0
    out.loss.backward()
    assert hg.grad.abs().max() == 0


def test_sum_reduction_counts():
    h, w, y, k, rh, rw = make_case(30, 6, 13, seed=8)
    m = unlearn_loss_ref(h, w, y, k, rh, rw)
    s = unlearn_loss_ref(h, w, y, k, rh, rw, reduction="sum")
    torch.testing.assert_close(s.forget_nll, m.forget_nll * m.n_forget)
    torch.testing.assert_close(s.normal_kl, m.normal_kl * m.n_normal)


def test_vocab_mismatch_is_an_error():
    h, w, y, k, rh, rw = make_case(10, 6, 13)
    with pytest.raises(ValueError, match="vocabularies"):
        unlearn_loss_ref(h, w, y, k, rh, rw[:-1])


def test_token_stats_agree_with_loss():
    h, w, y, k, rh, rw = make_case(25, 6, 13, seed=9)
    logp, logp_ref, kl = token_stats_ref(h, w, y, rh, rw)
    out = unlearn_loss_ref(h, w, y, k, rh, rw)
    f = (y != IGNORE_INDEX) & (k == 0)
    n = (y != IGNORE_INDEX) & (k == 2)
    torch.testing.assert_close(-logp[f].mean(), out.forget_nll)
    torch.testing.assert_close(kl[n].mean(), out.normal_kl)
    assert (logp_ref[y == IGNORE_INDEX] == 0).all()
