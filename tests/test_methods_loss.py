"""Token statistics and the unlearning methods' forget terms against their specifications.

* ``token_stats`` on every backend that runs here (triton through the interpreter) equals
  ``token_stats_ref`` in float64: values, and gradients of random upstream combinations;
* each method's specification passes an fp64 gradcheck, and the fused forget term (token_stats
  + sequence_sums) equals it, loss and gradients;
* the methods' invariants at the reference (NPO and IdkDPO: 2 log 2 / beta);
* token_stats never allocates a (BT, V) tensor; bad inputs give one-line ValueErrors.
"""
import math

import pytest
import torch

from fastunlearn.losses import (
    DEFAULT_BETA,
    METHODS,
    idk_dpo_loss,
    method_forget_loss,
    method_forget_loss_ref,
    npo_loss,
    rmu_control_vector,
    rmu_loss,
    sequence_logprobs_ref,
    sequence_sums,
    simnpo_loss,
    token_stats,
    token_stats_ref,
)
from fastunlearn.losses.methods import (
    forget_term_from_logprobs,
    sequence_term_and_weights,
    token_logprobs_ref,
)
from fastunlearn.losses.probe import AllocationRecorder
from fastunlearn.losses.sequence_term import group_chunks, sequence_forget_term
from tests.loss_cases import loss_backends, make_case

SCALE, CAP = 1.3, 6.0
HEAD_METHODS = [m for m in METHODS if m != "rmu"]


@pytest.fixture
def backend(request, monkeypatch):
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("FASTUNLEARN_TRITON_BLOCK_V", "64")  # V = 123: a partial tile
    return request.param


def _case(bt, h, v, dtype, seed):
    hid, w, y, _k, rh, rw = make_case(bt, h, v, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype)
    rb = (b.double() + 0.1 * torch.randn(v, generator=g, dtype=torch.float64)).to(dtype)
    return hid, w, y, rh, rw, b, rb


def _leaves(*ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in ts]


def _stats_ref64(h, w, y, rh, rw, b, rb):
    """The specification in float64, the logit scale folded into its inputs."""
    return token_stats_ref(h * SCALE, w, y, None if rh is None else rh.double() * SCALE,
                           None if rw is None else rw.double(), bias=b * SCALE,
                           ref_bias=rb.double() * SCALE, softcap=CAP)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


# bf16: the logits of a bf16 head carry a 2^-9 relative rounding (values), and dX / dW are
# stored in bf16 (gradients)
# (measured: fp32 at most 1e-6 / 3e-7, bf16 1e-3 / 4e-3)
TOL = {torch.float32: dict(val=2e-5, grad=2e-5), torch.bfloat16: dict(val=4e-3, grad=1.5e-2)}


@pytest.mark.parametrize("backend", loss_backends(), indirect=True)
@pytest.mark.parametrize("dtype, upstream", [(torch.float32, "logp_and_kl"),
                                             (torch.float32, "logp_only"),
                                             (torch.bfloat16, "logp_and_kl")])
def test_token_stats_match_specification(backend, dtype, upstream):
    bt, v = 37, 123
    h, w, y, rh, rw, b, rb = _case(bt, 31, v, dtype, seed=3)
    g = torch.Generator().manual_seed(5)
    g_logp = torch.randn(bt, generator=g, dtype=torch.float64)
    g_kl = torch.randn(bt, generator=g, dtype=torch.float64) if upstream == "logp_and_kl" \
        else None

    hh, ww, bb = _leaves(h, w, b)
    logp, logp_ref, kl = token_stats(hh, ww, y, rh, rw, bias=bb, ref_bias=rb, softcap=CAP,
                                     logit_scale=SCALE, backend=backend, chunk_rows=16)
    assert all(t.dtype == torch.float32 and t.shape == (bt,) for t in (logp, logp_ref, kl))
    assert not logp_ref.requires_grad
    obj = (g_logp.float() * logp).sum() + (0 if g_kl is None else (g_kl.float() * kl).sum())
    obj.backward()

    h64, w64, b64 = _leaves(h, w, b, dtype=torch.float64)
    ref = _stats_ref64(h64, w64, y, rh, rw, b64, rb)
    obj64 = (g_logp * ref[0]).sum() + (0 if g_kl is None else (g_kl * ref[2]).sum())
    obj64.backward()

    tol = TOL[dtype]
    for got, want in zip((logp, logp_ref, kl), (t.detach() for t in ref)):
        err = float((got.detach().double() - want).abs().max())
        assert err <= tol["val"] * (1 + float(want.abs().max()))
    for got, want in ((hh.grad, h64.grad), (ww.grad, w64.grad), (bb.grad, b64.grad)):
        assert got.dtype == dtype
        assert _rel(got, want) <= tol["grad"], (_rel(got, want), backend)
    ignored = y == -100
    assert ignored.any()
    assert all((t[ignored] == 0).all() for t in (logp, logp_ref, kl))


