"""Host-side pieces of a micro-batch's loss: valid positions, trunk inputs, the reference runner.

Labels are shifted here (hidden position t predicts token t+1). Rows whose shifted label is
ignored are dropped on the host side before anything touches the head, so the loss backends only
ever see valid rows and need no host synchronisation to find them. The loss itself is computed by
``unlearn_step.UnlearnStep`` (one module for one process and for a sharded run);
:func:`micro_batch_loss` is its one-call form.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .batching import Batch
from .losses import LossOutput
from .losses.types import IGNORE_INDEX
from .models import eval_mode, head_of, trunk_of
from .packing import packed_inputs


@dataclass
class LossWeights:
    eps_forget: float
    eps_mismatch: float
    eps_normal: float


def valid_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat hidden-row indices, shifted labels and kinds of every valid position (CPU tensors)."""
    r, t = batch.input_ids.shape
    shifted = batch.labels[:, 1:]
    rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    flat = rows * t + cols  # hidden row (b, t) predicts label (b, t + 1)
    if batch.token_kind is not None:  # packed: the kind of the row the label belongs to
        return flat, shifted[rows, cols], batch.token_kind[rows, cols + 1]
    return flat, shifted[rows, cols], batch.kind[rows]


def valid_rows(batch: Batch) -> torch.Tensor:
    """The row (index in the collated row list) of every valid position, in the order of
    :func:`valid_positions`: the sequence a position's label belongs to."""
    r, t = batch.input_ids.shape
    rows, cols = (batch.labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    if batch.token_row is not None:  # packed: several rows share a sequence
        return batch.token_row[rows, cols + 1]
    return rows


def trunk_inputs(model: nn.Module, batch: Batch, device: torch.device,
                 rows: slice = slice(None)) -> dict:
    """Keyword arguments of ``model``'s trunk for (some rows of) a batch. Packed rows get an
    explicit block-diagonal causal mask (see packing.py)."""
    ids = batch.input_ids[rows].to(device, non_blocking=True)
    if batch.position_ids is not None:
        return packed_inputs(model, ids, batch.position_ids[rows].to(device))
    return {"input_ids": ids, "attention_mask": batch.attention_mask[rows].to(device),
            "use_cache": False}


def kind_counts(batch: Batch) -> list[int]:
    _, _, kinds = valid_positions(batch)
    return _per_kind(kinds)


def _per_kind(kinds: torch.Tensor) -> list[int]:
    """Valid positions per kind (forget, mismatch, normal) of a host tensor of kinds."""
    return [int((kinds == k).sum()) for k in range(3)]


class ReferenceRunner:
    """Runs the frozen reference's trunk on the normal rows of a batch.

    ``reference`` is a separate frozen model, or None with ``adapters_off=True`` for a LoRA
    policy (the same weights with the adapters disabled: no second copy in memory).
    With ``cache`` (a ``reference_cache.ReferenceCache`` of the normal rows) no reference model
    runs at all: hidden states are read by ``Batch.row_index`` and the head comes from the cache.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module | None, cache=None):
        self.policy = policy
        self.reference = reference
        self.cache = cache
        self.adapters_off = reference is None and hasattr(policy, "disable_adapter")
        if reference is None and not self.adapters_off and cache is None:
            raise ValueError("a reference model is needed unless the policy has LoRA adapters")

    def model(self) -> nn.Module:
        """The module whose trunk computes the reference (the policy with adapters off)."""
        return self.policy if self.adapters_off else self.reference

    def head(self):
        if self.cache is not None:
            return self.cache.head(head_of(self.policy).weight.device)
        return head_of(self.model())

    def cached_hidden(self, row_index: torch.Tensor) -> torch.Tensor:
        """(valid normal positions of these rows, H) from the cache, CPU, storage dtype."""
        return self.cache.gather(row_index)

    @torch.no_grad()
    def hidden(self, inputs: dict, autocast) -> torch.Tensor:
        """Reference trunk outputs for ``inputs`` (keyword arguments from ``trunk_inputs``),
        in eval mode: dropout would make two reference passes over the same rows differ."""
        ctx = self.policy.disable_adapter() if self.adapters_off else contextlib.nullcontext()
        with ctx, eval_mode(self.model()), autocast():
            out = trunk_of(self.model())(**inputs)
        return out.last_hidden_state


def reference_mode(ref: ReferenceRunner) -> str:
    """The ``UnlearnStep`` reference mode that serves a runner (cache, adapters off, or copy)."""
    if ref.cache is not None:
        return "cached"
    return "adapters" if ref.adapters_off else "copy"


def micro_batch_loss(policy: nn.Module, ref: ReferenceRunner, batch: Batch, weights: LossWeights,
                     *, device: torch.device, compute_dtype: torch.dtype, backend: str = "auto",
                     chunk_rows: int | None = None, reduction: str = "mean") -> LossOutput:
    """Loss of one concatenated batch (differentiable w.r.t. the policy), computed by the same
    module as training: an (unsharded) ``unlearn_step.UnlearnStep`` over the runner's models."""
    from .unlearn_step import UnlearnStep, prepare

    mode = reference_mode(ref)
    ref_head = ref.head() if mode == "cached" else None
    if ref_head is not None:
        head = head_of(policy)
        if (ref_head.logit_scale, ref_head.softcap) != (head.logit_scale, head.softcap):
            raise ValueError("the reference head's logit scale / soft-cap differ from the "
                             "policy's")
    step = UnlearnStep(policy, ref.reference if mode == "copy" else None, mode=mode,
                       ref_head=None if ref_head is None else ref_head.weight,
                       ref_bias=None if ref_head is None else ref_head.bias,
                       backend=backend, chunk_rows=chunk_rows, compute_dtype=compute_dtype)
    inputs = prepare(batch, device, policy, ref.cache if weights.eps_normal != 0 else None)
    return step(inputs, (weights.eps_forget, weights.eps_mismatch, weights.eps_normal),
                reduction=reduction)


def kind_row_indices(batch: Batch, rows: torch.Tensor) -> torch.Tensor:
    """The index within its kind's row list (``Batch.row_index``) of each collated row in
    ``rows`` (values of :func:`valid_rows`). A packed sequence holds the rows of
    ``Batch.members`` back to back, in that order."""
    if batch.token_row is None:
        return batch.row_index[rows]
    index_of = {}
    for s, members in enumerate(batch.members):
        collated = batch.token_row[s]
        index_of.update(zip(torch.unique_consecutive(collated[collated >= 0]).tolist(),
                            members))
    return torch.tensor([index_of[int(r)] for r in rows.tolist()], dtype=torch.long)
