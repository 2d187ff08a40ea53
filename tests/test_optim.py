"""StochasticRoundingAdamW and its rounding, against torch.optim.AdamW and fp32 math.

The Triton kernel runs on CPU tensors through the Triton interpreter (impl="triton")."""
import pytest
import torch

from fastunlearn.optim import StochasticRoundingAdamW, adamw_sr_torch, stochastic_round_to_bf16

IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.filterwarnings("ignore"))]
BF16_IMPLS = [*IMPLS, "cpp"]  # the C++ step takes bf16 parameters only


def _needs(impl):
    if impl == "triton":
        pytest.importorskip("triton")


def _step(impl, p, g, m, v, seed, **hyper):
    """One in-place step through the named implementation."""
    if impl == "triton":
        from fastunlearn.triton_kernels.adamw_sr import adamw_sr_fwd

        adamw_sr_fwd(p, g, m, v, seed=seed, **hyper)
    elif impl == "cpp":
        from fastunlearn.losses import cpp_backend

        cpp_backend.load().adamw_sr_step(p, g, m, v, seed=seed, **hyper)
    else:
        adamw_sr_torch(p, g, m, v, generator=torch.Generator().manual_seed(seed), **hyper)


def _bf16_neighbours(x: torch.Tensor):
    """The largest bf16 <= x and the smallest bf16 >= x, as fp32."""
    near = x.to(torch.bfloat16)
    inf = torch.full_like(near, float("inf"))
    down = torch.where(near.float() > x, torch.nextafter(near, -inf), near)
    up = torch.where(near.float() < x, torch.nextafter(near, inf), near)
    return down.float(), up.float()


def test_rounding_is_unbiased_and_lands_on_a_neighbour():
    g = torch.Generator().manual_seed(0)
    x = 1.0 + torch.rand(64, generator=g) * 2**-7  # between 1 and the next bf16 up
    draws = torch.stack([stochastic_round_to_bf16(x, g).float() for _ in range(4000)])
    down, up = _bf16_neighbours(x)
    assert bool(((draws == down) | (draws == up)).all())
    p_up = (x - down) / (up - down)
    # 4000 Bernoulli draws per value: the observed rate is within 5 sigma of the true one
    sigma = (p_up * (1 - p_up) / 4000).sqrt().clamp_min(1e-3)
    assert bool(((draws == up).float().mean(0) - p_up).abs().le(5 * sigma).all())


def test_rounding_keeps_exact_values_signs_and_infinities():
    exact = torch.tensor([0.0, 1.0, -2.5, 3.0e38, -1.0e-30]).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)
    inf = torch.tensor([float("inf"), -float("inf")])
    assert torch.equal(stochastic_round_to_bf16(inf).float(), inf)
    neg = -(1.0 + torch.full((2000,), 2**-9))
    got = stochastic_round_to_bf16(neg).float()
    assert set(got.tolist()) == {-1.0, -(1.0 + 2**-7)}
    with pytest.raises(TypeError, match="float32"):
        stochastic_round_to_bf16(neg.double())


