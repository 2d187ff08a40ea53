"""Triton backend of the fused unlearning loss and of the token-stats primitive.

Autograd glue only; the kernels and their launchers live in ``fastunlearn.triton_kernels``.
Both primitives are ``torch.library`` custom ops (``fastunlearn::triton_unlearn_loss``,
``fastunlearn::triton_token_stats`` and its backward) with fake implementations, so
``torch.compile`` treats them as opaque nodes instead of tracing into Triton launches.

* The unlearning loss computes its gradients in the forward (``grad_output = 1``) and the
  backward only scales them: dX by ``g`` and the fp32 dW by ``g`` while casting to the weight
  dtype in one fused ``torch.mul(..., out=)`` (no fp32 temporary).
* The token stats (``logp``, ``logp_ref``, ``kl`` per token) have a recompute backward that takes
  per-token upstream gradients (NPO, SimNPO, DPO-style losses).

Availability: on CUDA when Triton imports; on CPU only with ``TRITON_INTERPRET=1`` (the
interpreter, used by CI), so that ``auto`` never picks this backend for CPU tensors otherwise.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .registry import Backend, register_backend
from .types import IGNORE_INDEX, LossOutput, check_options, scaled_as

_OP_NS = "fastunlearn"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    """Import the launchers lazily: Triton decides at decoration time whether a kernel runs
    through the interpreter, so TRITON_INTERPRET must be set before the first import."""
    from fastunlearn.triton_kernels import fused_loss

    return fused_loss


def availability(device_type: str | None) -> tuple[bool, str]:
    """(ok, reason) for running the Triton backend on ``device_type``."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return False, f"triton not importable: {type(exc).__name__}"
    if device_type == "cpu":
        if _interpret():
            return True, "cpu through TRITON_INTERPRET=1"
        return False, "cpu tensors need TRITON_INTERPRET=1"
    if device_type in ("cuda", None):
        if torch.cuda.is_available():
            return True, "cuda + triton"
        if device_type is None and _interpret():
            return True, "cpu through TRITON_INTERPRET=1"
        return False, "no CUDA device"
    return False, f"unsupported device {device_type}"


def _scale_grads(g, dx, dw, db, hidden_dtype, weight_dtype, bias_dtype, needs):
    """grad_output g (0-dim) times the saved gradients, cast to the inputs' dtypes in one pass."""
    g = g.float()
    d_hidden = d_weight = d_bias = None
    if needs[0]:
        d_hidden = torch.mul(dx, g.to(dx.dtype) if dx.dtype != torch.float32 else g)
        d_hidden = d_hidden.to(hidden_dtype)
    if needs[1]:
        d_weight = scaled_as(dw, g, weight_dtype)
    if needs[2] and db is not None and db.numel():
        d_bias = scaled_as(db, g, bias_dtype)
    return d_hidden, d_weight, d_bias


# ----------------------------------------------------------------------------- unlearn loss

def _unlearn_impl(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
                  eps_forget, eps_mismatch, eps_normal, softcap, reduction, ignore_index,
                  chunk_rows, num_rows):
    loss, terms, counts, dx, dw, db = _kernels().unlearn_loss_fwd(
        hidden.detach(), weight.detach(), labels, kind,
        None if ref_hidden is None else ref_hidden.detach(),
        None if ref_weight is None else ref_weight.detach(),
        eps_forget=eps_forget, eps_mismatch=eps_mismatch, eps_normal=eps_normal,
        bias=None if bias is None else bias.detach(),
        ref_bias=None if ref_bias is None else ref_bias.detach(), softcap=softcap,
        reduction=reduction, ignore_index=ignore_index, chunk_rows=chunk_rows,
        num_rows=None if num_rows is None else tuple(num_rows))
    if db is None:
        db = torch.empty(0, device=hidden.device, dtype=torch.float32)
    return loss, terms, counts, dx, dw, db


