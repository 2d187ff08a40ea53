"""Triton backend of the fused loss on CPU through the Triton interpreter (TRITON_INTERPRET=1).

Shapes are tiny: the interpreter runs every program in Python. Tiles of 32 columns
(FASTUNLEARN_TRITON_BLOCK_V) make every vocabulary here span several tiles.
"""
import importlib.util

import pytest
import torch

pytest.importorskip("triton")

from fastunlearn.losses import unlearn_loss, unlearn_loss_ref  # noqa: E402
from fastunlearn.losses.registry import (  # noqa: E402
    BackendUnavailableError,
    get_backend,
    resolve_backend,
)
from tests.loss_cases import make_case, run_with_grads  # noqa: E402

TERMS = ("loss", "forget_nll", "mismatch_nll", "normal_kl")
COUNTS = ("n_forget", "n_mismatch", "n_normal")


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTUNLEARN_TRITON_BLOCK_V", "32")


def _tb():
    from fastunlearn.losses import triton_backend

    return triton_backend


def _ref(h, w, y, k, rh, rw, b=None, **kw):
    return lambda h_, w_, b_: unlearn_loss_ref(
        h_.double(), w_.double(), y, k, None if rh is None else rh.double(),
        None if rw is None else rw.double(), bias=None if b_ is None else b_.double(),
        ref_bias=None if b_ is None else b_.detach().double(), **kw)


def _tri(y, k, rh, rw, **kw):
    return lambda h_, w_, b_: unlearn_loss(h_, w_, y, k, rh, rw, bias=b_,
                                           ref_bias=None if b_ is None else b_.detach(),
                                           backend="triton", **kw)


def _assert_match(got, ref, grads_got, grads_ref, grad_rtol=2e-4):
    assert got.backend == "triton"
    for name in TERMS:
        torch.testing.assert_close(getattr(got, name).double(), getattr(ref, name).double(),
                                   rtol=1e-5, atol=1e-6, msg=name)
    for name in COUNTS:
        assert int(getattr(got, name)) == int(getattr(ref, name)), name
    for a, b in zip(grads_got, grads_ref):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a.double(), b.double(), rtol=grad_rtol, atol=1e-6)


