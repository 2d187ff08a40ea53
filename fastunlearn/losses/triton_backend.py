"""Triton backend of the fused unlearning loss and of the token-stats primitive.

The kernels and their launchers live in ``fastunlearn.triton_kernels``.

* The unlearning loss is the shared chunk driver (``driver.run_chunks``) with the Triton row
  kernel as its row pass, wrapped by the shared custom op (``op``).
* The token stats (``logp``, ``logp_ref``, ``kl`` per token) have a recompute backward that takes
  per-token upstream gradients (NPO, SimNPO, DPO-style losses).

Availability: on CUDA when Triton imports; on CPU only with ``TRITON_INTERPRET=1`` (the
interpreter, used by CI), so that ``auto`` never picks this backend for CPU tensors otherwise.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional

import torch

from .checks import check_float
from .driver import plan_chunks, run_chunks
from .op import register_loss_op
from .options import LossOptions
from .registry import Backend, register_backend
from .types import IGNORE_INDEX, scaled_as

_OP_NS = "fastunlearn"
_DTYPES = (torch.float32, torch.bfloat16)
Tensor = torch.Tensor


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    """Import the launchers lazily: Triton decides at decoration time whether a kernel runs
    through the interpreter, so TRITON_INTERPRET must be set before the first import."""
    from fastunlearn.triton_kernels import token_stats, unlearn_rows

    return SimpleNamespace(unlearn_rows_fwd=unlearn_rows.unlearn_rows_fwd,
                           token_stats_fwd=token_stats.token_stats_fwd,
                           token_stats_bwd=token_stats.token_stats_bwd)


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
    """grad_output g (0-dim) times the token-stats gradients, cast to the inputs' dtypes."""
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

def triton_row_pass(z, zr, labels, scale, ref_start, hc, w, bias, ref_bias, softcap):
    """The driver's row pass (contract in ``driver``) on the Triton row kernel."""
    rows = z.shape[0]
    ar = torch.arange(rows, device=z.device, dtype=torch.int32)
    is_nll = ar < ref_start
    zero = torch.zeros((), device=z.device, dtype=torch.float32)
    ref_index = torch.where(is_nll, -1, ar - ref_start).to(torch.int32) if zr is not None \
        else None
    target = (hc.float() * w.index_select(0, labels).float()).sum(1)  # fp32 target logits
    nll, kl, _ = _kernels().unlearn_rows_fwd(
        z, labels, zr, ref_index, torch.where(is_nll, scale, zero),
        torch.where(is_nll, zero, scale), bias=bias, ref_bias=ref_bias, softcap=softcap,
        target=target, block_v=_block_v_from_env())
    return torch.where(is_nll, nll, kl)


def _block_v_from_env() -> int | None:
    v = os.environ.get("FASTUNLEARN_TRITON_BLOCK_V")
    return int(v) if v else None


def _run(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, options, need_dx,
         need_dw, need_db):
    return run_chunks(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
                      options, triton_row_pass, need_dx=need_dx, need_dw=need_dw,
                      need_db=need_db)


triton_unlearn_loss = register_loss_op(f"{_OP_NS}::triton_unlearn_loss", _run)


def _fn(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, options):
    return triton_unlearn_loss(hidden, weight, labels, kind, ref_hidden, ref_weight, bias,
                               ref_bias, options, "triton")


# ----------------------------------------------------------------------------- token stats

def _ts_kwargs(hidden, weight, ref_hidden, bias, ref_bias, softcap, ignore_index, chunk_rows):
    if chunk_rows is None:  # the driver's plan (one planning function for every loop)
        chunk_rows = plan_chunks(hidden.shape[0], 0 if ref_hidden is None else hidden.shape[0],
                                 weight.shape[0], weight.element_size(), hidden.device.type).rows
    return dict(bias=None if bias is None else bias.detach(),
                ref_bias=None if ref_bias is None else ref_bias.detach(), softcap=softcap,
                ignore_index=ignore_index, chunk_rows=max(1, chunk_rows))


def _d(t):
    return None if t is None else t.detach()


@torch.library.custom_op(f"{_OP_NS}::triton_token_stats", mutates_args=())
def _token_stats_op(hidden: Tensor, weight: Tensor, labels: Tensor,
                    ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor],
                    bias: Optional[Tensor], ref_bias: Optional[Tensor],
                    softcap: Optional[float], ignore_index: int,
                    chunk_rows: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, logp_ref, kl), each (BT,) fp32."""
    return _kernels().token_stats_fwd(
        hidden.detach(), weight.detach(), labels, _d(ref_hidden), _d(ref_weight),
        **_ts_kwargs(hidden, weight, ref_hidden, bias, ref_bias, softcap, ignore_index,
                    chunk_rows))

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
        _d(ref_weight), **_ts_kwargs(hidden, weight, ref_hidden, bias, ref_bias, softcap,
                                     ignore_index, chunk_rows))
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
    if labels.dim() != 1 or hidden.dim() != 2 or labels.shape[0] != hidden.shape[0]:
        raise ValueError("token_stats: hidden must be (BT, H) and labels (BT,)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"token_stats: weight must be (V, {hidden.shape[1]}), got "
                         f"{tuple(weight.shape)}")
    options = LossOptions(softcap=softcap, chunk_rows=chunk_rows, ignore_index=ignore_index)
    for name, t in (("hidden", hidden), ("weight", weight)):
        check_float(t, name, _DTYPES, "triton")
    softcap, chunk_rows = options.softcap, options.chunk_rows
    return _token_stats_op(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias,
                           None if softcap is None else float(softcap), int(ignore_index),
                           None if chunk_rows is None else int(chunk_rows))


# CPU support is for the interpreter (CI) only: ``auto`` never picks triton for CPU tensors
# (nor warns that it skipped it).
register_backend(Backend(
    "triton", _fn, ("cuda", "cpu"), priority=100, availability=availability,
    auto_devices=("cuda",), dtypes=_DTYPES, sync_free=True, checks_rows_on_device=True,
    description="cuBLAS row chunks + one Triton row kernel per chunk (fused NLL / KL / grads)"))