def _run(opt_cls, params, grads, steps, **kw):
    opt = opt_cls(params, **kw)
    for i in range(steps):
        for p, g in zip(params, grads):
            p.grad = (g * (1 + 0.1 * i)).to(p.dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_parameters_get_exactly_adamw(impl):
    _needs(impl)
    torch.manual_seed(0)
    shapes = [(7, 5), (33,), (3, 4, 2)]
    init = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt = _run(StochasticRoundingAdamW, ours, grads, 5, impl=impl, **kw)
    _run(torch.optim.AdamW, ref, grads, 5, **kw)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    state = opt.state[ours[0]]
    assert state["step"] == 5 and state["exp_avg"].dtype == torch.float32


def test_strided_parameter_is_updated_in_place():
    torch.manual_seed(1)
    base = torch.randn(5, 3)
    ours = torch.nn.Parameter(base.clone().t())  # non-contiguous
    ref = torch.nn.Parameter(base.clone().t())
    grad = torch.randn(3, 5)
    _run(StochasticRoundingAdamW, [ours], [grad], 3, lr=1e-2, impl="torch")
    _run(torch.optim.AdamW, [ref], [grad], 3, lr=1e-2)
    assert not ours.is_contiguous()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", BF16_IMPLS)
def test_bf16_small_updates_accumulate_where_plain_adamw_loses_them(impl):
    _needs(impl)
    n, steps, lr = 4096, 40, 1e-4  # each update is 1/78 of a bf16 spacing at 1.0
    grad = torch.ones(n)
    plain = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    _run(torch.optim.AdamW, [plain], [grad], steps, lr=lr, weight_decay=0.0)
    assert torch.equal(plain.float(), torch.ones(n))  # round to nearest: nothing moved

    fp32 = torch.nn.Parameter(torch.ones(n))
    _run(torch.optim.AdamW, [fp32], [grad], steps, lr=lr, weight_decay=0.0)
    ours = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = _run(StochasticRoundingAdamW, [ours], [grad], steps, lr=lr, weight_decay=0.0,
               impl=impl, seed=3)
    moved, expected = 1.0 - ours.detach().float().mean(), 1.0 - fp32.detach().mean()
    # Per element the rounding noise is a random walk (std ~6e-3 here); the mean of 4096 is
    # within 5e-4 of the fp32 run's movement (4e-3), i.e. about 5 standard errors.
    assert abs(float(moved - expected)) < 5e-4, (float(moved), float(expected))
    state = opt.state[ours]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16


@pytest.mark.parametrize("impl", BF16_IMPLS)
def test_bf16_step_lands_next_to_the_fp32_result(impl):
    _needs(impl)
    torch.manual_seed(2)
    n = 3000
    p0, g, m0, v0 = torch.randn(n), torch.randn(n), torch.randn(n) * 0.1, torch.rand(n) * 0.1
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, decay=1 - 1e-3 * 0.01, step_size=1e-3 / 0.1,
                 inv_bc2_sqrt=1 / 0.001 ** 0.5)
    exact = [t.clone() for t in (p0, g, m0, v0)]
    adamw_sr_torch(*exact, **hyper)  # fp32 destinations: plain AdamW math
    tensors = [t.to(torch.bfloat16) for t in (p0, g, m0, v0)]
    exact_from_bf16 = [t.float() for t in tensors]
    adamw_sr_torch(*exact_from_bf16, **hyper)
    _step(impl, *tensors, seed=11, **hyper)
    for got, want in zip((tensors[0], tensors[2], tensors[3]),
                         (exact_from_bf16[0], exact_from_bf16[2], exact_from_bf16[3])):
        # The kernel's fp32 op order differs from PyTorch's by a few fp32 ulps of the inputs;
        # beyond that slack every value is one of the two bf16 neighbours of the exact result.
        down, up = _bf16_neighbours(want)
        slack = 1e-6 * sum(t.float().abs() for t in (p0, g, m0, v0))
        assert bool(((got.float() >= down - slack) & (got.float() <= up + slack)).all())
        assert not torch.equal(got.float(), want.to(torch.bfloat16).float())  # not nearest


def test_explicit_state_dtype_and_argument_errors():
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = StochasticRoundingAdamW([p], lr=1e-3, state_dtype=torch.float32, impl="torch")
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
    with pytest.raises(ValueError, match="impl"):
        StochasticRoundingAdamW([p], impl="cuda")
    with pytest.raises(ValueError, match="betas"):
        StochasticRoundingAdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        StochasticRoundingAdamW([p], lr=-1.0)
    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        StochasticRoundingAdamW(emb.parameters(), impl="torch").step()


def test_works_with_an_lr_scheduler_and_a_closure():
    p = torch.nn.Parameter(torch.ones(4))
    opt = StochasticRoundingAdamW([p], lr=1.0, weight_decay=0.0, impl="torch")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # lr 0: nothing moves

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure)) == 4.0
    sched.step()
    assert torch.equal(p.detach(), torch.ones(4))


@pytest.mark.parametrize("impl", BF16_IMPLS)
def test_kernel_random_bits_give_the_right_rounding_rates(impl):
    """m = 0.75 * 1 + 0.25 * (1 + 2^-7) = 1 + 2^-9: a quarter of the way to the next bf16, so a
    quarter of the elements round up; every seed draws a fresh set."""
    _needs(impl)
    n = 20000
    hyper = dict(beta1=0.75, beta2=0.5, eps=1.0, decay=1.0, step_size=0.0, inv_bc2_sqrt=1.0)
    rates = []
    ups = []
    for seed in (1, 2):
        p, m, v = (torch.ones(n, dtype=torch.bfloat16) for _ in range(3))
        g = torch.full((n,), 1 + 2**-7, dtype=torch.bfloat16)
        _step(impl, p, g, m, v, seed, **hyper)
        assert set(m.float().unique().tolist()) == {1.0, 1 + 2**-7}
        up = m.float() > 1
        rates.append(float(up.float().mean()))
        ups.append(up)
    sigma = (0.25 * 0.75 / n) ** 0.5
    assert all(abs(r - 0.25) < 5 * sigma for r in rates), rates
    assert not torch.equal(ups[0], ups[1])
    # with independent draws the two seeds agree on about 0.25^2 + 0.75^2 of the elements
    assert abs(float((ups[0] == ups[1]).float().mean()) - 0.625) < 0.02


