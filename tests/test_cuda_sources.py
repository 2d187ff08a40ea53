"""The ``cuda`` backend: compile-only checks of its sources (CI, needs nvcc), its Python driver on
CPU with the reference row pass, and GPU tests (marker ``gpu``) of the real kernel.

Compile-only: the .cu file is pure CUDA (no torch headers) and compiles with nvcc alone for sm_90,
sm_80 and compute_80 PTX (warnings are errors); the binding .cpp includes only torch headers
(stream and device come from Python). Both then go through torch's own JIT build up to the link
step, which needs libtorch_cuda and so only succeeds with a CUDA build of torch.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from fastunlearn.losses import unlearn_loss, unlearn_loss_ref
from fastunlearn.losses._build import csrc_dir
from tests.loss_cases import make_case


def _nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    cands = [shutil.which("nvcc")]
    if CUDA_HOME:
        cands.append(os.path.join(CUDA_HOME, "bin", "nvcc"))
    for c in cands:
        if c and os.path.exists(c):
            return c
    return None


def test_cuda_kernels_compile_with_nvcc(tmp_path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    from fastunlearn.losses.cuda_backend import cuda_arch_flags

    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: cannot compile the CUDA sources here")
    src = csrc_dir() / "unlearn_loss_kernels.cu"
    cmd = [nvcc, "-std=c++17", "-O3", "-c", str(src), "-o", str(tmp_path / "k.o"),
           *cuda_arch_flags(), *COMMON_NVCC_FLAGS,  # torch's flags (no half operators, ...)
           "-Xcompiler", "-Wall", "-Werror", "all-warnings"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "k.o").stat().st_size > 0
    # the launcher symbols the binding links against
    nm = shutil.which("nm")
    if nm:
        syms = subprocess.run([nm, str(tmp_path / "k.o")], capture_output=True, text=True).stdout
        assert "fastunlearn_row_pass" in syms and "fastunlearn_cuda_error_string" in syms


def test_cuda_extension_objects_compile_through_torch_jit(tmp_path, monkeypatch):
    """Runs torch's own JIT build (the exact nvcc / c++ command lines used on the GPU machine)
    up to the link: with this CPU-only torch only the link may fail (no libtorch_cuda)."""
    from torch.utils import cpp_extension

    from fastunlearn.losses.cuda_backend import SOURCES, cuda_arch_flags

    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: cannot compile the CUDA sources here")
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return _binding_syntax_only()
    if cpp_extension.CUDA_HOME is None:  # CPU torch: point it at nvcc's toolkit
        monkeypatch.setattr(cpp_extension, "CUDA_HOME",
                            os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    try:
        cpp_extension.load(name="fu_cuda_ci", sources=[str(csrc_dir() / s) for s in SOURCES],
                           extra_cflags=["-O3"], extra_cuda_cflags=cuda_arch_flags(),
                           build_directory=str(tmp_path), with_cuda=True, verbose=False)
    except RuntimeError as exc:
        msg = str(exc)
        assert torch.version.cuda is None, msg  # a CUDA torch must build and load it
        assert (tmp_path / "unlearn_loss_cuda.o").exists(), msg
        assert (tmp_path / "unlearn_loss_kernels.cuda.o").exists(), msg
        assert "cannot find -lc10_cuda" in msg or "cannot find -ltorch_cuda" in msg, msg


def _binding_syntax_only():
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    std = "-std=c++20" if torch.__version__ >= "2.10" else "-std=c++17"
    cmd = [cxx, std, "-fsyntax-only", "-DTORCH_EXTENSION_NAME=fastunlearn_cuda_loss",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *incs, str(csrc_dir() / "unlearn_loss_cuda.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"


def test_cuda_backend_registered_but_unavailable_without_gpu():
    from fastunlearn.losses.registry import get_backend

    b = get_backend("cuda")
    assert b is not None and b.devices == ("cuda",) and b.priority == 90
    assert not b.available("cpu")[0]
    if not torch.cuda.is_available():
        ok, why = b.available("cuda")
        assert not ok and why


# ---- the Python driver (chunking, kind order, scales, dW / db accumulation) on CPU ----

def _driver(h, w, y, k, rh, rw, *, bias=None, ref_bias=None, softcap=None, reduction="mean",
            chunk_rows=None, eps=(0.5, 1.0, 1.0)):
    from fastunlearn.losses.cuda_backend import cuda_forward_backward, row_pass_reference

    return cuda_forward_backward(h, w, y, k, rh, rw, bias, ref_bias, *eps, softcap,
                                 reduction == "sum", -100, chunk_rows,
                                 row_pass=row_pass_reference)


@pytest.mark.parametrize("shape", [(37, 31, 123), (5, 3, 7), (64, 16, 300)])
@pytest.mark.parametrize("chunk_rows", [None, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cuda_driver_with_reference_row_pass(shape, chunk_rows, reduction):
    h, w, y, k, rh, rw = make_case(*shape, dtype=torch.float32, seed=sum(shape))
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    ref = unlearn_loss_ref(hd, wd, y, k, rh.double(), rw.double(), reduction=reduction)
    ref.loss.backward()
    loss, terms, counts, dx, dw, db = _driver(h, w, y, k, rh, rw, reduction=reduction,
                                              chunk_rows=chunk_rows)
    torch.testing.assert_close(loss.double(), ref.loss.detach(), rtol=1e-5, atol=1e-6)
    for i, name in enumerate(("forget_nll", "mismatch_nll", "normal_kl")):
        torch.testing.assert_close(terms[i].double(), getattr(ref, name).detach(), rtol=1e-5,
                                   atol=1e-6)
    assert counts.tolist() == [int(ref.n_forget), int(ref.n_mismatch), int(ref.n_normal)]
    torch.testing.assert_close(dx.double(), hd.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw.double(), wd.grad, rtol=1e-4, atol=1e-6)
    assert db.numel() == 0


def test_cuda_driver_bias_softcap_and_edge_cases():
    h, w, y, k, rh, rw = make_case(29, 12, 77, dtype=torch.float32, seed=3, scale=3.0)
    b = torch.randn(77)
    hd, wd, bd = (t.double().requires_grad_() for t in (h, w, b))
    ref = unlearn_loss_ref(hd, wd, y, k, rh.double(), rw.double(), bias=bd,
                           ref_bias=b.double(), softcap=8.0, eps_forget=0.7)
    ref.loss.backward()
    loss, _t, _c, dx, dw, db = _driver(h, w, y, k, rh, rw, bias=b, ref_bias=b, softcap=8.0,
                                       chunk_rows=8, eps=(0.7, 1.0, 1.0))
    torch.testing.assert_close(loss.double(), ref.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx.double(), hd.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw.double(), wd.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(db.double(), bd.grad, rtol=1e-4, atol=1e-6)
    # all rows ignored: zeros, no GEMM
    loss, terms, counts, dx, dw, _ = _driver(h, w, torch.full_like(y, -100), k, rh, rw)
    assert float(loss) == 0.0 and counts.sum() == 0 and dx.abs().max() == 0
    # no reference: the normal rows are dropped
    _l, terms, counts, *_ = _driver(h, w, y, k, None, None)
    assert int(counts[2]) == 0 and float(terms[2]) == 0.0
    # a label outside the vocabulary on a valid row: one clear error
    bad = y.clone()
    bad[bad != -100] = 500
    with pytest.raises(ValueError, match="outside"):
        _driver(h, w, bad, k, rh, rw)


def test_cuda_driver_bf16_dtypes():
    h, w, y, k, rh, rw = make_case(40, 16, 90, dtype=torch.float32, seed=8)
    hb, wb, rhb = h.bfloat16(), w.bfloat16(), rh.bfloat16()
    loss, terms, _c, dx, dw, _db = _driver(hb, wb, y, k, rhb, None, chunk_rows=16)
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32 and loss.dtype == torch.float32
    hd, wd = hb.double().requires_grad_(), wb.double().requires_grad_()
    ref = unlearn_loss_ref(hd, wd, y, k, rhb.double())
    ref.loss.backward()
    torch.testing.assert_close(loss.double(), ref.loss.detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw.double(), wd.grad, rtol=5e-2, atol=5e-3)


def test_cuda_backend_rejects_cpu_tensors():
    from fastunlearn.losses.cuda_backend import cuda_unlearn_loss

    h, w, y, k, rh, rw = make_case(5, 3, 7, dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_unlearn_loss(h, w, y, k, rh, rw, eps_forget=0.5, eps_mismatch=1.0, eps_normal=1.0)


# ---- GPU: the real kernel ----

@pytest.fixture
def no_tf32():
    """fp32 comparisons need true fp32 GEMMs, whatever another test module set globally."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _grads_of(fn, h, w):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = fn(h, w)
    out.loss.backward()
    return out, h.grad, w.grad


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(37, 31, 123), (64, 16, 300), (300, 64, 4099),
                                   (128, 40, 70000)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cuda_fp32_matches_reference(shape, reduction, no_tf32):
    case = make_case(*shape, dtype=torch.float32, seed=sum(shape), device="cuda")
    h, w, y, k, rh, rw = case
    ref, gh, gw = _grads_of(lambda a, b: unlearn_loss_ref(
        a.double(), b.double(), y, k, rh.double(), rw.double(), reduction=reduction), h, w)
    got, ch, cw = _grads_of(lambda a, b: unlearn_loss(
        a, b, y, k, rh, rw, reduction=reduction, backend="cuda", chunk_rows=64), h, w)
    assert got.backend == "cuda"
    for name in ("loss", "forget_nll", "mismatch_nll", "normal_kl"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(ref, name).double(),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ch.double(), gh.double(), rtol=5e-4, atol=1e-6)
    torch.testing.assert_close(cw.double(), gw.double(), rtol=5e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("grad_output", [1.0, 2.0, -1.0])
def test_cuda_grad_output_bias_softcap_edge_cases(grad_output, no_tf32):
    h, w, y, k, rh, rw = make_case(29, 12, 77, dtype=torch.float32, seed=3, scale=3.0,
                                   device="cuda")
    b = torch.randn(77, device="cuda")
    kw = dict(softcap=8.0, eps_forget=0.7, eps_mismatch=1.3, eps_normal=0.9)
    hd, wd, bd = (t.double().requires_grad_() for t in (h, w, b))
    ref = unlearn_loss_ref(hd, wd, y, k, rh.double(), rw.double(), bias=bd, ref_bias=bd.detach(),
                           **kw)
    (ref.loss * grad_output).backward()
    hc, wc, bc = (t.clone().requires_grad_() for t in (h, w, b))
    got = unlearn_loss(hc, wc, y, k, rh, rw, bias=bc, ref_bias=b, backend="cuda", **kw)
    (got.loss * grad_output).backward()
    torch.testing.assert_close(got.loss.double(), ref.loss.detach(), rtol=1e-5, atol=1e-5)
    for g, r in ((hc.grad, hd.grad), (wc.grad, wd.grad), (bc.grad, bd.grad)):
        torch.testing.assert_close(g.double(), r, rtol=5e-4, atol=1e-6)
    # all ignored; KL = 0 with gradient 0 when the reference is the policy
    out = unlearn_loss(h, w, torch.full_like(y, -100), k, rh, rw, backend="cuda")
    assert float(out.loss) == 0.0
    hg = h.clone().requires_grad_()
    out = unlearn_loss(hg, w, y, torch.full_like(k, 2), h, w, backend="cuda")
    out.loss.backward()
    assert float(out.normal_kl.abs()) < 1e-6 and float(hg.grad.abs().max()) < 1e-6


def _max_err(a, b):
    return float((a.double() - b.double()).abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("bt, h_dim, vocab", [(4096, 576, 49152), (1024, 4096, 128256)])
def test_cuda_bf16_two_x_rule_real_heads(bt, h_dim, vocab):
    """bf16 kernel error vs the fp32 reference <= 2x the naive bf16 PyTorch error."""
    torch.manual_seed(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(bt, h_dim, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(vocab, h_dim, device="cuda", generator=g) / h_dim**0.5 * 2).bfloat16()
    labels = torch.randint(0, vocab, (bt,), device="cuda", generator=g)
    labels[torch.rand(bt, device="cuda", generator=g) < 0.2] = -100
    kind = torch.randint(0, 3, (bt,), device="cuda", generator=g)
    ref_hidden = (hidden.float() + 0.1 * torch.randn(bt, h_dim, device="cuda",
                                                     generator=g)).bfloat16()

    def grads(fn, dtype=torch.bfloat16):
        hh = hidden.to(dtype).requires_grad_()
        ww = weight.to(dtype).requires_grad_()
        out = fn(hh, ww)
        out.loss.backward()
        return out.loss.detach(), hh.grad, ww.grad

    # exact: fp32 math on the same (bf16-valued) inputs, fp32 gradients
    exact = grads(lambda a, b: unlearn_loss_ref(a, b, labels, kind, ref_hidden.float()),
                  torch.float32)
    naive = grads(lambda a, b: unlearn_loss_ref(a, b, labels, kind, ref_hidden,
                                                compute_dtype=torch.bfloat16))
    got = grads(lambda a, b: unlearn_loss(a, b, labels, kind, ref_hidden, backend="cuda"))
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    for name, e, n, c in zip(("loss", "dX", "dW"), exact, naive, got):
        err_naive, err_got = _max_err(n, e), _max_err(c, e)
        assert err_got <= 2 * err_naive + 1e-6, (name, err_got, err_naive)


@pytest.mark.gpu
def test_cuda_torch_compile(no_tf32):
    from fastunlearn.losses.cuda_backend import cuda_unlearn_loss, load

    load()
    h, w, y, k, rh, rw = make_case(16, 8, 64, dtype=torch.float32, seed=6, device="cuda")
    kw = dict(eps_forget=0.5, eps_mismatch=1.0, eps_normal=1.0)

    def f(a, b):
        return cuda_unlearn_loss(a, b, y, k, rh, rw, **kw).loss

    he = h.clone().requires_grad_()
    expected = f(he, w)
    expected.backward()
    hc = h.clone().requires_grad_()
    loss = torch.compile(f, backend="aot_eager")(hc, w)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hc.grad, he.grad)


def _row_pass_cases(dev: str) -> list:
    """(expected message, row_pass arguments without softcap and stream) per invalid input."""
    w = torch.randn(64, 8, device=dev)
    z = torch.randn(4, 64, device=dev)
    lab = torch.zeros(4, dtype=torch.long, device=dev)
    sc = torch.ones(4, device=dev)
    hc = torch.randn(4, 8, device=dev)
    return [
        ("labels must be int64", (z, None, lab.int(), sc, hc, w, None, None, 4)),
        ("contiguous", (z.t().contiguous().t(), None, lab, sc, hc, w, None, None, 4)),
        ("reference logits are required", (z, None, lab, sc, hc, w, None, None, 2)),
        ("zr must be (2, 64)", (z, z[:3], lab, sc, hc, w, None, None, 2)),
        ("weight must be (64, 8)", (z, None, lab, sc, hc, w[:, :4].contiguous(), None, None, 4)),
        ("bias must be float32", (z, None, lab, sc, hc, w, sc, None, 4)),
        ("logits must be float32, float16 or bfloat16", (z.double(), None, lab, sc, hc, w, None,
                                                          None, 4)),
    ]


_INPUT_ERROR_SCRIPT = """
import faulthandler, torch
faulthandler.enable()  # a native crash prints where it happened
from fastunlearn.losses.cuda_backend import load, _kernel_row_pass
from tests.test_cuda_sources import _row_pass_cases
ext = load()
cases = _row_pass_cases("cuda")
for expected, args in cases:  # the checks report as strings: no C++ exception involved
    assert expected in ext.check_row_pass(*args), (expected, ext.check_row_pass(*args))
    try:
        _kernel_row_pass(*args[:8], 0.0, args[8])
    except ValueError as e:
        assert expected in str(e), (expected, str(e))
    else:
        raise AssertionError("no error for " + expected)
    print("ok", expected, flush=True)
print("checks done", flush=True)
for expected, args in cases:  # the TORCH_CHECK inside row_pass: a C++ exception into Python
    try:
        ext.row_pass(*args[:8], 0.0, args[8], 0)
    except RuntimeError as e:
        assert expected in str(e), (expected, str(e))
    print("raised", expected, flush=True)
"""


@pytest.mark.gpu
def test_cuda_input_errors_are_python_errors():
    """The C++ checks give clear Python errors. In a subprocess: a crash must not end the run."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", _INPUT_ERROR_SCRIPT], capture_output=True,
                          text=True, timeout=300, env=env, cwd=repo)
    n = len(_row_pass_cases("cpu"))
    # The wrapper's path (check_row_pass, then a Python ValueError) must hold in any case.
    assert proc.stdout.count("ok ") == n, (proc.returncode, proc.stdout[-2000:],
                                           proc.stderr[-3000:])
    # row_pass's own TORCH_CHECK raising through pybind11: crashed on the H200 image once.
    assert proc.returncode == 0 and proc.stdout.count("raised ") == n, (
        proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])


_STUB_LAUNCHER = """
#include <cstdint>
// CPU stand-in for unlearn_loss_kernels.cu: lets the binding load without CUDA (tests only).
extern "C" int fastunlearn_row_pass(int, void*, const void*, int64_t, int64_t, int64_t,
                                    const int64_t*, const float*, const void*, const void*,
                                    int64_t, const float*, const float*, float, float*, void*) {
  return 1;
}
extern "C" const char* fastunlearn_cuda_error_string(int) { return "stub launcher"; }
"""


@pytest.fixture(scope="module")
def binding_on_cpu(tmp_path_factory):
    """The CUDA binding (unlearn_loss_cuda.cpp) built for the CPU with a stub kernel launcher."""
    from fastunlearn.losses._build import load_extension

    src = tmp_path_factory.mktemp("binding")
    shutil.copy(csrc_dir() / "unlearn_loss_cuda.cpp", src / "unlearn_loss_cuda.cpp")
    (src / "stub_launcher.cpp").write_text(_STUB_LAUNCHER)
    return load_extension("fu_cuda_binding_cpu", ["unlearn_loss_cuda.cpp", "stub_launcher.cpp"],
                          cflags=["-O1"], source_dir=src)


def test_binding_checks_report_messages_without_raising(binding_on_cpu):
    for expected, args in _row_pass_cases("cpu"):
        msg = binding_on_cpu.check_row_pass(*args, require_cuda=False)
        assert expected in msg and msg.startswith("fastunlearn cuda backend: "), (expected, msg)
        assert "must be a CUDA tensor" in binding_on_cpu.check_row_pass(*args)
    valid = _row_pass_cases("cpu")[0][1]
    valid = (valid[0], None, valid[2].long(), *valid[3:])
    assert binding_on_cpu.check_row_pass(*valid, require_cuda=False) == ""


def test_binding_row_pass_raises_and_wrapper_raises_value_error(binding_on_cpu, monkeypatch):
    from fastunlearn.losses import cuda_backend

    expected, args = _row_pass_cases("cpu")[0]
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        binding_on_cpu.row_pass(*args[:8], 0.0, args[8], 0)
    monkeypatch.setattr(cuda_backend, "load", lambda build=True: binding_on_cpu)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        cuda_backend._kernel_row_pass(*args[:8], 0.0, args[8])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