class TritonUnlearnLossFunction(torch.autograd.Function):
    """Autograd form (used when torch.library.custom_op is unavailable): gradients computed in
    the forward, scaled by grad_output in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
                eps_forget, eps_mismatch, eps_normal, softcap, reduction, ignore_index,
                chunk_rows, num_rows):
        loss, terms, counts, dx, dw, db = _unlearn_impl(
            hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, eps_forget,
            eps_mismatch, eps_normal, softcap, reduction, ignore_index, chunk_rows, num_rows)
        ctx.save_for_backward(dx, dw, db)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(terms, counts)
        return loss, terms, counts

    @staticmethod
    def backward(ctx, g, _gt, _gc):
        dx, dw, db = ctx.saved_tensors
        n = ctx.needs_input_grad
        dh, dwt, dbias = _scale_grads(g, dx, dw, db, *ctx.dtypes, (n[0], n[1], n[6]))
        return (dh, dwt, None, None, None, None, dbias) + (None,) * 9


_HAS_CUSTOM_OP = hasattr(torch, "library") and hasattr(torch.library, "custom_op") and hasattr(
    torch.library, "register_autograd")
_unlearn_op = None
_token_stats_op = None
_token_stats_bwd_op = None

if _HAS_CUSTOM_OP:
    Tensor = torch.Tensor

    @torch.library.custom_op(f"{_OP_NS}::triton_unlearn_loss", mutates_args=())
    def _unlearn_op(hidden: Tensor, weight: Tensor, labels: Tensor, kind: Tensor,
                    ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor],
                    bias: Optional[Tensor], ref_bias: Optional[Tensor], eps_forget: float,
                    eps_mismatch: float, eps_normal: float, softcap: Optional[float],
                    reduction: str, ignore_index: int, chunk_rows: Optional[int],
                    num_rows: Optional[list[int]]
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(loss, terms(3), counts(3), d_hidden, d_weight fp32, d_bias fp32 or empty)."""
        return _unlearn_impl(hidden, weight, labels, kind, ref_hidden, ref_weight, bias,
                             ref_bias, eps_forget, eps_mismatch, eps_normal, softcap,
                             reduction, ignore_index, chunk_rows, num_rows)

    @_unlearn_op.register_fake
    def _unlearn_fake(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
                      eps_forget, eps_mismatch, eps_normal, softcap, reduction, ignore_index,
                      chunk_rows, num_rows):
        f32 = torch.float32
        return (hidden.new_empty((), dtype=f32), hidden.new_empty((3,), dtype=f32),
                hidden.new_empty((3,), dtype=torch.int64),
                hidden.new_empty(hidden.shape, dtype=hidden.dtype),
                weight.new_empty(weight.shape, dtype=f32),
                weight.new_empty((weight.shape[0],) if bias is not None else (0,), dtype=f32))

    def _unlearn_setup(ctx, inputs, output):
        hidden, weight, bias = inputs[0], inputs[1], inputs[6]
        _, terms, counts, dx, dw, db = output
        ctx.save_for_backward(dx, dw, db)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(terms, counts, dx, dw, db)

    def _unlearn_backward(ctx, g, *_unused):
        dx, dw, db = ctx.saved_tensors
        n = ctx.needs_input_grad
        dh, dwt, dbias = _scale_grads(g, dx, dw, db, *ctx.dtypes, (n[0], n[1], n[6]))
        return (dh, dwt, None, None, None, None, dbias) + (None,) * 9

    torch.library.register_autograd(f"{_OP_NS}::triton_unlearn_loss", _unlearn_backward,
                                    setup_context=_unlearn_setup)


