"""``cuda`` backend: the chunk driver with the CUDA row pass (csrc/unlearn_loss_kernels.cu).

The GEMMs (logits, reference logits, dX, dW) run through ATen / cuBLAS in ``driver.run_chunks``;
the row pass kernel computes NLL / KL per row and dZ in place (online softmax of both models in
one read, fp32 math, fp32 target logit from the hidden row and W[y]).

The extension is compiled just in time on first use (cached on disk, see ``_build``); importing
this module compiles nothing and touches no CUDA state. The op is ``fastunlearn::cuda_unlearn_loss``
(the shared custom op of ``op``).
"""
import os
import shutil

import torch

from ._build import extension_status, load_extension
from .driver import run_chunks
from .op import register_loss_op
from .registry import Backend, register_backend

EXT_NAME = "fastunlearn_cuda_loss"
SOURCES = ["unlearn_loss_cuda.cpp", "unlearn_loss_kernels.cu"]


def cuda_arch_flags() -> list[str]:
    """sm_90 (Hopper) + sm_80 SASS and compute_80 PTX (portable to newer cards).

    FASTUNLEARN_CUDA_ARCH="90;100" picks other SASS targets (PTX stays at the lowest one).
    """
    archs = os.environ.get("FASTUNLEARN_CUDA_ARCH", "90;80").replace(",", ";").split(";")
    archs = [a.strip().replace(".", "") for a in archs if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    low = min(archs, key=lambda a: int("".join(c for c in a if c.isdigit())))
    flags.append(f"-gencode=arch=compute_{low},code=compute_{low}")
    return flags


def load(build: bool = True):
    """Build (first time) and import the CUDA extension; raises ExtensionBuildError.

    ``build=False`` only loads an already built extension (for cheap probes)."""
    # no -std / -O flags for nvcc: torch adds its own and nvcc rejects a redefinition
    return load_extension(EXT_NAME, SOURCES, cflags=["-O3"], cuda_cflags=cuda_arch_flags(),
                          with_cuda=True, build=build)


def _kernel_row_pass(z, zr, labels, scale, ref_start, hc, w, bias, ref_bias, softcap):
    """The driver's row pass (contract in ``driver``) on the CUDA kernel."""
    ext = load()
    # The C++ checks report back as a string and the error is raised here, in Python: no C++
    # exception has to cross into Python for bad input (see csrc/unlearn_loss_cuda.cpp).
    error = ext.check_row_pass(z, zr, labels, scale, hc, w, bias, ref_bias, int(ref_start))
    if error:
        raise ValueError(error)
    with torch.cuda.device(z.device):
        stream = torch.cuda.current_stream(z.device).cuda_stream
        return ext.row_pass(z, zr, labels, scale, hc, w, bias, ref_bias, float(softcap or 0.0),
                            int(ref_start), int(stream))


def _run(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, options, need_dx,
         need_dw, need_db):
    if hidden.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors, got hidden on {hidden.device}")
    # the kernel reads W[y] rows with unit strides (a copy only for a non-contiguous head)
    return run_chunks(hidden, weight.contiguous(), labels, kind, ref_hidden, ref_weight, bias,
                      ref_bias, options, _kernel_row_pass, need_dx=need_dx, need_dw=need_dw,
                      need_db=need_db)


cuda_unlearn_loss = register_loss_op("fastunlearn::cuda_unlearn_loss", _run)


def _fn(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, options):
    return cuda_unlearn_loss(hidden, weight, labels, kind, ref_hidden, ref_weight, bias,
                             ref_bias, options, "cuda")


def _availability(device_type):
    if device_type not in (None, "cuda"):
        return False, f"runs on cuda, not {device_type}"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return False, "nvcc not found (set CUDA_HOME) to build the extension"
    return extension_status(load, device_type, EXT_NAME)


register_backend(Backend("cuda", _fn, ("cuda",), priority=90, availability=_availability,
                         dtypes=(torch.float32, torch.bfloat16), sync_free=True,
                         checks_rows_on_device=True,
                         description="CUDA row-pass kernel + cuBLAS GEMMs on row chunks"))
