"""Triton row kernel of the fused unlearning loss: one pass over a chunk of logit rows.

Math (per row r of a chunk, z = policy logits, zr = reference logits, both (V,), optional bias
and soft-cap z <- c * tanh(z / c) applied in the kernel, everything in fp32 registers):

    lse   = log sum_v exp(z_v)                     (online max / sum over V tiles)
    nll   = lse - z_y                              (target logit read separately, in fp32)
    lse_r = log sum_v exp(zr_v)
    kl    = KL(q || p) = sum_v q_v (zr_v - z_v) - lse_r + lse      with q = softmax(zr)
          (the cross term t = sum exp(zr - m_r) (zr - z) is kept online and rescaled
           whenever the running max m_r moves; kl = t / s_r - lse_r + lse)
    d loss / d z_v = a_r (p_v - [v == y]) + b_r (p_v - q_v)      then times (1 - tanh^2) if capped
    with p = exp(z - m) / s and q = exp(zr - m_r) / s_r (m: row max, s: sum of exp(z - m)).
    -inf logits (a bias masking padded vocabulary entries) give p = q = 0 and add nothing to
    the cross term; a running max that is still -inf is treated as 0.

``a_r`` / ``b_r`` are per-row coefficients supplied by the caller: for the unlearning loss
a = -eps_forget / N_forget (forget rows) or eps_mismatch / N_mismatch (mismatch rows) and b = 0,
normal rows a = 0 and b = eps_normal / N_normal; for the token-stats backward a = -g_logp and
b = g_kl (per-token upstream gradients). With WRITE_GRAD the gradient overwrites the policy
logits in place (same dtype), so the caller can feed it straight into the dX / dW GEMMs.

Two passes over V per row: pass 1 reads z (and zr for rows with a reference) to build the
statistics, pass 2 reads them again and writes the gradient.

Bytes moved per chunk of C rows (element size e, C_ref rows with a reference):
    read 2 * C * V * e (policy, both passes) + 2 * C_ref * V * e (reference)
    write C * V * e (gradient), plus O(C) for labels, coefficients and outputs.
    bf16, C = 8192, V = 128256, one third normal rows: about 7.7 GB, ~1.8 ms at 4.3 TB/s.
FLOP floor: O(C * V) exp / fma (about 10 per element), negligible next to the GEMMs
(2 * C * H * V each); the kernel is bandwidth bound.

Offsets are int64 (row * stride overflows int32 once C * V > 2^31). No atomics: every program
owns one row, so results are bit-identical run to run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._variants import load_variant


# tl.max / tl.sum are themselves @triton.jit functions of Triton's standard library, fixed
# at Triton's import time in compiled or interpreted form, so kernels use tl.reduce (a builtin)
# directly. The combine functions are the standard library's own when it has them: the
# interpreter recognises those and reduces with numpy instead of calling them per element.
@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _sum_combine(a, b):
    return a + b


_MAX_COMBINE = getattr(tl.standard, "_elementwise_max", _max_combine)
_SUM_COMBINE = getattr(tl.standard, "_sum_combine", _sum_combine)


@triton.jit
def _rmax(x):
    return tl.reduce(x, 0, _MAX_COMBINE)


@triton.jit
def _rsum(x):
    return tl.reduce(x, 0, _SUM_COMBINE)


@triton.jit
def _tanh(x):
    """tanh in fp32 without libdevice (the interpreter has none): a series near 0 avoids the
    cancellation of (1 - e) / (1 + e)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.125, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _finite_or_zero(m):
    """A running max, or 0 while every logit seen is -inf (keeps exp(x - m) NaN-free)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _load_logits(ptr, bias_ptr, cols, mask, softcap, HAS_BIAS: tl.constexpr,
                 SOFTCAP: tl.constexpr):
    """Load a tile of logits as fp32 (masked lanes 0: finite, so differences stay NaN-free),
    add the bias and apply the cap. Returns (z, t) with t = tanh(z_raw / c) (or z when not
    capped, unused then)."""
    z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    t = z
    if SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
    return z, t


@triton.jit
def _unlearn_rows_fwd_kernel(
    z_ptr, z_stride,            # (C, V) policy logits, gradient written here in place
    zr_ptr, zr_stride,          # (C_ref, V) reference logits (rows with ref_idx >= 0)
    ref_idx_ptr,                # (C,) int32: row of zr for this row, -1 = no reference
    y_ptr,                      # (C,) int64 labels (already made safe: in [0, V))
    a_ptr, b_ptr,               # (C,) fp32 coefficients of (p - onehot) and (p - q)
    bias_ptr, ref_bias_ptr,     # (V,) optional biases
    nll_ptr, kl_ptr, ref_nll_ptr,  # (C,) fp32 outputs
    target_ptr,                 # (C,) fp32 raw target logits <h, W_y>, read when HAS_TARGET
    V, softcap,
    HAS_TARGET: tl.constexpr, HAS_REF: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    y = tl.load(y_ptr + row)
    cols0 = tl.arange(0, BLOCK_V)

    # 1. target logit, fp32 (bias and cap applied exactly as for the tile)
    if HAS_TARGET:  # computed in fp32 by the caller (a bf16 logit is rounded to 2^-9)
        z_y = tl.load(target_ptr + row)
    else:
        z_y = tl.load(z_row + y).to(tl.float32)
    if HAS_BIAS:
        z_y += tl.load(bias_ptr + y).to(tl.float32)
    if SOFTCAP:
        z_y = softcap * _tanh(z_y / softcap)

    # ref_idx is always a real (C,) int32 tensor (all -1 without a reference)
    ref_row_idx = tl.load(ref_idx_ptr + row)
    has_ref = ref_row_idx >= 0
    zr_row = zr_ptr + tl.maximum(ref_row_idx, 0).to(tl.int64) * zr_stride

    # 2. pass 1: online max / sum for policy and reference, and the KL cross term.
    # Scalars start as fp32 tensors, not Python floats: the compiler drops updates made
    # inside a runtime `if` to variables that are still Python constants.
    zero = row.to(tl.float32) * 0.0
    m = zero - float("inf")
    s = zero
    m_r = zero - float("inf")
    s_r = zero
    t_r = zero
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = cols < V
        z, _t = _load_logits(z_row, bias_ptr, cols, mask, softcap, HAS_BIAS, SOFTCAP)
        zm = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, _rmax(zm))
        m_ref = _finite_or_zero(m_new)  # -inf (masked vocabulary so far): no -inf - -inf
        s = s * tl.exp(m - m_ref) + _rsum(tl.exp(zm - m_ref))
        m = m_new
        if HAS_REF:
            if has_ref:
                zr, _tr = _load_logits(zr_row, ref_bias_ptr, cols, mask, softcap,
                                       HAS_REF_BIAS, SOFTCAP)
                zrm = tl.where(mask, zr, float("-inf"))
                mr_new = tl.maximum(m_r, _rmax(zrm))
                mr_ref = _finite_or_zero(mr_new)
                alpha = tl.exp(m_r - mr_ref)
                er = tl.exp(zrm - mr_ref)  # 0 on masked lanes and where zr = -inf
                s_r = s_r * alpha + _rsum(er)
                # q_v = 0 adds nothing, even where z_v = -inf too (0 * inf would be NaN)
                q_on = er > 0.0
                t_r = t_r * alpha + _rsum(er * (tl.where(q_on, zr, 0.0) - tl.where(q_on, z, 0.0)))
                m_r = mr_new
    m = _finite_or_zero(m)
    lse = m + tl.log(s)
    tl.store(nll_ptr + row, lse - z_y)
    lse_r = zero
    if HAS_REF:
        if has_ref:
            m_r = _finite_or_zero(m_r)
            lse_r = m_r + tl.log(s_r)
            zr_y = tl.load(zr_row + y).to(tl.float32)
            if HAS_REF_BIAS:
                zr_y += tl.load(ref_bias_ptr + y).to(tl.float32)
            if SOFTCAP:
                zr_y = softcap * _tanh(zr_y / softcap)
            tl.store(kl_ptr + row, t_r / s_r - lse_r + lse)
            tl.store(ref_nll_ptr + row, lse_r - zr_y)
        else:
            tl.store(kl_ptr + row, 0.0)
            tl.store(ref_nll_ptr + row, 0.0)

    # 3. pass 2: gradient a (p - onehot) + b (p - q), times the cap derivative, in place.
    # p = exp(z - max) / sum: exp(z - lse) with lse rounded to fp32 loses precision at large
    # logits. Masked lanes use z = max (finite; never stored).
    if WRITE_GRAD:
        a = tl.load(a_ptr + row)
        inv_s = 1.0 / s
        b = zero
        inv_sr = zero
        if HAS_REF:
            b = tl.load(b_ptr + row)
            inv_sr = 1.0 / tl.where(has_ref, s_r, 1.0)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            z, t = _load_logits(z_row, bias_ptr, cols, mask, softcap, HAS_BIAS, SOFTCAP)
            p = tl.exp(tl.where(mask, z, m) - m) * inv_s
            g = a * (p - tl.where(cols == y, 1.0, 0.0)) + b * p
            if HAS_REF:
                if has_ref:
                    zr, _tr = _load_logits(zr_row, ref_bias_ptr, cols, mask, softcap,
                                           HAS_REF_BIAS, SOFTCAP)
                    # b p - b q is exactly 0 when zr == z bit for bit (reference = policy)
                    g = g - b * (tl.exp(tl.where(mask, zr, m_r) - m_r) * inv_sr)
            if SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=mask)


def _block_v(vocab: int, block_v: int | None) -> int:
    if block_v is not None:
        return block_v
    return min(4096, triton.next_power_of_2(vocab))


def unlearn_rows_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: torch.Tensor | None = None,
    ref_index: torch.Tensor | None = None,
    coef_nll: torch.Tensor | None = None,
    coef_kl: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    write_grad: bool = True,
    target: torch.Tensor | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
):
    """Per-row statistics of a chunk of logits and, optionally, their gradient in place.

    Args:
        logits: (C, V) policy logits h W^T (no bias), fp32 / bf16 / fp16, last dim contiguous.
            With ``write_grad`` it is overwritten by d loss / d logits (same dtype).
        labels: (C,) int64 labels in [0, V) (ignored rows must be made safe by the caller and
            given zero coefficients).
        ref_logits: (C_ref, V) reference logits (no bias), or None.
        ref_index: (C,) int32, row of ``ref_logits`` for each row, -1 for rows without one.
        coef_nll, coef_kl: (C,) fp32 coefficients a, b of the gradient a (p - onehot(y)) +
            b (p - q) (see the module docstring). Required when ``write_grad``.
        bias, ref_bias: (V,) optional; softcap: optional cap c > 0.
        target: (C,) fp32 raw target logits <h_r, W_y> (before bias and cap), or None to read
            them from ``logits``.

    Returns:
        (nll, kl, ref_nll): (C,) fp32 each; nll = lse - z_y; kl = KL(q || p) (0 without a
        reference row); ref_nll = lse_r - zr_y (0 without a reference row).
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be a (C, V) tensor with a contiguous last dimension")
    rows, vocab = logits.shape
    dev = logits.device
    has_ref = ref_logits is not None
    if has_ref and (ref_index is None or ref_logits.stride(1) != 1
                    or ref_logits.shape[1] != vocab):
        raise ValueError("ref_logits needs ref_index and shape (C_ref, V) with contiguous rows")
    if write_grad and (coef_nll is None or (has_ref and coef_kl is None)):
        raise ValueError("write_grad needs coef_nll (and coef_kl with a reference)")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    # the kernel reads biases with unit stride: a strided view would be read wrongly
    bias = None if bias is None else bias.contiguous()
    ref_bias = None if ref_bias is None else ref_bias.contiguous()
    nll = torch.empty(rows, device=dev, dtype=torch.float32)
    kl = torch.zeros(rows, device=dev, dtype=torch.float32)
    ref_nll = torch.zeros(rows, device=dev, dtype=torch.float32)
    if rows == 0:
        return nll, kl, ref_nll
    dummy = nll  # placeholder pointer for absent optional tensors (never read)
    zr = ref_logits if has_ref else logits
    bv = _block_v(vocab, block_v)
    if num_warps is None:
        num_warps = 8 if bv >= 2048 else 4
    # CPU tensors run through the interpreter copy, CUDA tensors through the compiled one
    kernel = load_variant(__file__, interpret=dev.type == "cpu")._unlearn_rows_fwd_kernel
    kernel[(rows,)](
        logits, logits.stride(0), zr, zr.stride(0),
        ref_index if has_ref else torch.full((rows,), -1, device=dev, dtype=torch.int32),
        labels,
        coef_nll if coef_nll is not None else dummy,
        coef_kl if coef_kl is not None else dummy,
        bias if bias is not None else dummy, ref_bias if ref_bias is not None else dummy,
        nll, kl, ref_nll, target if target is not None else dummy, vocab, float(softcap or 1.0),
        HAS_TARGET=target is not None, HAS_REF=has_ref, HAS_BIAS=bias is not None,
        HAS_REF_BIAS=ref_bias is not None,
        SOFTCAP=softcap is not None, WRITE_GRAD=write_grad, BLOCK_V=bv, num_warps=num_warps,
    )
    return nll, kl, ref_nll
