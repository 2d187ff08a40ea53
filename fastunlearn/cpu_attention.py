"""Attention of bf16 / fp16 models on CPU, in fp32 where that is faster.

Why: PyTorch's CPU flash-attention kernel runs its bf16 backward far slower than its fp32 one
at short sequences: SmolLM2-135M heads (9 query / 3 key-value heads of 64), 6 sequences of 128
tokens, forward + backward of one layer take 18 ms in bf16 and 8 ms on fp32 copies of q / k /
v (2-core AMD EPYC, torch 2.13); at 1024 tokens bf16 is the faster one. Attention computed on
upcast inputs is at least as precise as in bf16, so the faster of the two can run, per shape.

``use_fp32_attention_where_faster(model)`` points the model at an attention function (Hugging
Face's attention interface, registered as ``ATTN_NAME``) that wraps the ``sdpa`` one: a CPU
call in a low-precision dtype times both ways once per shape bucket (forward and backward,
alternating rounds, median) and keeps the faster. The choice does not depend on grad mode, so
a model computes the same values with and without autograd (a cached reference matches the
policy it was computed from). Anything else goes to ``sdpa`` unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cpu_linear import median_ratio
from .log import get_logger

ATTN_NAME = "fastunlearn_cpu_sdpa"
_TIMING_ROUNDS = 5
_FP32_FASTER: dict[tuple, bool] = {}  # shape bucket -> fp32 attention wins


def _bucket(query: torch.Tensor, key: torch.Tensor) -> tuple:
    """The timing key: batch, heads, head size, dtype, and the sequence lengths rounded up to a
    power of two (padded batches vary in length from step to step)."""
    b, hq, tq, d = query.shape
    tk = key.shape[2]
    return (b, hq, key.shape[1], d, query.dtype, 1 << max(tq - 1, 0).bit_length(),
            1 << max(tk - 1, 0).bit_length())


@torch.compiler.disable
def fp32_is_faster(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether causal attention of this shape bucket runs faster (forward + backward) on fp32
    copies of its inputs than in their own dtype; timed once per bucket."""
    bucket = _bucket(query, key)
    if bucket not in _FP32_FASTER:
        b, hq, hk, d, dtype, tq, tk = bucket
        g = torch.Generator().manual_seed(0)
        tensors = [torch.randn(b, h, t, d, generator=g).to(dtype)
                   for h, t in ((hq, tq), (hk, tk), (hk, tk))]
        grad_out = torch.randn(b, hq, tq, d, generator=g).to(dtype)
        gqa = hq != hk

        def run(up: bool):
            q, k, v = (t.detach().float() if up else t.detach() for t in tensors)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            with torch.enable_grad():
                out = F.scaled_dot_product_attention(q, k, v, is_causal=tq == tk,
                                                     enable_gqa=gqa)
                out.to(dtype).backward(grad_out)

        with torch.autocast("cpu", enabled=False):
            _FP32_FASTER[bucket] = median_ratio(lambda: run(True), lambda: run(False),
                                                _TIMING_ROUNDS) < 1.0
        get_logger(__name__).info(
            f"cpu attention {b}x{hq}x{tq}x{d} ({hk} kv heads, {dtype}): "
            f"{'fp32' if _FP32_FASTER[bucket] else 'native'} is faster")
    return _FP32_FASTER[bucket]


def cpu_sdpa_attention(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    """Hugging Face's ``sdpa`` attention, on fp32 copies of q / k / v (and a float mask) where
    that is faster (``fp32_is_faster``); the output comes back in the inputs' dtype."""
    low = query.dtype in (torch.bfloat16, torch.float16)
    if query.device.type != "cpu" or not low or not fp32_is_faster(query, key):
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):  # autocast would cast the copies back
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                              attention_mask, *args, **kwargs)
    return out.to(query.dtype), weights


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_NAME, cpu_sdpa_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)  # the masks sdpa builds


def use_fp32_attention_where_faster(model: nn.Module) -> bool:
    """Switch a model that uses ``sdpa`` attention to ``cpu_sdpa_attention``; returns whether
    it was switched (other attention implementations are left alone)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    model.set_attn_implementation(ATTN_NAME)
    return True


def restore_attention(model: nn.Module) -> None:
    """Undo ``use_fp32_attention_where_faster``."""
    if getattr(model.config, "_attn_implementation", None) == ATTN_NAME:
        model.set_attn_implementation("sdpa")