@pytest.mark.gpu
def test_cuda_kernel_matches_adamw_and_keeps_small_updates():
    """The compiled kernel (impl auto on CUDA): fp32 == torch AdamW; bf16 tracks fp32."""
    pytest.importorskip("triton")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    init, grad = torch.randn(1 << 20, device=dev), torch.randn(1 << 20, device=dev)
    ours, ref = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt = _run(StochasticRoundingAdamW, [ours], [grad], 3, lr=1e-2, weight_decay=0.1)
    _run(torch.optim.AdamW, [ref], [grad], 3, lr=1e-2, weight_decay=0.1)
    assert opt._path(ours, opt.state[ours]["exp_avg"]) == "triton"
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)

    n, steps, lr = 1 << 20, 40, 1e-4
    ones = torch.ones(n, device=dev)
    bf16 = torch.nn.Parameter(torch.ones(n, device=dev, dtype=torch.bfloat16))
    fp32 = torch.nn.Parameter(torch.ones(n, device=dev))
    _run(StochasticRoundingAdamW, [bf16], [ones], steps, lr=lr, weight_decay=0.0)
    _run(torch.optim.AdamW, [fp32], [ones], steps, lr=lr, weight_decay=0.0)
    moved, expected = 1 - bf16.detach().float().mean(), 1 - fp32.detach().mean()
    assert abs(float(moved - expected)) < 1e-4, (float(moved), float(expected))


def test_cpp_and_triton_draw_the_same_random_bits():
    """Same seed, same element: the C++ loop and the Triton kernel round alike (they differ only
    where fp32 operation order moves a value across a rounding threshold)."""
    pytest.importorskip("triton")
    torch.manual_seed(4)
    n = 5000
    base = [torch.randn(n).to(torch.bfloat16), torch.randn(n).to(torch.bfloat16),
            (torch.randn(n) * 0.1).to(torch.bfloat16), (torch.rand(n) * 0.1).to(torch.bfloat16)]
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, decay=0.9999, step_size=1e-2,
                 inv_bc2_sqrt=3.0)
    runs = {}
    for impl in ("cpp", "triton"):
        tensors = [t.clone() for t in base]
        _step(impl, *tensors, seed=77, **hyper)
        runs[impl] = tensors
    for i in (0, 2, 3):
        same = (runs["cpp"][i] == runs["triton"][i]).float().mean()
        assert float(same) > 0.995, (i, float(same))


def test_cpp_step_rejects_bad_tensors():
    from fastunlearn.losses import cpp_backend

    ext = cpp_backend.load()
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, decay=1.0, step_size=1e-3, inv_bc2_sqrt=1.0,
                 seed=1)
    bf = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ext.adamw_sr_step(torch.zeros(4), torch.zeros(4), bf, bf.clone(), **hyper)
    with pytest.raises(RuntimeError, match="same number"):
        ext.adamw_sr_step(bf, torch.zeros(3, dtype=torch.bfloat16), bf.clone(), bf.clone(),
                          **hyper)
    with pytest.raises(RuntimeError, match="both"):
        ext.adamw_sr_step(bf, bf.clone(), bf.clone(), torch.zeros(4), **hyper)


def test_auto_picks_the_cpp_step_for_bf16_on_cpu():
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.ones(8))
    opt = StochasticRoundingAdamW([p, q], lr=1e-3)
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    assert opt._path(p, opt.state[p]["exp_avg"]) == "cpp"
    assert opt._path(q, opt.state[q]["exp_avg"]) == "torch"


def test_state_dict_round_trip_keeps_moments_and_step():
    p = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
    opt = StochasticRoundingAdamW([p], lr=1e-2)
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    fresh = StochasticRoundingAdamW([q], lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    a, b = opt.state[p], fresh.state[q]
    assert b["step"] == a["step"] == 1
    for key in ("exp_avg", "exp_avg_sq"):
        assert b[key].dtype == torch.bfloat16 and torch.equal(b[key], a[key])
    q.grad = torch.full_like(q, 0.5)
    fresh.step()
    assert fresh.state[q]["step"] == 2


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_rng_state_round_trip_repeats_the_same_rounding(impl):
    """A resumed run draws the same rounding bits: rng_state / load_rng_state restore them."""
    def fresh():
        p = torch.nn.Parameter(torch.randn(257, generator=torch.Generator().manual_seed(1))
                               .to(torch.bfloat16))
        return p, StochasticRoundingAdamW([p], lr=1e-3, impl=impl, seed=5)

    p, opt = fresh()
    p.grad = torch.randn_like(p)
    opt.step()
    saved, weights, state = opt.rng_state(), p.detach().clone(), opt.state_dict()
    opt.step()
    want = p.detach().clone()
    q, other = fresh()
    with torch.no_grad():
        q.copy_(weights)
    other.load_state_dict(state)
    other.load_rng_state(saved)
    q.grad = p.grad.clone()
    other.step()
    assert torch.equal(q.detach(), want)
