"""``cuda`` backend: cuBLAS GEMMs on row chunks + the CUDA row pass (csrc/unlearn_loss_kernels.cu).

Per chunk of R valid rows (kind order forget, mismatch, normal, so the normal rows are a suffix):
    Z  = H_c W^T  (R, V) in the inputs' dtype (cuBLAS, fp32 accumulation)
    ZR = HR_c W_ref^T for the normal suffix
    row pass kernel: NLL / KL per row and dZ in place (online softmax for both models in one
        read, fp32 math, fp32 target logit)
    dX_c = dZ W;  dW += dZ^T H_c accumulated in fp32 by the GEMM itself (beta = 1; see
        triton_kernels/dw_accumulate.py, shared with the triton backend)
FLOPs: the GEMM floor 2NHV (Z) + 2 Nn HV (ZR) + 2NHV (dX) + 2NHV (dW). One host synchronisation
per call (the number of valid rows sizes the GEMMs); counts and terms stay on the device.

The extension is compiled just in time on first use (cached on disk, see ``_build``); importing
this module compiles nothing and touches no CUDA state. The op is ``fastunlearn::cuda_unlearn_loss``
(torch.library custom op with fake impl and autograd formula, like the ``cpp`` backend).
"""
import os
import shutil
from typing import Optional

import torch

from ._build import extension_status, load_extension
from .cpp_backend import _needs_grad, register_fused_op
from .registry import Backend, register_backend
from .types import IGNORE_INDEX, KIND_NORMAL, LossOutput, check_options

EXT_NAME = "fastunlearn_cuda_loss"
SOURCES = ["unlearn_loss_cuda.cpp", "unlearn_loss_kernels.cu"]
DEFAULT_WORKSPACE_MB = 1024
MAX_CHUNK_ROWS = 8192


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


def default_chunk_rows(vocab: int, itemsize: int = 2, workspace_mb: Optional[int] = None) -> int:
    """Rows per chunk so that the logits and reference logits of a chunk fit the workspace.

    Large chunks keep cuBLAS efficient (2k-8k rows); FASTUNLEARN_WORKSPACE_MB overrides 1 GiB.
    """
    mb = workspace_mb or int(os.environ.get("FASTUNLEARN_WORKSPACE_MB", DEFAULT_WORKSPACE_MB))
    rows = (mb * 2**20) // (2 * itemsize * max(vocab, 1))
    return int(max(64, min(MAX_CHUNK_ROWS, rows)))


def _biased_capped(x, bias, softcap):
    """x + bias, then the soft-cap c * tanh(x / c) when one is set."""
    if bias is not None:
        x = x + bias
    return softcap * torch.tanh(x / softcap) if softcap else x


def row_pass_reference(z, zr, labels, scale, hc, w, bias, ref_bias, softcap, ref_start):
    """The row pass in PyTorch with the kernel's exact contract (used to test the driver on CPU
    and as a readable specification). z (R, V) is overwritten with dz; returns val (R,) fp32."""
    x = _biased_capped(z.float(), bias, softcap)
    lse = torch.logsumexp(x, dim=1)
    p = torch.exp(x - lse[:, None])
    rows = z.shape[0]
    val = torch.empty(rows, dtype=torch.float32, device=z.device)
    if ref_start > 0:  # policy rows: fp32 target logit from the hidden row and W[y]
        y = labels[:ref_start]
        zy = _biased_capped((hc[:ref_start].float() * w[y].float()).sum(1),
                            None if bias is None else bias[y], softcap)
        val[:ref_start] = lse[:ref_start] - zy
        p[torch.arange(ref_start, device=z.device), y] -= 1.0
    if ref_start < rows:
        xr = _biased_capped(zr.float(), ref_bias, softcap)
        log_q = torch.log_softmax(xr, dim=1)
        q = log_q.exp()
        xn = x[ref_start:]
        lse_n = lse[ref_start:]
        val[ref_start:] = (q * (log_q - (xn - lse_n[:, None]))).sum(1)
        p[ref_start:] -= q
    d = p * scale[:, None]
    if softcap:
        d = d * (1.0 - (x / softcap) ** 2)
    z.copy_(d.to(z.dtype))
    return val


