"""Packed sequences kept apart: an explicit block-diagonal causal mask, checked on the model.

A packed sequence holds several rows back to back; position ids restart at 0 for every row
(and for the padding tail, a segment of its own). Rows must never attend to each other. Models
do not all build that mask from restarting position ids (OPT's mask builder ignores them, BLOOM
derives ALiBi and its mask from a 2-D attention mask, flash-attention 2 detects packing only at
batch size 1), so the mask is given explicitly:

  * ``sdpa`` / ``eager``: a 4-D mask (R, 1, T, T), True / 0 where a query may see a key: same
    segment and not in the future. transformers passes a 4-D mask to the attention as is.
  * ``flash_attention_*``: the R sequences are laid end to end in one batch row (varlen), which
    is the layout in which transformers hands restarting position ids to flash-attention.
  * anything else: refused (:class:`PackingError`).

:func:`probe_packing` runs three short rows alone and packed on the real model; the trainer
turns packing off when they differ, so a model that ignores the mask is never trained packed.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class PackingError(ValueError):
    """The model cannot keep packed rows apart (one-line message)."""


def attn_implementation(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(R, T) segment number of every token: a new segment wherever the position restarts."""
    return (position_ids == 0).long().cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(R, 1, T, T) bool: query q may see key k when both are in one segment and k <= q."""
    seg = segment_ids(position_ids)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def packed_inputs(model: nn.Module, input_ids: torch.Tensor,
                  position_ids: torch.Tensor) -> dict:
    """Trunk keyword arguments that keep the packed rows of (R, T) ``input_ids`` apart.
    The trunk's hidden states come back as (R, T, H), or (1, R*T, H) for flash-attention:
    the same order once flattened."""
    impl = attn_implementation(model)
    if impl.startswith("flash_attention"):
        return {"input_ids": input_ids.reshape(1, -1), "position_ids": position_ids.reshape(1, -1),
                "use_cache": False}
    mask = block_causal_mask(position_ids)
    if impl == "eager":  # an additive mask in the dtype the model's attention adds it in
        dtype = model.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min)
    elif impl != "sdpa":
        raise PackingError(f"packing needs sdpa, eager or flash-attention, the model uses {impl}")
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask,
            "use_cache": False}


# Largest relative difference (Frobenius norm, per row) between a packed row's hidden states
# and the row alone that counts as rounding: fp32 runs agree to ~1e-6, 16-bit ones to ~1e-2;
# a row that sees another is off by far more (OPT: about 0.5).
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 2e-2}


def sliding_window_limit(model: nn.Module, max_length: int) -> str | None:
    """Why the explicit (full causal) mask would differ from the model's own, or None: layers
    with a sliding window shorter than a row see less than the whole row."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window >= max_length:
        return None
    types = getattr(config, "layer_types", None)
    used = "sliding_attention" in types if types else \
        getattr(config, "use_sliding_window", True) is not False
    return f"sliding-window attention ({window} tokens) in rows of up to {max_length}" \
        if used else None


@torch.no_grad()
def probe_packing(model: nn.Module, token_rows: list[list[int]], pad_id: int) -> str | None:
    """None when packing keeps rows apart in ``model``, else why not (one line).

    Three short rows A, B, C are run alone and packed as two sequences, [A B] and [C pad...]
    (two sequences: flash-attention mixes rows only at batch size > 1). Every row's hidden
    states must match its lone run to rounding. Runs in eval mode (dropout off), in the
    weights' dtype (fp32 weights: the strictest test), under bf16 autocast for flash-attention
    with fp32 weights (it needs 16 bits).
    """
    from .models import eval_mode, trunk_of

    a, b, c = (list(r) for r in token_rows[:3])
    if not (a and b and c):
        return "no rows to probe with"
    t = len(a) + len(b)
    device = model.get_input_embeddings().weight.device
    ids = torch.full((2, t), pad_id, dtype=torch.long)
    pos = torch.zeros((2, t), dtype=torch.long)
    ids[0] = torch.tensor(a + b)
    pos[0] = torch.cat([torch.arange(len(a)), torch.arange(len(b))])
    ids[1, :len(c)] = torch.tensor(c)
    pos[1] = torch.cat([torch.arange(len(c)), torch.arange(t - len(c))])
    trunk = trunk_of(model)
    dtype = model.get_input_embeddings().weight.dtype
    autocast = contextlib.nullcontext()
    if attn_implementation(model).startswith("flash_attention") and dtype == torch.float32:
        dtype = torch.bfloat16
        autocast = torch.autocast(device.type, dtype=dtype)
    with eval_mode(model), autocast:
        try:
            packed = trunk(**packed_inputs(model, ids.to(device), pos.to(device)))
        except Exception as exc:  # a model that rejects the mask cannot be packed
            first = str(exc).splitlines()[0] if str(exc) else ""
            return f"the model fails on the packed inputs ({type(exc).__name__}: {first})"
        packed = packed.last_hidden_state.reshape(2, t, -1)
        pieces = [(a, packed[0, :len(a)]), (b, packed[0, len(a):]), (c, packed[1, :len(c)])]
        worst = 0.0
        for row, got in pieces:
            alone = trunk(input_ids=torch.tensor([row], device=device),
                          use_cache=False).last_hidden_state[0].float()
            err = torch.linalg.vector_norm(got.float() - alone) / \
                torch.linalg.vector_norm(alone).clamp_min(1e-12)
            worst = max(worst, float(err))
    if not worst <= _TOLERANCE.get(dtype, 5e-2):  # also catches NaN
        return f"a packed row's hidden states differ from the row alone (relative {worst:.2g})"
    return None
