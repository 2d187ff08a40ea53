"""Triton AdamW step for bf16 weights with stochastic rounding: one pass, no fp32 master copy.

Math (per element, everything in fp32 registers, torch.optim.AdamW's order and formula):

    p <- p * (1 - lr * wd)                                   decoupled weight decay
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

then p, m and v are stored in their own dtypes. A bf16 destination is rounded stochastically:
add 16 random bits to the low half of the fp32 bit pattern and truncate. The result is one of
the two bf16 neighbours of x, the upper one with probability (x - lower) / (upper - lower), so
E[round(x)] = x. Rounding to nearest would drop every update smaller than half a bf16
spacing (2^-9 to 2^-8 relative): at lr 2e-6 that is nearly all of them, and v (beta2 = 0.999
moves it by 0.1 % a step) would freeze. Random bits come from a counter-based hash of the
element index keyed by a per-call seed (murmur3's finaliser; Triton's own Philox functions are
not callable from the interpreted copy of this kernel that CI runs): 16 bits each for p, m, v.

Bytes moved per element: read p, g, m, v, write p, m, v; bf16 throughout that is 14 bytes,
against 28 for fused AdamW on fp32 weights. Memory per parameter: 8 bytes (bf16 weight,
gradient, m, v) against 16. Llama-3.2-1B (1.24e9 parameters): about 17 GB moved, ~4 ms at
4.3 TB/s. FLOP floor: ~20 per element, negligible: the kernel is bandwidth bound.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._variants import load_variant

BLOCK = 1024


@triton.jit
def _mix32(x):
    """murmur3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2,
    so consecutive counters give independent-looking random words."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _stochastic_round(x, r):
    """fp32 -> fp32 with the low 16 bits cleared (exactly a bf16 value): adding 16 random bits
    below the kept half carries into it with probability = the discarded fraction."""
    bits = (x.to(tl.int32, bitcast=True) + (r & 0xFFFF).to(tl.int32)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["seed"])  # seed == 1 would become a constexpr
def _adamw_sr_fwd_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, beta1, beta2, eps, decay, step_size,
                         inv_bc2_sqrt, seed, SR_P: tl.constexpr, SR_M: tl.constexpr,
                         SR_V: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # 1. load everything as fp32
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # 2. AdamW in torch's order: decay, moments, bias-corrected update
    p = p * decay
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) * inv_bc2_sqrt + eps)
    # 3. bf16 destinations are rounded stochastically, each with its own 16 random bits.
    #    Keyed twice through the mixer, so two seeds give unrelated streams (a seed added to the
    #    counter would give the same stream shifted, shared between calls).
    r = _mix32(_mix32(offs.to(tl.uint32)) ^ seed.to(tl.uint32))
    if SR_P:
        p = _stochastic_round(p, r)
    if SR_M:
        m = _stochastic_round(m, r >> 16)
    if SR_V:
        v = _stochastic_round(v, _mix32(r))
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


def adamw_sr_fwd(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, *, beta1: float, beta2: float, eps: float,
                 decay: float, step_size: float, inv_bc2_sqrt: float, seed: int) -> None:
    """One AdamW step in place on contiguous tensors of equal numel (any float dtypes; bf16
    destinations are rounded stochastically). ``decay`` = 1 - lr * weight_decay, ``step_size``
    = lr / (1 - beta1^t), ``inv_bc2_sqrt`` = 1 / sqrt(1 - beta2^t), ``seed`` keys the random
    bits (use a fresh one every call). CPU tensors run through the Triton interpreter."""
    n = param.numel()
    for t in (grad, exp_avg, exp_avg_sq):
        if t.numel() != n or not t.is_contiguous() or t.device != param.device:
            raise ValueError("adamw_sr_fwd: param, grad and states must be contiguous, on one "
                             "device, with the same number of elements")
    if not param.is_contiguous():
        raise ValueError("adamw_sr_fwd: param must be contiguous")
    if n == 0:
        return
    bf16 = torch.bfloat16
    kernel = load_variant(__file__, interpret=param.device.type == "cpu")._adamw_sr_fwd_kernel
    kernel[(triton.cdiv(n, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, n, beta1, beta2, eps, decay, step_size, inv_bc2_sqrt,
        seed, SR_P=param.dtype == bf16, SR_M=exp_avg.dtype == bf16,
        SR_V=exp_avg_sq.dtype == bf16, BLOCK=BLOCK, num_warps=4)
