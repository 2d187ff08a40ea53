"""The loss of one micro-batch: one policy trunk pass, the reference on normal rows only.

Labels are shifted here (hidden position t predicts token t+1). Rows whose shifted label is
ignored are dropped on the host side before anything touches the head, so the loss backends only
ever see valid rows and need no host synchronisation to find them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .batching import Batch
from .losses import KIND_NORMAL, LossOutput, unlearn_loss
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


def micro_batch_loss(policy: nn.Module, ref: ReferenceRunner, batch: Batch, weights: LossWeights,
                     *, device: torch.device, compute_dtype: torch.dtype, backend: str = "auto",
                     chunk_rows: int | None = None, reduction: str = "mean") -> LossOutput:
    """Loss of one concatenated batch (differentiable w.r.t. the policy)."""
    if compute_dtype == torch.float32:
        autocast = contextlib.nullcontext
    else:
        def autocast():
            return torch.autocast(device.type, dtype=compute_dtype)
    flat, labels, kinds = valid_positions(batch)
    t = batch.input_ids.shape[1]

    with autocast():
        hidden = trunk_of(policy)(**trunk_inputs(policy, batch, device)).last_hidden_state
    h_dim = hidden.shape[-1]
    hidden = hidden.reshape(-1, h_dim).to(compute_dtype)[flat.to(device)]

    # Reference hidden states for the normal rows only, placed at their compacted positions.
    ref_hidden = None
    normal_rows = (batch.kind == KIND_NORMAL).nonzero().squeeze(1)
    is_normal = kinds == KIND_NORMAL
    if weights.eps_normal != 0 and normal_rows.numel() and bool(is_normal.any()) \
            and ref.cache is not None:
        # Cached reference: rows in batch order, valid positions in column order == sel's order.
        sel = is_normal.nonzero().squeeze(1)
        ref_h = ref.cached_hidden(_normal_row_indices(batch, normal_rows))
        if ref_h.shape[0] != sel.numel():
            raise ValueError("reference cache does not match the batch's normal rows "
                             "(normal set or tokenisation changed): rebuild the cache")
        ref_hidden = torch.zeros_like(hidden)
        ref_hidden[sel.to(device)] = ref_h.to(device, non_blocking=True).to(compute_dtype)
    elif weights.eps_normal != 0 and normal_rows.numel() and bool(is_normal.any()):
        first, last = int(normal_rows[0]), int(normal_rows[-1]) + 1
        assert last - first == normal_rows.numel(), "normal rows must be contiguous"
        ref_h = ref.hidden(trunk_inputs(ref.model(), batch, device, slice(first, last)),
                           autocast)
        ref_h = ref_h.reshape(-1, h_dim).to(compute_dtype)
        ref_hidden = torch.zeros_like(hidden)
        sel = is_normal.nonzero().squeeze(1)
        ref_hidden[sel.to(device)] = ref_h[(flat[sel] - first * t).to(device)]

    head = head_of(policy)
    ref_head = ref.head()
    weight = head.weight.to(compute_dtype)
    ref_weight = weight.detach() if ref_head.weight is head.weight \
        else ref_head.weight.to(compute_dtype)
    bias = None if head.bias is None else head.bias.to(compute_dtype)
    ref_bias = None if ref_head.bias is None else ref_head.bias.to(compute_dtype)
    if (ref_head.logit_scale, ref_head.softcap) != (head.logit_scale, head.softcap):
        raise ValueError("the reference head's logit scale / soft-cap differ from the policy's")
    return unlearn_loss(hidden, weight, labels.to(device), kinds.to(device), ref_hidden,
                        ref_weight, eps_forget=weights.eps_forget,
                        eps_mismatch=weights.eps_mismatch, eps_normal=weights.eps_normal,
                        bias=bias, ref_bias=ref_bias, softcap=head.softcap,
                        logit_scale=head.logit_scale, reduction=reduction,
                        backend=backend, chunk_rows=chunk_rows, num_rows=_counts(kinds, ref_hidden))


def _normal_row_indices(batch: Batch, normal_rows: torch.Tensor) -> torch.Tensor:
    """Indices of the normal rows in batch order. A packed sequence holds several rows back to
    back, and its valid positions are theirs in that order (each row's first label is ignored,
    so no position predicts across a row boundary)."""
    if batch.members is None:
        return batch.row_index[normal_rows]
    return torch.tensor([i for s in normal_rows.tolist() for i in batch.members[s]],
                        dtype=torch.long)


def _counts(kinds: torch.Tensor, ref_hidden) -> tuple[int, int, int]:
    """Valid rows per kind, known on the host: kernel backends then skip a device sync."""
    n_forget, n_mismatch, n_normal = _per_kind(kinds)
    return n_forget, n_mismatch, n_normal if ref_hidden is not None else 0