def _kernel_row_pass(z, zr, labels, scale, hc, w, bias, ref_bias, softcap, ref_start):
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


def cuda_forward_backward(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
                          eps_forget, eps_mismatch, eps_normal, softcap, reduction_sum,
                          ignore_index, chunk_rows, row_pass=_kernel_row_pass, need_dx=True,
                          need_dw=True):
    """(loss, terms(3), counts(3), dX, dW fp32, db fp32 or empty) for grad_output = 1.

    ``row_pass`` is the CUDA kernel; tests pass :func:`row_pass_reference` to run the same
    driver on CPU tensors.
    """
    from fastunlearn.triton_kernels.dw_accumulate import accumulate_dw

    device = hidden.device
    bt, h_dim = hidden.shape
    vocab = weight.shape[0]
    dt = hidden.dtype if hidden.dtype in (torch.float32, torch.float16, torch.bfloat16) \
        else torch.float32
    labels = labels.long()
    kind = kind.long()
    valid = labels != ignore_index
    if ref_hidden is None:
        valid = valid & (kind != KIND_NORMAL)
    # sort key: kind for valid rows, 3 for the rest -> forget, mismatch, normal, dropped
    key = torch.where(valid, kind, torch.full_like(kind, 3))
    bad = (valid & ((kind < 0) | (kind > 2) | (labels < 0) | (labels >= vocab))).sum()
    counts = torch.stack([(key == k).sum() for k in range(3)])
    n_f, n_m, n_n, n_bad = torch.cat([counts, bad[None]]).tolist()  # the one host sync
    if n_bad:
        raise ValueError(f"{n_bad} valid rows have a kind outside {{0, 1, 2}} or a label outside "
                         f"[0, {vocab})")
    n_rows = n_f + n_m + n_n
    order = torch.sort(key, stable=True).indices[:n_rows]
    lab_v = labels[order]
    sign = torch.tensor([-eps_forget, eps_mismatch, eps_normal], device=device,
                        dtype=torch.float32)
    scale = sign if reduction_sum else sign / counts.clamp(min=1).float()
    row_scale = scale[kind[order]].contiguous()

    # an empty (0,) gradient means "not needed" (the input does not require grad)
    d_hidden = torch.zeros((bt, h_dim) if need_dx else (0,), device=device, dtype=hidden.dtype)
    d_weight = torch.zeros(vocab, h_dim, device=device, dtype=torch.float32) if need_dw \
        else torch.zeros(0, device=device, dtype=torch.float32)
    d_bias = torch.zeros(vocab, device=device, dtype=torch.float32) if bias is not None \
        else torch.zeros(0, device=device, dtype=torch.float32)
    vals = torch.zeros(n_rows, device=device, dtype=torch.float32)
    if n_rows:
        w = weight.to(dt).contiguous()
        rw = w if ref_weight is None else ref_weight.to(dt).contiguous()
        b32 = bias.float().contiguous() if bias is not None else None
        rb32 = ref_bias.float().contiguous() if ref_bias is not None else None
        rows_max = min(chunk_rows or default_chunk_rows(vocab, torch.finfo(dt).bits // 8),
                       n_rows)
        zbuf = torch.empty(rows_max, vocab, device=device, dtype=dt)
        zrbuf = torch.empty(min(rows_max, n_n), vocab, device=device, dtype=dt) if n_n else None
        first_normal = n_f + n_m
        for s in range(0, n_rows, rows_max):
            r = min(rows_max, n_rows - s)
            n_ref = max(0, s + r - max(s, first_normal))
            idx = order[s:s + r]
            # 1. policy logits of the chunk (dropped rows never reach a GEMM)
            hc = hidden.index_select(0, idx).to(dt).contiguous()
            z = torch.mm(hc, w.t(), out=zbuf[:r])
            # 2. reference logits of the normal suffix
            zr = None
            if n_ref:
                hr = ref_hidden.index_select(0, idx[r - n_ref:]).to(dt)
                zr = torch.mm(hr, rw.t(), out=zrbuf[:n_ref])
            # 3. row pass: values, dz in place
            vals[s:s + r] = row_pass(z, zr, lab_v[s:s + r], row_scale[s:s + r], hc, w, b32, rb32,
                                     softcap, r - n_ref)
            # 4. dX, dW (fp32 accumulation), db
            if need_dx:
                d_hidden.index_copy_(0, idx, (z @ w).to(hidden.dtype))
            if need_dw:  # fp32 accumulation inside the GEMM (beta = 1), no (V, H) temporary
                accumulate_dw(d_weight, z, hc)
            if bias is not None:
                d_bias += z.sum(0, dtype=torch.float32)
    kind_sorted = torch.cat([torch.full((n,), k, device=device, dtype=torch.long)
                             for k, n in enumerate((n_f, n_m, n_n))])
    sums = torch.zeros(3, device=device, dtype=torch.float32).index_add_(0, kind_sorted, vals)
    terms = sums if reduction_sum else sums / counts.clamp(min=1).float()
    loss = (sign * terms).sum()
    return loss, terms, counts, d_hidden, d_weight, d_bias


def _run(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, eps_forget,
         eps_mismatch, eps_normal, softcap, reduction_sum, ignore_index, chunk_rows, need_dx,
         need_dw):
    if hidden.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors, got hidden on {hidden.device}")
    # Devices of the caller's tensors, before any GEMM runs (the C++ checks see chunk tensors).
    for name, t in (("weight", weight), ("labels", labels), ("kind", kind),
                    ("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("bias", bias),
                    ("ref_bias", ref_bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"the cuda backend needs {name} on {hidden.device}, got {t.device}")
    with torch.no_grad():
        return cuda_forward_backward(hidden, weight, labels, kind, ref_hidden, ref_weight, bias,
                                     ref_bias, eps_forget, eps_mismatch, eps_normal,
                                     softcap or None, reduction_sum, ignore_index,
                                     chunk_rows or None, need_dx=need_dx, need_dw=need_dw)


_apply = register_fused_op("fastunlearn::cuda_unlearn_loss", _run)


def cuda_unlearn_loss(hidden, weight, labels, kind, ref_hidden=None, ref_weight=None, *,
                      eps_forget, eps_mismatch, eps_normal, bias=None, ref_bias=None,
                      softcap=None, reduction="mean", ignore_index=IGNORE_INDEX,
                      chunk_rows=None) -> LossOutput:
    """Fused unlearning loss on CUDA (same contract as ``chunked.chunked_unlearn_loss``).

    Args:
        hidden: (BT, H) bf16 / fp16 / fp32 CUDA policy hidden states; the GEMMs run in this
            dtype (fp32 accumulation), the row pass in fp32.
        weight: (V, H) head (cast to hidden's dtype for the GEMMs); dW accumulates in fp32 and
            is returned in weight's dtype.
        labels / kind: (BT,) ints; ``ignore_index`` rows are dropped before any GEMM.
        ref_hidden / ref_weight / bias / ref_bias / softcap / reduction: as in ``unlearn_loss``.
        chunk_rows: rows per chunk (default: :func:`default_chunk_rows`, 1 GiB of logits).

    Returns:
        LossOutput(backend="cuda"); ``loss = -eps_forget*forget_nll + eps_mismatch*mismatch_nll
        + eps_normal*normal_kl``.

    Example:
        >>> out = cuda_unlearn_loss(h, W, labels, kind, ref_h, eps_forget=0.5, eps_mismatch=1.0,
        ...                         eps_normal=1.0)
        >>> out.loss.backward()
    """
    check_options(reduction, softcap, chunk_rows)
    detach = (lambda t: None if t is None else t.detach())
    loss, terms, counts, _dx, _dw, _db = _apply(
        hidden, weight, labels, kind, detach(ref_hidden), detach(ref_weight), bias,
        detach(ref_bias), float(eps_forget), float(eps_mismatch), float(eps_normal),
        float(softcap or 0.0), reduction == "sum", int(ignore_index), int(chunk_rows or 0),
        *_needs_grad(hidden, weight))
    terms = terms.detach()
    return LossOutput(loss, terms[0], terms[1], terms[2], counts[0], counts[1], counts[2],
                      backend="cuda")


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


register_backend(Backend("cuda", cuda_unlearn_loss, ("cuda",), priority=90,
                         availability=_availability,
                         description="CUDA row-pass kernel + cuBLAS GEMMs on row chunks"))
