"""Triton backend on a real GPU: real head shapes in bf16 (2x rule), determinism, no host
sync, int64 offsets, strict mode. Every test is marked ``gpu`` (skipped without CUDA)."""
import pytest
import torch

from fastunlearn.losses import token_stats_ref, unlearn_loss, unlearn_loss_ref

pytestmark = pytest.mark.gpu

HEADS = [(8192, 576, 49152), (2048, 2048, 128256), (1024, 4096, 128256)]


def _tb():
    from fastunlearn.losses import triton_backend

    return triton_backend


def _case(bt, h, v, dtype, seed=0, ignore_frac=0.2):
    """Like tests.loss_cases.make_case, generated on the GPU (large heads)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=g)
    hidden = torch.randn(bt, h, **kw)
    weight = torch.randn(v, h, **kw) / h**0.5
    labels = torch.randint(0, v, (bt,), **kw)
    labels[torch.rand(bt, **kw) < ignore_frac] = -100
    kind = torch.randint(0, 3, (bt,), **kw)
    ref_hidden = hidden + 0.3 * torch.randn(bt, h, **kw)
    ref_weight = weight + 0.05 * torch.randn(v, h, **kw) / h**0.5
    return (hidden.to(dtype), weight.to(dtype), labels, kind, ref_hidden.to(dtype),
            ref_weight.to(dtype))


def _loss_grads(fn, h, w):
    """(loss, dX, dW, terms (3,)) of fn(h, w) -> LossOutput, with fresh leaves of h's and
    w's dtype (pass fp32 copies for an fp32 reference: its gradients stay fp32)."""
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = fn(h, w)
    out.loss.backward()
    terms = torch.stack([out.forget_nll, out.mismatch_nll, out.normal_kl]).detach().double()
    return out.loss.detach().double(), h.grad.float(), w.grad.float(), terms


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("shape", HEADS, ids=lambda s: "x".join(map(str, s)))
def test_bf16_real_heads_two_x_rule(shape):
    """Error against an fp32 reference <= 2x the error of the naive bf16 computation.

    The loss is judged on the sum of the three terms' absolute errors (one scalar alone can
    be lucky for the naive side), with a noise floor of 1e-4."""
    h, w, y, k, rh, rw = _case(*shape, torch.bfloat16)
    ref = _loss_grads(lambda a, b: unlearn_loss_ref(
        a, b, y, k, rh.float(), rw.float(), compute_dtype=torch.float32), h.float(), w.float())
    naive = _loss_grads(lambda a, b: unlearn_loss_ref(
        a, b, y, k, rh, rw, compute_dtype=torch.bfloat16), h, w)
    got = _loss_grads(lambda a, b: unlearn_loss(a, b, y, k, rh, rw, backend="triton"), h, w)
    err_terms = float((got[3] - ref[3]).abs().sum())
    naive_terms = float((naive[3] - ref[3]).abs().sum())
    print(shape, "terms err", err_terms, "naive", naive_terms)
    assert err_terms <= 2 * naive_terms + 1e-4, (err_terms, naive_terms)
    for i, name in ((1, "dX"), (2, "dW")):
        e, n = _rel(got[i], ref[i]), _rel(naive[i], ref[i])
        print(shape, name, "rel err", e, "naive", n)
        assert e <= 2 * n + 1e-6, (name, e, n)
        assert e < 5e-2, (name, e)


def test_deterministic_bit_identical():
    h, w, y, k, rh, rw = _case(4096, 1024, 50000, torch.bfloat16, seed=1)
    a = _loss_grads(lambda a_, b_: unlearn_loss(a_, b_, y, k, rh, rw, backend="triton",
                                                chunk_rows=1024), h, w)
    b = _loss_grads(lambda a_, b_: unlearn_loss(a_, b_, y, k, rh, rw, backend="triton",
                                                chunk_rows=1024), h, w)
    for x, z in zip(a, b):
        assert torch.equal(x, z)


def test_forward_and_backward_have_no_host_sync():
    """With host-side counts (num_rows, as the trainer passes them) nothing is read back."""
    h, w, y, k, rh, rw = _case(1024, 256, 32000, torch.bfloat16, seed=2)
    valid = (y != -100).cpu()
    kc = k.cpu()
    num = [int((valid & (kc == i)).sum()) for i in range(3)]

    def run():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = unlearn_loss(hh, ww, y, k, rh, rw, backend="triton", chunk_rows=256,
                           num_rows=num)
        out.loss.backward()
        return out.loss.detach()

    base = run()  # warm-up: compiles, probes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(again, base)


def test_bad_rows_are_reported_one_call_late_without_a_sync():
    h, w, y, k, rh, rw = _case(256, 64, 4000, torch.bfloat16, seed=8, ignore_frac=0.0)
    k[3] = 5
    num = [int((k.cpu() == i).sum()) for i in range(3)]
    unlearn_loss(h, w, y, k, rh, rw, backend="triton", num_rows=num)  # flag left on device
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="kind outside"):
        unlearn_loss(h, w, y, k % 3, rh, rw, backend="triton")