@pytest.mark.parametrize("backend", loss_backends(), indirect=True)
def test_token_stats_without_reference_and_without_kl(backend):
    h, w, y, rh, rw, b, rb = _case(21, 9, 45, torch.float32, seed=7)
    hh, ww = _leaves(h, w)
    logp, logp_ref, kl = token_stats(hh, ww, y, bias=b, backend=backend, logit_scale=SCALE)
    assert (logp_ref == 0).all() and (kl == 0).all() and not kl.requires_grad
    logp.sum().backward()
    h64, w64 = _leaves(h, w, dtype=torch.float64)
    want = token_stats_ref(h64 * SCALE, w64, y, bias=b.double() * SCALE)[0]
    want.sum().backward()
    torch.testing.assert_close(logp.double(), want, rtol=1e-5, atol=1e-5)
    assert _rel(hh.grad, h64.grad) < 2e-5 and _rel(ww.grad, w64.grad) < 2e-5

    # with_kl=False: the same logp / logp_ref, kl 0 and constant
    full = token_stats(h, w, y, rh, rw, bias=b, backend=backend)
    lean = token_stats(h, w, y, rh, rw, bias=b, backend=backend, with_kl=False)
    torch.testing.assert_close(lean[0], full[0])
    torch.testing.assert_close(lean[1], full[1])
    assert (lean[2] == 0).all() and (full[2] != 0).any()


def test_token_stats_default_reference_head_and_3d_inputs():
    """ref_weight None: the policy head (detached) with its bias, as in unlearn_loss."""
    h, w, y, rh, _rw, b, _rb = _case(24, 8, 30, torch.float32, seed=11)
    got = token_stats(h.view(4, 6, 8), w, y.view(4, 6), rh.view(4, 6, 8), bias=b,
                      backend="chunked")
    want = token_stats_ref(h.double(), w.double(), y, rh.double(), bias=b.double(),
                           ref_bias=b.double())
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- methods

def _segments(y, per=6):
    """Rows in 5 sequences of ``per`` rows (the last rows belong to none); the pairs of
    idk_dpo are (0, 2) and (1, 3); sequence 4 has no valid token."""
    bt, n = y.shape[0], 5
    seg = torch.full((bt,), -1, dtype=torch.long)
    seg[:n * per] = torch.arange(n * per) // per
    y = y.clone()
    y[(n - 1) * per:n * per] = -100
    y[torch.arange(n - 1) * per] = 3  # every other sequence has a valid token
    return y, seg, n, torch.tensor([[0, 2], [1, 3]])


def _method_kwargs(method):
    return dict(beta=None if method in ("paper", "graddiff") else DEFAULT_BETA[method] * 3,
                gamma=0.5 if method == "simnpo" else 0.0)


@pytest.mark.parametrize("method", HEAD_METHODS)
def test_method_specification_gradcheck(method):
    h, w, y, rh, rw, b, rb = _case(17, 3, 7, torch.float64, seed=13)
    y, seg, n, pairs = _segments(y, per=3)

    def f(hh, ww, bb):
        return method_forget_loss_ref(method, hh, ww, y, seg, n, rh, rw, pairs=pairs, bias=bb,
                                      ref_bias=rb, softcap=CAP, logit_scale=SCALE,
                                      **_method_kwargs(method))

    assert torch.autograd.gradcheck(f, tuple(_leaves(h, w, b)))


