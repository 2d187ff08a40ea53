"""A sequence method's forget term with its gradients in one pass over the head.

NPO, SimNPO and IdkDPO weight every token of a sequence by a factor known only once the whole
sequence's log-likelihood is (``methods.sequence_term_and_weights``). Through ``token_stats``
that costs two passes: the forward's logits give the sums, and the backward computes the logits
again to weight them. When every sequence (every idk_dpo pair) fits in one chunk of the driver,
one pass does it: chunks hold whole sequences (pairs), and after a chunk's row pass its own
values give its sequences' factors, which scale the chunk's dX rows and the hidden rows of its
dW GEMM (``driver.run_chunks``'s ``chunk_weights``). Per forget row that is three GEMMs against
the head (logits, dX, dW) instead of four, the paper's forget-row cost.

``sequence_forget_term`` picks the path: the one-pass custom op (``fastunlearn::sequence_term``,
gradients computed in the forward and scaled by grad_output in the backward, like the fused
loss) on the backends that run the chunk driver (chunked, cpp, cuda, triton) when the
sequences fit, otherwise ``token_stats`` and the method's formula (the same values, two
passes).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .driver import bytes_per_logit, gemm_dtype, plan_chunks, run_chunks
from .op import register_scaled_gradients
from .token_stats import (
    _DRIVER_BACKENDS,
    _NLL_ROWS,
    _pass_options,
    checked_rows,
    row_pass_of,
    token_stats,
)
from .types import IGNORE_INDEX

ONE_PASS_BACKENDS = (*_DRIVER_BACKENDS, "triton")  # the backends on the chunk driver


def group_chunks(group_sizes: list[int], max_rows: int) -> list[int] | None:
    """Chunk sizes that hold whole groups (consecutive), each at most ``max_rows`` rows, as few
    as greedy packing gives; None when one group alone is larger."""
    sizes, current = [], 0
    for n in group_sizes:
        if n > max_rows:
            return None
        if current + n > max_rows:
            sizes.append(current)
            current = 0
        current += n
    if current:
        sizes.append(current)
    return sizes


@torch.library.custom_op("fastunlearn::sequence_term", mutates_args=())
def _sequence_term_op(hidden: Tensor, weight: Tensor, labels: Tensor, segment: Tensor,
                      logp_ref: Optional[Tensor], pairs: Optional[Tensor], bias: Optional[Tensor],
                      method: str, n_segments: int, beta: Optional[float], gamma: float,
                      softcap: Optional[float], logit_scale: float, chunk_sizes: list[int],
                      backend: str, need_dx: bool, need_dw: bool, need_db: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(term, logp, dX, dW, db): the "sum" forget term over rows that are all valid and grouped
    by ``chunk_sizes``, each row's log p(label), and the term's gradients (grad_output = 1)."""
    from .methods import sequence_term_and_weights

    options = _pass_options(softcap, logit_scale, IGNORE_INDEX, None)
    row_pass, contiguous, fp32_gemm = row_pass_of(backend)
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)

    def chunk_weights(start, rows, vals):
        nonlocal total
        ref = None if logp_ref is None else logp_ref[start:start + rows].float()
        term, d_logp = sequence_term_and_weights(method, -vals, ref,
                                                 segment[start:start + rows], n_segments, pairs,
                                                 beta, gamma)
        total = total + term
        return -d_logp  # the row pass's values are NLL = -logp

    kind = torch.full(labels.shape, _NLL_ROWS, device=hidden.device, dtype=torch.long)
    nll = torch.zeros(labels.shape, device=hidden.device, dtype=torch.float32)
    _loss, _terms, _counts, dx, dw, db = run_chunks(
        hidden, weight.contiguous() if contiguous else weight, labels, kind, None, None, bias,
        None, options, row_pass, need_dx=need_dx, need_dw=need_dw, need_db=need_db,
        row_values=nll, fp32_gemm=fp32_gemm, chunk_sizes=chunk_sizes,
        chunk_weights=chunk_weights)
    return total, nll.neg_(), dx, dw, db