@pytest.mark.parametrize("shape", [(37, 31, 123), (5, 3, 7), (48, 16, 300)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_reference(shape, reduction):
    h, w, y, k, rh, rw = make_case(*shape, dtype=torch.float32, seed=sum(shape))
    ref = run_with_grads(_ref(h, w, y, k, rh, rw, reduction=reduction), h, w)
    got = run_with_grads(_tri(y, k, rh, rw, reduction=reduction, chunk_rows=16), h, w)
    _assert_match(got[0], ref[0], got[1:], ref[1:])


@pytest.mark.parametrize("grad_output", [1.0, 2.0, -1.0])
def test_grad_output_bias_softcap(grad_output):
    h, w, y, k, rh, rw = make_case(29, 12, 77, dtype=torch.float32, seed=3, scale=3.0)
    b = torch.randn(77, generator=torch.Generator().manual_seed(1))
    kw = dict(softcap=8.0, eps_forget=0.7, eps_mismatch=1.3, eps_normal=0.9)
    ref = run_with_grads(_ref(h, w, y, k, rh, rw, **kw), h, w, b, grad_output)
    got = run_with_grads(_tri(y, k, rh, rw, chunk_rows=8, **kw), h, w, b, grad_output)
    _assert_match(got[0], ref[0], got[1:], ref[1:])


def test_kind_absent_and_no_reference():
    h, w, y, k, rh, rw = make_case(20, 8, 50, dtype=torch.float32, kinds=(0, 2), seed=5)
    ref = run_with_grads(_ref(h, w, y, k, rh, rw), h, w)
    got = run_with_grads(_tri(y, k, rh, rw), h, w)
    _assert_match(got[0], ref[0], got[1:], ref[1:])
    assert int(got[0].n_mismatch) == 0 and float(got[0].mismatch_nll) == 0.0
    # without a reference the normal rows drop out (count 0), as in the specification
    ref = run_with_grads(_ref(h, w, y, k, None, None), h, w)
    got = run_with_grads(_tri(y, k, None, None), h, w)
    _assert_match(got[0], ref[0], got[1:], ref[1:])
    assert int(got[0].n_normal) == 0


def test_all_rows_ignored():
    h, w, y, k, rh, rw = make_case(20, 8, 50, dtype=torch.float32)
    out, dh, dw, _ = run_with_grads(_tri(torch.full_like(y, -100), k, rh, rw), h, w)
    assert float(out.loss.detach()) == 0.0
    assert int(out.n_forget + out.n_mismatch + out.n_normal) == 0
    assert dh.abs().max() == 0 and dw.abs().max() == 0


def test_reference_is_policy_kl_exactly_zero():
    h, w, y, k, _, _ = make_case(24, 8, 70, dtype=torch.float32, seed=7)
    normal = torch.full_like(k, 2)
    out, dh, dw, _ = run_with_grads(lambda h_, w_, b_: unlearn_loss(
        h_, w_, y, normal, h_.detach(), w_.detach(), backend="triton", chunk_rows=5), h, w)
    assert float(out.normal_kl) == 0.0
    assert dh.abs().max() == 0 and dw.abs().max() == 0


def test_non_contiguous_hidden_and_tied_weights():
    h, w, y, k, rh, _ = make_case(30, 16, 40, dtype=torch.float32, seed=11)
    wide = torch.randn(30, 32)
    wide[:, ::2] = h
    emb = torch.nn.Embedding(40, 16)
    wide_leaf = wide.clone().requires_grad_()
    assert not wide_leaf[:, ::2].is_contiguous()
    out = unlearn_loss(wide_leaf[:, ::2], emb.weight, y, k, rh, emb.weight, backend="triton")
    out.loss.backward()
    hd = h.double().requires_grad_()
    wd = emb.weight.detach().double().requires_grad_()
    ref = unlearn_loss_ref(hd, wd, y, k, rh.double(), wd.detach())
    ref.loss.backward()
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wide_leaf.grad[:, ::2].double(), hd.grad, rtol=2e-4, atol=1e-6)
    assert wide_leaf.grad[:, 1::2].abs().max() == 0
    torch.testing.assert_close(emb.weight.grad.double(), wd.grad, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["hint", "nosync"])
def test_sync_modes_agree(mode):
    """num_rows from the host, or no sync at all (every row through the GEMMs), give the
    same loss and gradients as the default (one count sync)."""
    h, w, y, k, rh, rw = make_case(26, 8, 45, dtype=torch.float32, seed=13)
    tb = _tb()
    kw = dict(eps_forget=0.5, eps_mismatch=1.0, eps_normal=1.0, chunk_rows=7)
    base = run_with_grads(lambda a, b_, _c: tb.triton_unlearn_loss(a, b_, y, k, rh, rw, **kw),
                          h, w)
    if mode == "hint":
        valid = y != -100
        num = [int((valid & (k == i)).sum()) for i in range(3)]
        got = run_with_grads(lambda a, b_, _c: tb.triton_unlearn_loss(
            a, b_, y, k, rh, rw, num_rows=num, **kw), h, w)
    else:
        import os

        os.environ["FASTUNLEARN_TRITON_SYNC"] = "0"
        try:
            got = run_with_grads(lambda a, b_, _c: tb.triton_unlearn_loss(
                a, b_, y, k, rh, rw, **kw), h, w)
        finally:
            del os.environ["FASTUNLEARN_TRITON_SYNC"]
    _assert_match(got[0], base[0], got[1:], base[1:], grad_rtol=1e-5)


def test_deterministic():
    h, w, y, k, rh, rw = make_case(21, 8, 40, dtype=torch.float32, seed=17)
    a = run_with_grads(_tri(y, k, rh, rw, chunk_rows=6), h, w)
    b = run_with_grads(_tri(y, k, rh, rw, chunk_rows=6), h, w)
    assert torch.equal(a[0].loss, b[0].loss)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_availability_and_registry(monkeypatch):
    tb = _tb()
    assert tb.availability("cpu")[0]
    assert resolve_backend("triton", "cpu").name == "triton"
    be = get_backend("triton")
    assert be.priority == 100 and set(be.devices) == {"cpu", "cuda"}
    monkeypatch.delenv("TRITON_INTERPRET")
    ok, why = be.available("cpu")  # so `auto` never picks triton for cpu tensors
    assert not ok and "TRITON_INTERPRET" in why
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        resolve_backend("triton", "cpu")


def test_bad_inputs():
    h, w, y, k, rh, rw = make_case(6, 4, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        unlearn_loss(h, w, y, k, rh, rw, backend="triton")
    with pytest.raises(ValueError, match="softcap"):
        unlearn_loss(h.float(), w.float(), y, k, rh.float(), rw.float(), backend="triton",
                     softcap=-1.0)


def test_installed_under_fastunlearn_namespace():
    import fastunlearn.triton_kernels as ours
    from fastunlearn.triton_kernels import fused_loss, unlearn_rows  # noqa: F401

    assert ours.__file__.replace("\\", "/").endswith("triton_kernels/__init__.py")
    spec = importlib.util.find_spec("fastunlearn.triton_kernels.unlearn_rows")
    assert spec is not None and "fastunlearn" not in spec.origin.split("triton_kernels")[-1]


def test_custom_op_registered_and_fake():
    tb = _tb()
    assert tb._unlearn_op is not None
    assert hasattr(torch.ops.fastunlearn, "triton_unlearn_loss")
    from torch._subclasses.fake_tensor import FakeTensorMode

    h, w, y, k, rh, rw = make_case(9, 4, 11, dtype=torch.float32)
    with FakeTensorMode() as mode:
        fh, fw, fy, fk, frh = (mode.from_tensor(t) for t in (h, w, y, k, rh))
        loss, terms, counts, dx, dw, db = torch.ops.fastunlearn.triton_unlearn_loss(
            fh, fw, fy, fk, frh, None, None, None, 0.5, 1.0, 1.0, None, "mean", -100, None,
            None)
    assert loss.shape == () and terms.shape == (3,) and counts.dtype == torch.int64
    assert dx.shape == h.shape and dw.shape == w.shape and dw.dtype == torch.float32


def test_torch_compile_runs():
    h, w, y, k, rh, rw = make_case(12, 8, 40, dtype=torch.float32, seed=19)

    def step(h_, w_):
        out = unlearn_loss(h_ * 1.5, w_, y, k, rh, rw, backend="triton")
        return out.loss * 2.0

    compiled = torch.compile(step, fullgraph=False, backend="aot_eager")
    hg = h.clone().requires_grad_()
    loss = compiled(hg, w)
    loss.backward()
    he = h.clone().requires_grad_()
    want = step(he, w)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(hg.grad, he.grad)


@pytest.mark.parametrize("dtype,features", [("*bf16", True), ("*fp32", False)])
def test_kernel_compiles_for_sm90(monkeypatch, dtype, features):
    """The interpreter accepts code the compiler rejects (or miscompiles, e.g. updates of
    Python-float variables inside a runtime `if`): compile the real kernel for sm_90 without
    a GPU, all the way to a cubin."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as exc:  # pragma: no cover - depends on the Triton build
        pytest.skip(f"no ahead-of-time compiler: {exc}")
    from fastunlearn.triton_kernels import unlearn_rows
    from fastunlearn.triton_kernels._variants import load_variant

    fn = load_variant(unlearn_rows.__file__, interpret=False)._unlearn_rows_fwd_kernel
    sig = {"z_ptr": dtype, "z_stride": "i64", "zr_ptr": dtype, "zr_stride": "i64",
           "ref_idx_ptr": "*i32", "y_ptr": "*i64", "a_ptr": "*fp32", "b_ptr": "*fp32",
           "bias_ptr": "*fp32", "ref_bias_ptr": "*fp32", "nll_ptr": "*fp32", "kl_ptr": "*fp32",
           "ref_nll_ptr": "*fp32", "V": "i32", "softcap": "fp32"}
    consts = {"HAS_REF": features, "HAS_BIAS": features, "HAS_REF_BIAS": features,
              "SOFTCAP": features, "WRITE_GRAD": True, "BLOCK_V": 4096}
    names = list(sig) + list(consts)
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 8})
    except (FileNotFoundError, RuntimeError) as exc:
        if "ptxas" in str(exc):
            pytest.skip(f"no ptxas: {exc}")
        raise
    ttir = kernel.asm["ttir"]
    # the reference branch yields its updated statistics out of the runtime `if`
    assert ("scf.yield" in ttir) and (features is False or "scf.if" in ttir)


def test_bf16_two_x_rule_tiny():
    """bf16 path (dlogits stored in bf16, fp32 dW accumulation) through the interpreter."""
    h, w, y, k, rh, rw = make_case(40, 32, 150, dtype=torch.bfloat16, scale=2.0, seed=23)

    def run(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(hh, ww)
        out.loss.backward()
        return out.loss.detach().double(), hh.grad.double(), ww.grad.double()

    ref = run(lambda a, b: unlearn_loss_ref(a, b, y, k, rh, rw, compute_dtype=torch.float64))
    naive = run(lambda a, b: unlearn_loss_ref(a, b, y, k, rh, rw, compute_dtype=torch.bfloat16))
    got = run(lambda a, b: unlearn_loss(a, b, y, k, rh, rw, backend="triton", chunk_rows=8))
    assert abs(got[0] - ref[0]) <= 2 * abs(naive[0] - ref[0]) + 1e-6
    for i in (1, 2):
        e = (got[i] - ref[i]).norm() / ref[i].norm()
        n = (naive[i] - ref[i]).norm() / ref[i].norm()
        assert e <= 2 * n, (i, float(e), float(n))


@pytest.mark.parametrize("mode", ["addmm", "mm", "cast"])
def test_accumulate_dw_modes(monkeypatch, mode):
    """Every fp32 dW accumulation path (chosen by a probe of the installed torch) is exact
    up to fp32 rounding; paths the local torch lacks are skipped."""
    from fastunlearn.triton_kernels import dw_accumulate as fl

    g = torch.Generator().manual_seed(0)
    a = torch.randn(24, 300, generator=g).bfloat16()
    b = torch.randn(24, 16, generator=g).bfloat16()
    dw = torch.randn(300, 16, generator=g)
    want = dw.double() + a.double().T @ b.double()
    monkeypatch.setattr(fl, "_DW_SLICE", 128)  # several slices in the fallback paths
    monkeypatch.setitem(fl._ADDMM_F32_OK, "cpu", mode)
    try:
        fl.accumulate_dw(dw, a, b)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"{mode} not supported by this torch on cpu: {str(exc)[:80]}")
    torch.testing.assert_close(dw.double(), want, rtol=1e-5, atol=1e-4)


def test_unlearn_op_opcheck_and_function_fallback(monkeypatch):
    tb = _tb()
    h, w, y, k, rh, rw = make_case(9, 4, 40, dtype=torch.float32, seed=29)
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is not None:
        hg = h.clone().requires_grad_()
        opcheck(tb._unlearn_op, (hg, w, y, k, rh, rw, None, None, 0.5, 1.0, 1.0, None, "mean",
                                 -100, None, None),
                test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # the autograd.Function path (torch without custom_op) gives the same result
    via_op = run_with_grads(_tri(y, k, rh, rw, chunk_rows=4), h, w, grad_output=2.0)
    monkeypatch.setattr(tb, "_unlearn_op", None)
    via_fn = run_with_grads(_tri(y, k, rh, rw, chunk_rows=4), h, w, grad_output=2.0)
    _assert_match(via_fn[0], via_op[0], via_fn[1:], via_op[1:], grad_rtol=1e-6)


def test_vocab_above_65536(monkeypatch):
    """V > 65536 (Llama-3 style vocabularies), several 4096-wide tiles per row."""
    monkeypatch.setenv("FASTUNLEARN_TRITON_BLOCK_V", "4096")
    h, w, y, k, rh, rw = make_case(6, 4, 70001, dtype=torch.float32, seed=31, ignore_frac=0.0)
    y[0] = 70000  # the last column, in the partial last tile
    ref = run_with_grads(_ref(h, w, y, k, rh, rw), h, w)
    got = run_with_grads(_tri(y, k, rh, rw, chunk_rows=4), h, w)
    _assert_match(got[0], ref[0], got[1:], ref[1:])