def test_formula_gradchecks():
    g = torch.Generator().manual_seed(0)
    S, S_ref, S2, S2_ref = (torch.randn(5, generator=g, dtype=torch.float64) * 3
                            for _ in range(4))
    n_tok = torch.tensor([1.0, 4, 7, 2, 0], dtype=torch.float64)
    S.requires_grad_()
    S2.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: npo_loss(s, S_ref, 0.3), (S,))
    assert torch.autograd.gradcheck(lambda s: simnpo_loss(s, n_tok, 2.5, 0.2), (S,))
    assert torch.autograd.gradcheck(lambda a, c: idk_dpo_loss(a, S_ref, c, S2_ref, 0.2),
                                    (S, S2))
    act = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    target = rmu_control_vector(6, 5.0, seed=1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: rmu_loss(a, target), (act,))
    vals = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    seg = torch.tensor([0, 2, -1, 2, 1, 0, -1])
    assert torch.autograd.gradcheck(lambda x: sequence_sums(x, seg, 4), (vals,))
    sums = sequence_sums(vals, seg, 4)
    torch.testing.assert_close(sums, torch.stack([vals[0] + vals[5], vals[4],
                                                  vals[1] + vals[3], vals.new_zeros(())]))


def test_formula_values():
    """The formulas against their closed forms (not against themselves)."""
    S, S_ref = torch.tensor([-3.0, -10.0]), torch.tensor([-4.0, -10.0])
    beta = 0.5
    want = -(2 / beta) * torch.log(1 / (1 + torch.exp(beta * (S - S_ref))))
    torch.testing.assert_close(npo_loss(S, S_ref, beta), want)
    want = -(2 / beta) * torch.log(1 / (1 + torch.exp(beta * S / torch.tensor([3.0, 5]) + 0.1)))
    torch.testing.assert_close(simnpo_loss(S, torch.tensor([3, 5]), beta, 0.1), want)
    act, target = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([1.0, 0.0])
    torch.testing.assert_close(rmu_loss(act, target), torch.tensor([2.0, 0.5]))
    u = rmu_control_vector(16, 6.5, seed=3)
    assert math.isclose(float(u.norm()), 6.5, rel_tol=1e-6) and (u >= 0).all()
    assert torch.equal(u, rmu_control_vector(16, 6.5, seed=3))


def _method_errors(method, backend, dtype, chunk_rows, beta=None):
    """(value, gradient) relative errors of the fused forget term on ``backend`` in ``dtype``
    against the fp64 specification (gradients: the worst of hidden, weight, bias)."""
    h, w, y, rh, rw, b, rb = _case(34, 12, 47, dtype, seed=17)
    y, seg, n, pairs = _segments(y)
    kw = dict(pairs=pairs, ref_bias=rb, softcap=CAP, logit_scale=SCALE,
              **{**_method_kwargs(method), "beta": beta})
    hh, ww, bb = _leaves(h, w, b)
    got = method_forget_loss(method, hh, ww, y, seg, n, rh, rw, bias=bb, backend=backend,
                             chunk_rows=chunk_rows, **kw)
    got.backward()
    h64, w64, b64 = _leaves(h, w, b, dtype=torch.float64)
    want = method_forget_loss_ref(method, h64, w64, y, seg, n, rh.double(), rw.double(),
                                  bias=b64, **{**kw, "ref_bias": rb.double()})
    want.backward()
    assert got.dtype == torch.float32
    assert all(a.dtype == dtype for a in (hh.grad, ww.grad, bb.grad))
    want = want.detach()
    value = abs(float(got.detach().double() - want)) / max(abs(float(want)), 1e-6)
    grads = max(_rel(a, e) for a, e in ((hh.grad, h64.grad), (ww.grad, w64.grad),
                                        (bb.grad, b64.grad)))
    return value, grads


# chunk_rows 8: a sequence (6 rows) fits a chunk, an idk_dpo pair (12) does not (two passes);
# 64: every pair fits (one pass for every sequence method)
@pytest.mark.parametrize("backend", loss_backends(fused_only=True), indirect=True)
@pytest.mark.parametrize("method", HEAD_METHODS)
@pytest.mark.parametrize("chunk_rows", [8, 64])
def test_fused_method_matches_specification(backend, method, chunk_rows):
    beta = _method_kwargs(method)["beta"]
    value, grads = _method_errors(method, backend, torch.float32, chunk_rows, beta)
    assert value < 2e-5 and grads < 5e-5, (method, value, grads)


