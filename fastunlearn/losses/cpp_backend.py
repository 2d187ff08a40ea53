"""``cpp`` backend: the fused unlearning loss as a C++ CPU extension (csrc/unlearn_loss_cpu.cpp).

The extension is compiled just in time on first use (or on the first availability probe) and
cached on disk (see ``_build``); importing this module compiles nothing. The op is registered as
``fastunlearn::cpp_unlearn_loss`` through the shared custom op (``op``). The C++ loop keeps its
own fused row pass and GEMM calls for fp32 heads (that is what makes it fast on CPU), with the
driver's chunk plan and contract: same options, same outputs. Other heads run the chunk driver
with their own GEMM dtype and the extension's row pass.
"""
import os

import torch

from ._build import cpu_arch_flags, extension_status, load_extension
from .driver import plan_chunks, run_chunks, target_logits, torch_row_pass
from .op import register_loss_op
from .registry import Backend, register_backend

EXT_NAME = "fastunlearn_cpp_loss"
SOURCES = ["unlearn_loss_cpu.cpp", "adamw_sr_cpu.cpp"]


_GEMM_CHOSEN = False


def load(build: bool = True):
    """Build (first time) and import the extension; raises ExtensionBuildError on failure.

    ``build=False`` only loads an already built extension (for cheap probes).

    On first load the GEMM engine is chosen: FASTUNLEARN_CPP_GEMM=onednn|aten forces one;
    the default ``auto`` uses oneDNN (bundled in libtorch) when it matches at::mm on a self-check.
    """
    global _GEMM_CHOSEN
    # -fno-math-errno: lets the compiler vectorise sqrt (we never read errno)
    flags = ["-O3", "-fopenmp", "-fno-math-errno", *cpu_arch_flags()]
    ext = load_extension(EXT_NAME, SOURCES, cflags=flags, ldflags=["-fopenmp"], build=build)
    if not _GEMM_CHOSEN:
        _GEMM_CHOSEN = True
        want = os.environ.get("FASTUNLEARN_CPP_GEMM", "auto")
        if want not in ("auto", "onednn", "aten"):
            raise ValueError(f"FASTUNLEARN_CPP_GEMM must be auto, onednn or aten, got {want!r}")
        engine = ext.set_gemm("aten" if want == "aten" else "onednn")
        if want == "auto" and engine == "onednn" and not _gemm_self_check(ext):
            ext.set_gemm("aten")
    return ext


def _gemm_self_check(ext) -> bool:
    """oneDNN's matmul is reached through an internal ATen symbol: check it against torch.mm
    (plain, transposed operands, accumulation) before trusting it."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 19, generator=g), torch.randn(19, 53, generator=g)
    c0 = torch.randn(37, 53, generator=g)
    try:
        cases = [
            (ext.gemm(a, b, torch.empty(37, 53), 0.0), a @ b),
            (ext.gemm(a, b.t().contiguous().t(), c0.clone(), 1.0), c0 + a @ b),
            (ext.gemm(a.t().contiguous().t(), b, c0.clone(), 1.0), c0 + a @ b),
            (ext.gemm(b.t(), a.t(), torch.empty(53, 37), 0.0), (a @ b).t()),
        ]
    except RuntimeError:
        return False
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-5) for x, y in cases)


def onednn_gemm(a, b, out, beta):
    """out = beta * out + a @ b (fp32) through the extension's GEMM engine: the driver's GEMMs on
    CPU (``token_stats`` on this backend), at the speed of the fused loop's own."""
    return load().gemm(a, b, out, float(beta))


def row_pass(z, zr, labels, scale, ref_start, hc, w, bias, ref_bias, softcap):
    """The driver's row-pass contract (``driver.torch_row_pass``) through the extension's fused
    C++ row pass on fp32 or bf16 logits (computing in fp32); fp64 takes the PyTorch pass. The
    cpp backend runs it for bf16 heads, and ``token_stats`` on this backend for every head."""
    if z.dtype not in _ROW_PASS_DTYPES:
        return torch_row_pass(z, zr, labels, scale, ref_start, hc, w, bias, ref_bias, softcap)
    target = None
    if z.dtype != torch.float32 and ref_start > 0:  # the stored logit carries bf16 rounding
        target = target_logits(hc[:ref_start], w, labels[:ref_start], None, None)
    return load().row_pass(z, zr, labels, scale, ref_start, target, bias, ref_bias,
                           softcap or 0.0)


_ROW_PASS_DTYPES = (torch.float32, torch.bfloat16)


def _row_pass_temp_bytes(dtype: torch.dtype) -> int:
    """The C++ pass holds one fp32 row per thread; the PyTorch fallback its (R, V) buffers."""
    return 0 if dtype in _ROW_PASS_DTYPES else torch_row_pass.temp_bytes_per_logit


row_pass.temp_bytes_per_logit = _row_pass_temp_bytes


def gemm_engine() -> str:
    """The GEMM engine the extension uses: 'onednn' or 'aten' (builds the extension)."""
    return load().gemm_engine()


def _run(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, options, need_dx,
         need_dw, need_db):
    """An fp32 head: the extension's fused C++ loop, with the driver's chunk plan and contract.
    Any other head: the chunk driver with GEMMs in the head's dtype and the row pass above."""
    if weight.dtype != torch.float32:
        return run_chunks(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
                          options, row_pass, need_dx=need_dx, need_dw=need_dw, need_db=need_db)
    vocab = weight.shape[0]
    n_ref = 0 if ref_hidden is None else hidden.shape[0]
    rows = plan_chunks(hidden.shape[0], n_ref, vocab, 4, "cpu", options.chunk_rows).rows
    loss, terms, counts, dx, dw, db = load().forward_backward(
        hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
        options.eps_forget, options.eps_mismatch, options.eps_normal, options.softcap or 0.0,
        options.logit_scale, options.reduction_sum, options.ignore_index, rows, need_dx,
        need_dw)
    # "not needed": a distinct empty tensor per output, as the driver and the fake return it
    dx = dx if need_dx else hidden.new_empty(0)
    dw = dw if need_dw else hidden.new_empty(0)
    db = db.to(bias.dtype) if need_db else hidden.new_empty(0)
    return loss, terms, counts, dx, dw, db


cpp_unlearn_loss = register_loss_op("fastunlearn::cpp_unlearn_loss", _run)


def _fn(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, options):
    return cpp_unlearn_loss(hidden, weight, labels, kind, ref_hidden, ref_weight, bias,
                            ref_bias, options, "cpp")


def _availability(device_type):
    """Builds on the first probe for a CPU run (cached on disk); a device-less probe (listing the
    backends) only reports whether it is already built."""
    if device_type not in (None, "cpu"):
        return False, f"runs on cpu, not {device_type}"
    return extension_status(load, device_type, EXT_NAME)


register_backend(Backend("cpp", _fn, ("cpu",), priority=20,
                         availability=_availability,
                         description="C++ CPU extension: fused row pass, MKL GEMMs on row chunks"))