@_sequence_term_op.register_fake
def _sequence_term_fake(hidden, weight, labels, segment, logp_ref, pairs, bias, method,
                        n_segments, beta, gamma, softcap, logit_scale, chunk_sizes, backend,
                        need_dx, need_dw, need_db):
    f32 = torch.float32
    return (hidden.new_empty((), dtype=f32), hidden.new_empty(labels.shape, dtype=f32),
            hidden.new_empty(hidden.shape if need_dx else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,)),
            (bias if need_db else hidden).new_empty(bias.shape if need_db else (0,)))


register_scaled_gradients("fastunlearn::sequence_term", 18, (0, 1, 6))  # hidden, weight, bias


def _one_pass_chunks(backend: str, hidden, weight, group, chunk_rows) -> list[int] | None:
    """Chunk sizes of whole groups within the driver's chunk budget, or None (no one pass)."""
    if backend not in ONE_PASS_BACKENDS or not group.numel():
        return None
    row_pass = row_pass_of(backend)[0]
    max_rows = plan_chunks(group.numel(), 0, weight.shape[0],
                           bytes_per_logit(gemm_dtype(weight), row_pass),
                           hidden.device.type, chunk_rows).rows
    sizes = torch.unique_consecutive(group, return_counts=True)[1]
    return group_chunks(sizes.tolist(), max_rows)


def sequence_forget_term(method: str, hidden: Tensor, weight: Tensor, labels: Tensor,
                         segment: Tensor, n_segments: int, pairs: Tensor | None = None,
                         logp_ref: Tensor | None = None, *, bias: Tensor | None = None,
                         softcap: float | None = None, logit_scale: float = 1.0,
                         ignore_index: int = IGNORE_INDEX, beta: float | None = None,
                         gamma: float = 0.0, backend: str = "auto",
                         chunk_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """(term, logp): a sequence method's forget term, summed over its sequences (pairs), and
    every row's log p(label) (detached; 0 on rows left out).

    hidden (N, H), labels (N,), segment (N,) (-1: no sequence), logp_ref (N,) the reference's
    log p(label) per row (npo, idk_dpo) or None; the rest as in ``method_forget_loss``. Rows
    that are ignored or in no sequence are left out before the head runs."""
    options = _pass_options(softcap, logit_scale, ignore_index, chunk_rows)
    chosen, hidden, _, labels, _ = checked_rows(hidden, weight, labels, None, None, bias, None,
                                                options, backend)
    rows = ((labels != ignore_index) & (segment >= 0)).nonzero().squeeze(1)
    group = segment[rows]
    if method == "idk_dpo":  # a pair's two sequences share a chunk
        pair_of = torch.full((n_segments,), -1, dtype=torch.long, device=segment.device)
        ids = torch.arange(pairs.shape[0], device=segment.device)
        pair_of[pairs[:, 0]] = ids
        pair_of[pairs[:, 1]] = ids
        group = pair_of[group]
        keep = group >= 0  # a sequence of no pair adds nothing
        rows, group = rows[keep], group[keep]
    order = torch.sort(group, stable=True).indices
    rows, group = rows[order], group[order]
    sizes = _one_pass_chunks(chosen, hidden, weight, group, chunk_rows)
    logp = torch.zeros(labels.shape, device=hidden.device, dtype=torch.float32)
    ref = None if logp_ref is None else logp_ref[rows].detach()
    if sizes is None:  # two passes: token_stats, then the formula
        from .methods import forget_term_from_logprobs

        row_logp = token_stats(hidden[rows], weight, labels[rows], bias=bias, softcap=softcap,
                               logit_scale=logit_scale, ignore_index=ignore_index,
                               backend=chosen, chunk_rows=chunk_rows, with_kl=False)[0]
        term = forget_term_from_logprobs(
            method, row_logp, ref, torch.ones_like(group, dtype=torch.bool), segment[rows],
            n_segments, pairs, beta, gamma, "sum")
        return term, logp.index_copy_(0, rows, row_logp.detach())
    grad = torch.is_grad_enabled()
    need = (grad and hidden.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad)
    term, row_logp, *_ = _sequence_term_op(
        hidden[rows], weight, labels[rows], segment[rows], ref, pairs, bias, method,
        int(n_segments), beta, float(gamma), softcap, float(logit_scale), sizes, chosen, *need)
    return term, logp.index_copy_(0, rows, row_logp)