@pytest.mark.parametrize("backend", loss_backends(fused_only=True), indirect=True)
@pytest.mark.parametrize("method", HEAD_METHODS)
def test_fused_method_in_bf16_within_twice_plain_pytorch(backend, method):
    """bf16 inputs: at most twice the error of plain PyTorch (the reference backend, full
    logits) in bf16, plus 2e-3 (the default beta: a steeper one leaves too few bf16 bits in
    SimNPO's saturated sigmoid for either path)."""
    plain = _method_errors(method, "reference", torch.bfloat16, 64)
    fused = _method_errors(method, backend, torch.bfloat16, 64)
    assert all(f <= 2 * p + 2e-3 for f, p in zip(fused, plain)), (fused, plain)


def _logit_rows(rec, vocab):
    """Rows of (rows, V) logits the recorded GEMMs computed."""
    gemms = ("mm", "addmm", "addmm_", "matmul")
    return sum(s[0] for f, s in rec.outputs if f in gemms and len(s) == 2 and s[1] == vocab)


@pytest.mark.parametrize("backend", ["chunked", "triton"], indirect=True)
@pytest.mark.parametrize("method", ["npo", "simnpo", "idk_dpo"])
def test_sequence_term_computes_the_logits_once_when_sequences_fit(backend, method):
    """One pass when every sequence (pair) fits a chunk: each forget row's logits are
    computed once over forward and backward (the paper's cost), and twice (token_stats: the
    backward recomputes them) when one does not fit; both equal the specification."""
    if backend not in loss_backends():
        pytest.skip(f"{backend} does not run here")
    v = 47
    h, w, y, rh, rw, b, _rb = _case(34, 12, v, torch.float32, seed=41)
    y, seg, n, pairs = _segments(y)
    n_valid = int(((y != -100) & (seg >= 0)).sum())
    want = method_forget_loss_ref(method, h.double(), w.double(), y, seg, n, rh.double(),
                                  rw.double(), pairs=pairs, bias=b.double(), ref_bias=b.double(),
                                  reduction="sum")
    want_logp = token_logprobs_ref(h, w, y, bias=b).float() * (seg >= 0)
    for chunk_rows, passes in ((64, 1), (4, 2)):
        hh, ww = _leaves(h, w)
        ref_logp = token_stats(rh, rw, y, bias=b, backend="chunked")[0]
        with AllocationRecorder() as rec:
            term, logp = sequence_forget_term(method, hh, ww, y, seg, n, pairs, ref_logp, bias=b,
                                              backend=backend, chunk_rows=chunk_rows)
            term.backward()
        assert _logit_rows(rec, v) == passes * n_valid, (chunk_rows, n_valid)
        torch.testing.assert_close(term.double(), want, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
        assert hh.grad is not None and ww.grad is not None


@pytest.mark.parametrize("method", ["npo", "simnpo", "idk_dpo"])
def test_closed_form_weights_are_the_formulas_gradients(method):
    """sequence_term_and_weights == autograd through forget_term_from_logprobs ("sum"), on
    any subset of whole sequences (what one chunk holds), and the chunks' terms add up."""
    g = torch.Generator().manual_seed(43)
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, -1, 4])
    pairs = torch.tensor([[1, 0], [3, 2]])
    logp = -torch.rand(seg.shape, generator=g, dtype=torch.float64) * 4
    logp_ref = -torch.rand(seg.shape, generator=g, dtype=torch.float64) * 4
    kw = dict(beta=0.7, gamma=0.3)
    for keep in (torch.arange(12), torch.arange(5), torch.arange(5, 10)):
        leaf = logp[keep].clone().requires_grad_()
        want = forget_term_from_logprobs(method, leaf, logp_ref[keep],
                                         torch.ones(keep.numel(), dtype=torch.bool), seg[keep],
                                         5, pairs, kw["beta"], kw["gamma"], "sum")
        want.backward()
        term, weight = sequence_term_and_weights(method, logp[keep], logp_ref[keep], seg[keep],
                                                 5, pairs, **kw)
        torch.testing.assert_close(term, want.detach())
        torch.testing.assert_close(weight, leaf.grad)
    halves = [sequence_term_and_weights(method, logp[k], logp_ref[k], seg[k], 5, pairs, **kw)[0]
              for k in (torch.arange(5), torch.arange(5, 12))]
    whole = sequence_term_and_weights(method, logp, logp_ref, seg, 5, pairs, **kw)[0]
    torch.testing.assert_close(halves[0] + halves[1], whole)


