"""``chunked`` backend: the chunk driver with the PyTorch row pass (any device torch runs on).

No (BT, V) logits are ever held: a chunk's (C, V) logits, its reference logits and the row
pass's fp32 temporaries (about four (C, V) buffers) plus dW. With ``num_rows`` given it reads
nothing back from the device; otherwise one count per call.
"""
from __future__ import annotations

from .driver import run_chunks, torch_row_pass
from .op import register_loss_op
from .registry import Backend, register_backend


def _run(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, options, need_dx,
         need_dw, need_db):
    return run_chunks(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
                      options, torch_row_pass, need_dx=need_dx, need_dw=need_dw,
                      need_db=need_db)


chunked_unlearn_loss = register_loss_op("fastunlearn::chunked_unlearn_loss", _run)


def _fn(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, options):
    return chunked_unlearn_loss(hidden, weight, labels, kind, ref_hidden, ref_weight, bias,
                                ref_bias, options, "chunked")


register_backend(Backend("chunked", _fn, ("cpu", "cuda"), priority=10, sync_free=True,
                         checks_rows_on_device=True,
                         description="row-chunked PyTorch, no (BT, V) logits"))
