"""Leaner activations for Llama-style blocks: RMSNorm and SwiGLU that save less for backward.

Why: in a training step most memory is activations saved for the backward pass. With the stock
Hugging Face modules under bf16 autocast, each RMSNorm keeps its fp32 input, the fp32 normalised
tensor and an fp32 output, and every projection that reads it keeps its own bf16 cast of that
output (q, k and v: three copies); the MLP keeps silu(gate) as well as gate, up and their
product. Here:

* ``RMSNorm``: saves the input and the per-token 1/rms (4 bytes) and recomputes the normalised
  tensor in backward; under autocast it returns the autocast dtype directly (what the next
  projections would cast it to anyway), so q / k / v (and gate / up) share one saved copy.
* ``SwiGLU``: down_proj(silu(gate) * up) saving gate and up only; silu(gate) and the product
  are recomputed in backward. (When down_proj is not a plain nn.Linear, e.g. LoRA-wrapped or on
  cpu_linear.py's oneDNN path, the product is still saved: down_proj keeps it.)

The forward values are those of the stock modules (same operations, same dtypes); gradients
agree to rounding (tests/test_lean_layers.py). Saved bytes per token and layer, measured with
``activation_bytes_per_token`` below, are in the README.

``use_lean_layers(model)`` swaps the forward of every matching module instance: the RMSNorm
classes listed in ``LLAMA_LIKE_RMSNORMS`` and gated MLPs with a SiLU activation
(``gate_proj`` / ``up_proj`` / ``down_proj`` / ``act_fn``).
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (xf * rstd).to(x.dtype)  # the stock module's operations
        ctx.save_for_backward(x, weight, rstd)
        return y if out_dtype is None else y.to(out_dtype)

    @staticmethod
    def backward(ctx, gy):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        gyf = gy.float()
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (gyf * xhat.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
            gw = gw.to(weight.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            gxhat = gyf * weight.float()
            # d/dx of x * rsqrt(mean(x^2) + eps)
            gx = rstd * (gxhat - xhat * (gxhat * xhat).mean(-1, keepdim=True))
            gx = gx.to(x.dtype)
        return gx, gw, None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, gy):
        gate, up = ctx.saved_tensors
        # the stock graph's own backward kernels: silu_backward(grad, x) is grad * silu'(x)
        d_gate = torch.ops.aten.silu_backward(gy * up, gate) if ctx.needs_input_grad[0] else None
        d_up = gy * F.silu(gate) if ctx.needs_input_grad[1] else None
        return d_gate, d_up


def _rmsnorm_forward(self, hidden_states):
    device_type = hidden_states.device.type
    out_dtype = _autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False) if out_dtype else contextlib.nullcontext():
        return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, out_dtype)


class _SwiGLUDown(torch.autograd.Function):
    """down_proj(silu(gate) * up) saving gate and up only: the product, which a separate
    down_proj would save for its weight gradient, is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, compute_dtype):
        w = weight if compute_dtype is None else weight.to(compute_dtype)
        b = bias if bias is None or compute_dtype is None else bias.to(compute_dtype)
        ctx.save_for_backward(gate, up, w)
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        return F.linear(F.silu(gate) * up, w, b)  # the stock module's operations

    @staticmethod
    def backward(ctx, gy):
        gate, up, w = ctx.saved_tensors
        need_gate, need_up, need_w, need_b = ctx.needs_input_grad[:4]
        gy2 = gy.reshape(-1, gy.shape[-1])
        d_w = d_b = d_gate = d_up = None
        if need_w:
            act = F.silu(gate) * up
            d_w = (gy2.t() @ act.reshape(-1, act.shape[-1])).to(ctx.weight_dtype)
        if need_b and ctx.has_bias:
            d_b = gy2.sum(0).to(ctx.weight_dtype)
        if need_gate or need_up:
            d_act = gy @ w
            if need_gate:
                d_gate = torch.ops.aten.silu_backward(d_act * up, gate)
            if need_up:
                d_up = d_act * F.silu(gate)
        return d_gate, d_up, d_w, d_b, None


def _plain_linear(m: nn.Module) -> bool:
    """An nn.Linear running its own forward: not LoRA-wrapped, not swapped (cpu_linear.py)."""
    return type(m) is nn.Linear and "forward" not in m.__dict__


def _mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    if not _plain_linear(down):
        return down(_SwiGLU.apply(gate, up))
    device_type = x.device.type
    dtype = _autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False) if dtype else contextlib.nullcontext():
        return _SwiGLUDown.apply(gate, up, down.weight, down.bias, dtype)


# transformers' RMSNorm classes whose forward is Llama's, operation for operation (checked
# against the installed transformers by tests/test_lean_layers.py). Others (Gemma's 1 + weight,
# OLMo-2's multiply before the cast) are left alone.
LLAMA_LIKE_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
                       "Phi3RMSNorm", "SmolLM3RMSNorm", "GraniteRMSNorm")


def _is_rmsnorm(m: nn.Module) -> bool:
    return type(m).__name__ in LLAMA_LIKE_RMSNORMS


_SILU_CLASSES = ("SiLU", "SiLUActivation")  # torch's and transformers' (F.silu both)


def _is_swiglu_mlp(m: nn.Module) -> bool:
    return (all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(m, "act_fn", None)).__name__ in _SILU_CLASSES)


def use_lean_layers(model: nn.Module) -> int:
    """Swap in the lean RMSNorm / SwiGLU forwards; returns how many modules were swapped."""
    n = 0
    for m in model.modules():
        if _is_rmsnorm(m):
            m.forward = types.MethodType(_rmsnorm_forward, m)
            n += 1
        elif _is_swiglu_mlp(m):
            m.forward = types.MethodType(_mlp_forward, m)
            n += 1
    return n


def activation_bytes_per_token(model: nn.Module, input_ids: torch.Tensor, autocast_dtype=None,
                               trunk: nn.Module | None = None) -> float:
    """Bytes saved for backward per input token by one forward of ``trunk`` (default: the
    model), counting each storage once and leaving parameters out (and their autocast copies,
    which do not grow with the tokens: measure two lengths and difference them for a
    per-token figure)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    device_type = input_ids.device.type
    ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else \
        contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        (trunk or model)(input_ids=input_ids, use_cache=False)
    return sum(seen.values()) / input_ids.numel()