def test_group_chunks():
    assert group_chunks([3, 4, 2, 6], 7) == [7, 2, 6]
    assert group_chunks([3, 4, 2, 6], 6) == [3, 6, 6]
    assert group_chunks([3, 8], 7) is None
    assert group_chunks([], 7) == []


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_npo_and_idk_dpo_at_the_reference(backend):
    """At the reference, NPO gives 2 log 2 / beta per sequence and IdkDPO per pair, and NPO's
    gradient is that of the mean sequence log-likelihood (d/dS = 2 sigmoid(0) = 1)."""
    h, w, y, _rh, _rw, b, _rb = _case(34, 12, 47, torch.float32, seed=19)
    y, seg, n, pairs = _segments(y)
    beta = 0.1
    logp, logp_ref, _ = token_stats(h, w, y, h, bias=b, backend=backend, with_kl=False)
    S, S_ref = sequence_sums(logp, seg, n), sequence_sums(logp_ref, seg, n)
    torch.testing.assert_close(npo_loss(S, S_ref, beta),
                               torch.full((n,), 2 * math.log(2) / beta))
    torch.testing.assert_close(idk_dpo_loss(S[:2], S_ref[:2], S[2:4], S_ref[2:4], beta),
                               torch.full((2,), 2 * math.log(2) / beta))

    hh, ww = _leaves(h, w)
    npo = method_forget_loss("npo", hh, ww, y, seg, n, h, bias=b, beta=beta, backend=backend)
    torch.testing.assert_close(npo, torch.tensor(2 * math.log(2) / beta))
    npo.backward()
    h2, w2 = _leaves(h, w)
    S_seq, n_tok = sequence_logprobs_ref(h2, w2, y, seg, n, bias=b)
    (S_seq[n_tok > 0].sum() / (n_tok > 0).sum()).backward()
    torch.testing.assert_close(hh.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ww.grad, w2.grad, rtol=1e-4, atol=1e-6)
    dpo = method_forget_loss("idk_dpo", h, w, y, seg, n, h, pairs=pairs, bias=b, beta=beta,
                             backend=backend)
    torch.testing.assert_close(dpo, torch.tensor(2 * math.log(2) / beta))


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize("backend", loss_backends(), indirect=True)
def test_token_stats_never_allocates_batch_logits(backend):
    """No tensor of BT x V elements (H < BT, so dW's V x H stays below it); the reference
    backend does allocate the logits, which shows that the counting sees them."""
    bt, hd, v = 24, 16, 40
    h, w, y, rh, rw, b, rb = _case(bt, hd, v, torch.float32, seed=23)
    hh, ww, bb = _leaves(h, w, b)
    with AllocationRecorder() as rec:
        logp, _, kl = token_stats(hh, ww, y, rh, rw, bias=bb, ref_bias=rb, backend=backend,
                                  chunk_rows=8)
        (logp.sum() + kl.sum()).backward()
    assert hh.grad is not None and ww.grad is not None and bb.grad is not None
    big = rec.big_allocations(bt * v)
    assert (big != []) == (backend == "reference"), big


@pytest.mark.parametrize("backend", ["chunked"], indirect=True)
def test_token_stats_frozen_head_runs_no_dw_gemm(backend):
    """On the driver path a frozen head (LoRA) costs no dW GEMM in the backward (cpp runs the
    same driver code, its GEMMs inside the extension, out of the dispatcher's sight)."""
    if backend not in loss_backends():
        pytest.skip(f"{backend} does not run here")
    bt, hd, v = 24, 16, 40
    h, w, y, rh, rw, b, rb = _case(bt, hd, v, torch.float32, seed=23)
    (hh,) = _leaves(h)
    with AllocationRecorder() as rec:
        logp, _, kl = token_stats(hh, w, y, rh, rw, bias=b, backend=backend, chunk_rows=8)
        (logp.sum() + kl.sum()).backward()
    assert hh.grad is not None and rec.gemms_with_output((v, hd)) == []
    (ww,) = _leaves(w)
    with AllocationRecorder() as rec:
        token_stats(h, ww, y, rh, rw, bias=b, backend=backend)[0].sum().backward()
    assert len(rec.gemms_with_output((v, hd))) >= 1  # the counting sees a dW GEMM