def test_int64_offsets_huge_chunk():
    """A chunk holding > 2^31 logits must give what small chunks give."""
    h, w, y, k, rh, rw = _case(17000, 64, 128256, torch.float32, seed=3, ignore_frac=0.0)
    k = k % 2  # forget / mismatch only: one chunk of 17000 x 128256 = 2.18e9 > 2^31 logits
    a = _loss_grads(lambda a_, b_: unlearn_loss(a_, b_, y, k, rh, rw, backend="triton",
                                                chunk_rows=17000), h, w)
    b = _loss_grads(lambda a_, b_: unlearn_loss(a_, b_, y, k, rh, rw, backend="triton",
                                                chunk_rows=1024), h, w)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a[2], b[2], rtol=1e-4, atol=1e-6)


def test_fp32_matches_reference_on_gpu():
    h, w, y, k, rh, rw = _case(300, 64, 5000, torch.float32, seed=4)
    b = torch.randn(5000, device="cuda")
    kw = dict(softcap=15.0)

    def run(fn):
        hh = h.clone().requires_grad_()
        ww = w.clone().requires_grad_()
        bb = b.clone().requires_grad_()
        out = fn(hh, ww, bb)
        (out.loss * -2.0).backward()
        return out.loss.detach(), hh.grad, ww.grad, bb.grad

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = run(lambda a, c, d: unlearn_loss_ref(a.double(), c.double(), y, k, rh.double(),
                                                   rw.double(), bias=d.double(),
                                                   ref_bias=d.detach().double(), **kw))
        got = run(lambda a, c, d: unlearn_loss(a, c, y, k, rh, rw, bias=d, ref_bias=d.detach(),
                                               backend="triton", chunk_rows=128, **kw))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5, atol=1e-6)
    for a, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a.double(), r.double(), rtol=5e-4, atol=1e-6)


def test_strict_mode_uses_a_kernel_backend(monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_STRICT", "1")
    h, w, y, k, rh, rw = _case(256, 128, 4000, torch.bfloat16, seed=5)
    out = unlearn_loss(h, w, y, k, rh, rw, backend="triton")
    assert out.backend == "triton"
    auto = unlearn_loss(h, w, y, k, rh, rw, backend="auto")  # must not fall back silently
    assert auto.backend not in ("chunked", "reference")


def test_token_stats_bf16_two_x_rule():
    h, w, y, _k, rh, rw = _case(1024, 1024, 65536, torch.bfloat16, seed=6)
    g = torch.Generator(device="cpu").manual_seed(0)
    g_logp = torch.randn(1024, generator=g).cuda()
    g_kl = torch.randn(1024, generator=g).cuda()

    def run(fn, hh, ww):
        hh = hh.clone().requires_grad_()
        ww = ww.clone().requires_grad_()
        logp, logp_ref, kl = fn(hh, ww)
        (g_logp * logp.float() + g_kl * kl.float()).sum().backward()
        return logp.float(), logp_ref.float(), kl.float(), hh.grad.float(), ww.grad.float()

    ref = run(lambda a, b: token_stats_ref(a, b, y, rh.float(), rw.float()), h.float(),
              w.float())
    naive = run(lambda a, b: token_stats_ref(a, b, y, rh, rw, compute_dtype=torch.bfloat16),
                h, w)
    got = run(lambda a, b: _tb().token_stats(a, b, y, rh, rw), h, w)
    for i, name in enumerate(("logp", "logp_ref", "kl", "dX", "dW")):
        e, n = _rel(got[i], ref[i]), _rel(naive[i], ref[i])
        assert e <= 2 * n + 1e-6, (name, e, n)


def test_torch_compile_inductor_gpu():
    h, w, y, k, rh, rw = _case(512, 256, 8000, torch.bfloat16, seed=7)

    def step(h_, w_):
        return unlearn_loss(h_.float().to(h_.dtype), w_, y, k, rh, rw, backend="triton").loss

    compiled = torch.compile(step, fullgraph=False)
    results = []
    for fn in (compiled, step):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(hh, ww)
        loss.backward()
        results.append((loss.detach(), hh.grad, ww.grad))
    for x, z in zip(*results):
        torch.testing.assert_close(x, z)


def test_fp32_dw_accumulation_uses_out_dtype_gemm():
    """On CUDA the bf16 GEMM with fp32 output (beta = 1 into dW) must be available;
    the upcast fallback is exact but several times slower."""
    from fastunlearn.triton_kernels import dw_accumulate as fl

    mode = fl._probe_addmm_f32(torch.device("cuda"))
    print("dW accumulation mode:", mode, "torch", torch.__version__)
    assert mode in ("addmm", "mm")
    a = torch.randn(64, 5000, device="cuda").bfloat16()
    b = torch.randn(64, 96, device="cuda").bfloat16()
    dw = torch.randn(5000, 96, device="cuda")
    want = dw.double() + a.double().T @ b.double()
    fl.accumulate_dw(dw, a, b)
    torch.testing.assert_close(dw.double(), want, rtol=1e-5, atol=1e-4)
