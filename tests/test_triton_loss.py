"""Triton backend on CPU through the Triton interpreter (TRITON_INTERPRET=1): registration, the
kernel's sm_90 compile, dW accumulation paths, determinism and a > 65536 vocabulary. Its numbers
on every case are checked by tests/test_loss_conformance.py.

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


def _tri(y, k, rh, rw):
    return lambda h_, w_, _b: unlearn_loss(h_, w_, y, k, rh, rw, backend="triton", chunk_rows=6)


def test_deterministic():
    h, w, y, k, rh, rw = make_case(21, 8, 40, dtype=torch.float32, seed=17)
    a = run_with_grads(_tri(y, k, rh, rw), h, w)
    b = run_with_grads(_tri(y, k, rh, rw), h, w)
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


def test_installed_under_fastunlearn_namespace():
    import fastunlearn.triton_kernels as ours
    from fastunlearn.triton_kernels import token_stats, unlearn_rows  # noqa: F401

    assert ours.__file__.replace("\\", "/").endswith("triton_kernels/__init__.py")
    spec = importlib.util.find_spec("fastunlearn.triton_kernels.unlearn_rows")
    assert spec is not None and "fastunlearn" not in spec.origin.split("triton_kernels")[-1]


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
           "ref_nll_ptr": "*fp32", "target_ptr": "*fp32", "V": "i32", "softcap": "fp32"}
    consts = {"HAS_TARGET": features, "HAS_REF": features, "HAS_BIAS": features,
              "HAS_REF_BIAS": features,
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
    first = torch.full_like(dw, float("nan"))  # beta = 0 ignores what the buffer holds
    try:
        fl.accumulate_dw(dw, a, b)
        fl.accumulate_dw(first, a, b, beta=0.0)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"{mode} not supported by this torch on cpu: {str(exc)[:80]}")
    torch.testing.assert_close(dw.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(first.double(), a.double().T @ b.double(), rtol=1e-5, atol=1e-4)


def test_vocab_above_65536(monkeypatch):
    """V > 65536 (Llama-3 style vocabularies), several 4096-wide tiles per row."""
    monkeypatch.setenv("FASTUNLEARN_TRITON_BLOCK_V", "4096")
    h, w, y, k, rh, rw = make_case(6, 4, 70001, dtype=torch.float32, seed=31, ignore_frac=0.0)
    y[0] = 70000  # the last column, in the partial last tile
    ref = run_with_grads(lambda a, b, _c: unlearn_loss_ref(
        a.double(), b.double(), y, k, rh.double(), rw.double()), h, w)
    got = run_with_grads(_tri(y, k, rh, rw), h, w)
    torch.testing.assert_close(got[0].loss.double(), ref[0].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].double(), ref[1].double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[2].double(), ref[2].double(), rtol=1e-4, atol=1e-6)