def test_token_stats_op_registration():
    """opcheck of the driver path's forward and backward custom ops."""
    from fastunlearn.losses.token_stats import _stats_backward_op, _stats_op

    h, w, y, rh, rw, b, rb = _case(9, 4, 20, torch.float32, seed=29)
    h.requires_grad_()
    w.requires_grad_()
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    args = (h, w, y, rh, rw, b, rb, 5.0, 1.5, -100, 4, "chunked", True)
    torch.library.opcheck(_stats_op, args, test_utils=tests)
    g = torch.randn(9)
    torch.library.opcheck(_stats_backward_op,
                          (g, g, h, w, y, rh, rw, b, rb, 5.0, 1.5, -100, 4, "chunked", True,
                           True, True), test_utils=("test_schema", "test_faketensor"))


def test_sequence_term_op_registration():
    """opcheck of the one-pass sequence-term op (schema, fake tensors, autograd)."""
    from fastunlearn.losses.sequence_term import _sequence_term_op

    h, w, y, _rh, _rw, b, _rb = _case(9, 4, 20, torch.float32, seed=47)
    y = y.clamp(min=0)  # the op takes valid rows only
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    for t in (h, w, b):
        t.requires_grad_()
    args = (h, w, y, seg, torch.randn(9), None, b, "npo", 3, 0.5, 0.0, 5.0, 1.5, [5, 4],
            "chunked", True, True, True)
    torch.library.opcheck(_sequence_term_op, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


# ----------------------------------------------------------------------------- bad inputs

def _one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("backend", loss_backends(), indirect=True)
def test_token_stats_bad_inputs(backend):
    h, w, y, rh, rw, b, _rb = _case(10, 4, 20, torch.float32, seed=31)
    bad = y.clone()
    bad[2] = 20
    _one_line_error(lambda: token_stats(h, w, bad, rh, backend=backend), "label outside")
    _one_line_error(lambda: token_stats(h.half(), w, y, backend=backend), "float16")
    _one_line_error(lambda: token_stats(h, w, y[:5], backend=backend), "labels must be")
    _one_line_error(lambda: token_stats(h, w, y, rh[:5], backend=backend), "ref_hidden")
    _one_line_error(lambda: token_stats(h, w, y, bias=b[:3], backend=backend), "bias")
    _one_line_error(lambda: token_stats(h, w[:, :3], y, backend=backend), "weight")
    _one_line_error(lambda: token_stats(h, w, y, softcap=-1.0, backend=backend), "softcap")
    _one_line_error(lambda: token_stats(h, w, y.float(), backend=backend), "int64")


def test_method_bad_inputs():
    h, w, y, rh, rw, b, _rb = _case(30, 4, 20, torch.float32, seed=37)
    y, seg, n, pairs = _segments(y)
    S = torch.zeros(3)
    for beta in (0.0, -1.0, float("nan"), float("inf")):
        _one_line_error(lambda beta=beta: npo_loss(S, S, beta), "beta")
    _one_line_error(lambda: simnpo_loss(S, S, 1.0, float("nan")), "gamma")
    _one_line_error(lambda: npo_loss(S, torch.zeros(2), 1.0), "shape")
    _one_line_error(lambda: rmu_loss(torch.zeros(3, 4), torch.zeros(5)), "hidden size")
    _one_line_error(lambda: rmu_loss(torch.zeros(3, 4), torch.zeros(2, 4)), "broadcast")
    _one_line_error(lambda: rmu_control_vector(8, 0.0), "steer")
    _one_line_error(lambda: sequence_sums(S, torch.tensor([0, 1, 3]), 3), "below n_segments")
    _one_line_error(lambda: sequence_sums(S, torch.zeros(3), 3), "segment")
    _one_line_error(lambda: sequence_sums(S, torch.zeros(3, dtype=torch.long), -1), ">= 0")
    call = (lambda method, **kw: method_forget_loss(method, h, w, y, seg, n, backend="chunked",
                                                    **kw))
    _one_line_error(lambda: call("nope"), "unknown method")
    _one_line_error(lambda: call("rmu"), "rmu_loss")
    _one_line_error(lambda: call("npo"), "ref_hidden")
    _one_line_error(lambda: method_forget_loss("idk_dpo", h, w, y, seg, n, rh, pairs=None,
                                               backend="chunked"), "pairs")
    _one_line_error(lambda: method_forget_loss("idk_dpo", h, w, y, seg, n, rh, pairs=pairs + 4,
                                               backend="chunked"), "pairs")
    _one_line_error(lambda: call("simnpo", reduction="max"), "reduction")
    _one_line_error(lambda: method_forget_loss("simnpo", h, w, y, seg[:4], n), "segment")