def triton_unlearn_loss(hidden, weight, labels, kind, ref_hidden=None, ref_weight=None, *,
                        eps_forget, eps_mismatch, eps_normal, bias=None, ref_bias=None,
                        softcap=None, reduction="mean", ignore_index=IGNORE_INDEX,
                        chunk_rows=None, num_rows=None) -> LossOutput:
    """The fused unlearning loss on the Triton backend (signature of ``chunked_unlearn_loss``).

    Args:
        hidden: (BT, H) fp32 / bf16 / fp16, any strides; weight: (V, H); labels, kind: (BT,).
        ref_hidden: (BT, H) aligned with hidden or None; ref_weight: (V, H) or None (= weight).
        num_rows: optional host ints (n_forget, n_mismatch, n_normal) of valid rows; when the
            caller knows them (the trainer counts on the host) the forward has no host sync.

    Returns:
        LossOutput (backend "triton"): differentiable ``loss``; terms and int64 counts on the
        device. Sign: loss = -eps_forget * forget_nll + eps_mismatch * mismatch_nll
        + eps_normal * normal_kl.

    Example:
        >>> out = triton_unlearn_loss(h, W, labels, kind, ref_h, eps_forget=0.5,
        ...                           eps_mismatch=1.0, eps_normal=1.0)
        >>> out.loss.backward()
    """
    check_options(reduction, softcap, chunk_rows)
    args = (hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
            float(eps_forget), float(eps_mismatch), float(eps_normal),
            None if softcap is None else float(softcap), reduction, int(ignore_index),
            None if chunk_rows is None else int(chunk_rows),
            None if num_rows is None else [int(n) for n in num_rows])
    if _unlearn_op is not None:
        loss, terms, counts, *_ = _unlearn_op(*args)
    else:
        loss, terms, counts = TritonUnlearnLossFunction.apply(*args)
    return LossOutput(loss, terms[0], terms[1], terms[2], counts[0], counts[1], counts[2],
                      backend="triton")


# ----------------------------------------------------------------------------- token stats

def _ts_kwargs(bias, ref_bias, softcap, ignore_index, chunk_rows):
    return dict(bias=None if bias is None else bias.detach(),
                ref_bias=None if ref_bias is None else ref_bias.detach(), softcap=softcap,
                ignore_index=ignore_index, chunk_rows=chunk_rows)


def _d(t):
    return None if t is None else t.detach()


if _HAS_CUSTOM_OP:

    @torch.library.custom_op(f"{_OP_NS}::triton_token_stats", mutates_args=())
    def _token_stats_op(hidden: Tensor, weight: Tensor, labels: Tensor,
                        ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor],
                        bias: Optional[Tensor], ref_bias: Optional[Tensor],
                        softcap: Optional[float], ignore_index: int,
                        chunk_rows: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
        """(logp, logp_ref, kl), each (BT,) fp32."""
        return _kernels().token_stats_fwd(
            hidden.detach(), weight.detach(), labels, _d(ref_hidden), _d(ref_weight),
            **_ts_kwargs(bias, ref_bias, softcap, ignore_index, chunk_rows))

    @_token_stats_op.register_fake
    def _token_stats_fake(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias,
                          softcap, ignore_index, chunk_rows):
        bt = hidden.shape[0]
        return tuple(hidden.new_empty((bt,), dtype=torch.float32) for _ in range(3))

    @torch.library.custom_op(f"{_OP_NS}::triton_token_stats_backward", mutates_args=())
    def _token_stats_bwd_op(grad_logp: Tensor, grad_kl: Tensor, hidden: Tensor, weight: Tensor,
                            labels: Tensor, ref_hidden: Optional[Tensor],
                            ref_weight: Optional[Tensor], bias: Optional[Tensor],
                            ref_bias: Optional[Tensor], softcap: Optional[float],
                            ignore_index: int, chunk_rows: Optional[int]
                            ) -> tuple[Tensor, Tensor, Tensor]:
        """(d_hidden, d_weight fp32, d_bias fp32 or empty) for per-token upstream grads."""
        dx, dw, db = _kernels().token_stats_bwd(
            grad_logp, grad_kl, hidden.detach(), weight.detach(), labels, _d(ref_hidden),
            _d(ref_weight), **_ts_kwargs(bias, ref_bias, softcap, ignore_index, chunk_rows))
        if db is None:
            db = torch.empty(0, device=hidden.device, dtype=torch.float32)
        return dx, dw, db

    @_token_stats_bwd_op.register_fake
    def _token_stats_bwd_fake(grad_logp, grad_kl, hidden, weight, labels, ref_hidden,
                              ref_weight, bias, ref_bias, softcap, ignore_index, chunk_rows):
        f32 = torch.float32
        return (hidden.new_empty(hidden.shape), weight.new_empty(weight.shape, dtype=f32),
                weight.new_empty((weight.shape[0],) if bias is not None else (0,), dtype=f32))

    def _ts_setup(ctx, inputs, output):
        (hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias, softcap,
         ignore_index, chunk_rows) = inputs
        ctx.save_for_backward(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias)
        ctx.cfg = (softcap, ignore_index, chunk_rows)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(output[1])

    def _ts_backward(ctx, g_logp, _g_ref, g_kl):
        hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias = ctx.saved_tensors
        bt = hidden.shape[0]
        zeros = hidden.new_zeros((bt,), dtype=torch.float32)
        g_logp = zeros if g_logp is None else g_logp
        g_kl = zeros if g_kl is None else g_kl
        dx, dw, db = _token_stats_bwd_op(g_logp, g_kl, hidden, weight, labels, ref_hidden,
                                         ref_weight, bias, ref_bias, *ctx.cfg)
        n = ctx.needs_input_grad
        one = torch.ones((), device=hidden.device)
        dh, dwt, dbias = _scale_grads(one, dx, dw, db, *ctx.dtypes, (n[0], n[1], n[5]))
        return dh, dwt, None, None, None, dbias, None, None, None, None

    torch.library.register_autograd(f"{_OP_NS}::triton_token_stats", _ts_backward,
                                    setup_context=_ts_setup)


