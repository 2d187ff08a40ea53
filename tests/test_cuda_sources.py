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
from tests.loss_cases import make_case, no_tf32  # noqa: F401 (fixture)


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


def test_cuda_backend_rejects_cpu_tensors():
    from fastunlearn.losses.cuda_backend import _run
    from fastunlearn.losses.options import LossOptions

    h, w, y, k, rh, rw = make_case(5, 3, 7, dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA tensors"):
        _run(h, w, y, k, rh, rw, None, None, LossOptions(), True, True, False)


# ---- GPU: the real kernel ----

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
@pytest.mark.usefixtures("no_tf32")
def test_cuda_torch_compile():
    from fastunlearn.losses.cuda_backend import load

    load()
    h, w, y, k, rh, rw = make_case(16, 8, 64, dtype=torch.float32, seed=6, device="cuda")

    def f(a, b):
        return unlearn_loss(a, b, y, k, rh, rw, backend="cuda").loss

    he = h.clone().requires_grad_()
    expected = f(he, w)
    expected.backward()
    hc = h.clone().requires_grad_()
    loss = torch.compile(f, backend="aot_eager")(hc, w)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hc.grad, he.grad)


def _row_pass_cases(dev: str) -> list:
    """(expected message, check_row_pass arguments) per invalid input: z, zr, labels, scale,
    hc, w, bias, ref_bias, ref_start."""
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
        _kernel_row_pass(*args[:4], args[8], *args[4:8], None)
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
        cuda_backend._kernel_row_pass(*args[:4], args[8], *args[4:8], None)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
