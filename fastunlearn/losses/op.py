"""The one autograd wrapper of every fused backend: a ``torch.library`` custom op per backend.

A backend's ``run(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
options, need_dx, need_dw, need_db)`` returns ``(loss, terms, counts, dX, dW, db)`` with the
gradients of ``loss`` for grad_output = 1 (an empty tensor for a gradient not needed). This
module turns it into a differentiable op:

* the gradients are computed in the forward; the backward scales them by grad_output in place
  (no new tensor of the head's size in the backward);
* ``set_materialize_grads(False)``: the outputs that are not the loss get no zero-filled
  gradients (a V x H and a BT x H buffer per backward otherwise);
* a fake implementation, so ``torch.compile`` treats the op as one opaque node.

``register_scaled_gradients`` is that autograd on its own: the sequence methods' one-pass op
(``sequence_term``) computes its gradients in the forward too and uses it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .options import LossOptions
from .types import LossOutput

_N_INPUTS = 20  # tensors and scalars of the op's schema below


def _fake(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, eps_forget,
          eps_mismatch, eps_normal, reduction_sum, softcap, logit_scale, ignore_index,
          chunk_rows, num_rows, need_dx, need_dw, need_db):
    f32 = torch.float32
    return (hidden.new_empty((), dtype=f32), hidden.new_empty((3,), dtype=f32),
            hidden.new_empty((3,), dtype=torch.int64),
            hidden.new_empty(hidden.shape if need_dx else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,)),
            (bias if need_db else hidden).new_empty(bias.shape if need_db else (0,)))


def register_scaled_gradients(qualname: str, n_inputs: int, grad_slots: tuple[int, ...]):
    """Autograd for a custom op whose first output is a scalar and whose last three outputs
    are its gradients (dX, dW, db) for grad_output = 1, computed in the forward (an empty
    tensor for one not needed): the backward scales them by grad_output, in place, and
    returns them for the inputs at ``grad_slots``. Every other output is non-differentiable."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output[-3:])
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[1:])
        ctx.scaled = False

    def backward(ctx, grad_loss, *_unused):
        grads = [None] * n_inputs
        if grad_loss is None:
            return tuple(grads)
        g = grad_loss.float()
        # in place the first time (these buffers belong to this op); a second backward through
        # a retained graph must not scale them twice
        scale = (lambda t: t.mul(g)) if ctx.scaled else (lambda t: t.mul_(g))
        ctx.scaled = True
        for slot, t in zip(grad_slots, ctx.saved_tensors):
            grads[slot] = scale(t) if t.numel() or t.dim() > 1 else None
        return tuple(grads)

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def register_loss_op(qualname: str, run: Callable) -> Callable:
    """Register ``run`` as the custom op ``qualname``; return ``call(hidden, ..., options,
    backend_name) -> LossOutput``."""

    @torch.library.custom_op(qualname, mutates_args=())
    def op(hidden: Tensor, weight: Tensor, labels: Tensor, kind: Tensor,
           ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], bias: Optional[Tensor],
           ref_bias: Optional[Tensor], eps_forget: float, eps_mismatch: float,
           eps_normal: float, reduction_sum: bool, softcap: Optional[float], logit_scale: float,
           ignore_index: int, chunk_rows: Optional[int], num_rows: Optional[list[int]],
           need_dx: bool, need_dw: bool, need_db: bool
           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        options = LossOptions(eps_forget, eps_mismatch, eps_normal,
                              "sum" if reduction_sum else "mean", softcap, logit_scale,
                              ignore_index, chunk_rows,
                              None if num_rows is None else tuple(num_rows))
        with torch.no_grad():
            return run(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
                       options, need_dx, need_dw, need_db)

    op.register_fake(_fake)
    register_scaled_gradients(qualname, _N_INPUTS, (0, 1, 6))  # hidden, weight, bias

    def call(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
             options: LossOptions, backend: str) -> LossOutput:
        grad = torch.is_grad_enabled()
        need = (grad and hidden.requires_grad, grad and weight.requires_grad,
                grad and bias is not None and bias.requires_grad)
        detach = (lambda t: None if t is None else t.detach())
        loss, terms, counts, *_ = op(
            hidden, weight, labels, kind, detach(ref_hidden), detach(ref_weight), bias,
            detach(ref_bias), options.eps_forget, options.eps_mismatch, options.eps_normal,
            options.reduction_sum, options.softcap, options.logit_scale, options.ignore_index,
            options.chunk_rows, None if options.num_rows is None else list(options.num_rows),
            *need)
        return LossOutput(loss, terms[0], terms[1], terms[2], counts[0], counts[1], counts[2],
                          backend=backend)

    call.op = op
    return call