def token_stats(hidden, weight, labels, ref_hidden=None, ref_weight=None, *, bias=None,
                ref_bias=None, softcap=None, ignore_index=IGNORE_INDEX, chunk_rows=None):
    """Per-token statistics on the Triton backend (spec: ``reference.token_stats_ref``).

    Args:
        hidden: (BT, H) fp32 / bf16 / fp16; weight: (V, H); labels: (BT,) int.
        ref_hidden: (BT, H) or None; ref_weight: (V, H) or None (= weight, no gradient).

    Returns:
        (logp, logp_ref, kl), each (BT,) fp32: log p(label) under the policy
        (differentiable), under the reference (no grad), and KL(p_ref || p_cur)
        (differentiable); 0 on ignored rows; logp_ref and kl are 0 without a reference. The
        backward recomputes the logits chunk by chunk and accepts any per-token upstream
        gradients.

    Example:
        >>> logp, logp_ref, kl = token_stats(h, W, labels, ref_h)
        >>> (-(logp - logp_ref).sigmoid().log()).mean().backward()   # NPO-like
    """
    if _token_stats_op is None:
        raise RuntimeError("token_stats needs torch.library.custom_op (torch >= 2.4)")
    if labels.dim() != 1 or hidden.dim() != 2 or labels.shape[0] != hidden.shape[0]:
        raise ValueError("token_stats: hidden must be (BT, H) and labels (BT,)")
    check_options(softcap=softcap, chunk_rows=chunk_rows)
    return _token_stats_op(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias,
                           None if softcap is None else float(softcap), int(ignore_index),
                           None if chunk_rows is None else int(chunk_rows))


_BACKEND = Backend(
    "triton", triton_unlearn_loss, ("cuda", "cpu"), priority=100, availability=availability,
    description="cuBLAS row chunks + one Triton row kernel per chunk (fused NLL / KL / grads)")
# CPU support is for the interpreter (CI) only: a registry that reads this attribute keeps
# `auto` on CPU from counting triton as a skipped faster backend (no fallback warning).
_BACKEND.auto_devices = ("cuda",)
register_backend(_BACKEND)
