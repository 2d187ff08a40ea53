"""Unlearning batches for ``transformers.Trainer``: ``[forget; mismatch; normal]`` rows.

The Trainer samples indices of :attr:`UnlearnCollator.dataset`; the collator turns each index
into one forget row, ``mismatch_per_prompt`` mismatch rows (that forget prompt with normal
answers drawn afresh) and one normal row, tokenised by fastunlearn's own
:func:`fastunlearn.data.format_example` (answer-only labels, chat template) and padded by
:func:`fastunlearn.batching.collate_rows`.

    collator = UnlearnCollator(tokenizer, forget_ds, normal_ds, max_length=256)
    trainer = UnlearnTrainer(model=model, args=args, train_dataset=collator.dataset,
                             data_collator=collator)
"""
from __future__ import annotations

import random
from collections.abc import Iterable

import torch

from ..batching import Batch, collate_rows
from ..data import (
    DataError,
    MismatchDraws,
    Pair,
    ensure_pad_token,
    tokenize_pairs,
)
from ..data_files import record_pair
from ..losses.types import KIND_FORGET, KIND_NORMAL

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "kind", "row_index")


def pairs_of(rows: Iterable, name: str, *, prompt_col: str = "prompt",
             answer_col: str = "answer") -> list[Pair]:
    """Pairs of a ``datasets.Dataset`` (or any iterable of records / :class:`Pair`): prompt and
    answer columns, or a chat ``messages`` column (the last assistant turn is the answer)."""
    out = []
    for i, rec in enumerate(rows):
        out.append(rec if isinstance(rec, Pair) else
                   record_pair(rec, source=name, where=f"row {i + 1}", prompt_col=prompt_col,
                               answer_col=answer_col))
    if not out:
        raise DataError(f"{name}: no rows (empty data set)")
    return out


class StepIndex(torch.utils.data.Dataset):
    """Item ``i`` is the index ``i``: the collator does the rest."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return i


class UnlearnCollator:
    """Builds one unlearning micro-batch from a list of indices of :attr:`dataset`.

    Index ``i`` stands for forget row ``i % len(forget)`` and normal row ``i % len(normal)``;
    the dataset has ``max(len(forget), len(normal))`` items, so one epoch sees every row of
    both sets. Mismatch answers are drawn with a generator seeded by ``seed``, the number of
    batches this collator made and the batch's indices (reproducible, new pairs every batch).
    Returns a dict of ``input_ids``, ``attention_mask``, ``labels`` (unshifted, -100 off the
    answers), ``kind`` (0 forget, 1 mismatch, 2 normal) and ``row_index``.
    """

    def __init__(self, tokenizer, forget, normal, *, max_length: int = 256,
                 max_prompt_length: int | None = None, mismatch_per_prompt: int = 1,
                 seed: int = 0, prompt_col: str = "prompt", answer_col: str = "answer"):
        if not isinstance(mismatch_per_prompt, int) or mismatch_per_prompt < 0:
            raise DataError(f"mismatch_per_prompt must be an integer >= 0, got "
                            f"{mismatch_per_prompt!r}")
        ensure_pad_token(tokenizer)
        self.tokenizer, self.pad_id, self.seed = tokenizer, tokenizer.pad_token_id, seed
        cols = {"prompt_col": prompt_col, "answer_col": answer_col}
        forget_pairs = pairs_of(forget, "forget set", **cols)
        normal_pairs = pairs_of(normal, "normal set", **cols)
        kw = {"max_length": max_length, "max_prompt_length": max_prompt_length}
        self.forget = tokenize_pairs(tokenizer, forget_pairs, KIND_FORGET, **kw)
        self.normal = tokenize_pairs(tokenizer, normal_pairs, KIND_NORMAL, **kw)
        self.mismatch = MismatchDraws(tokenizer, forget_pairs, normal_pairs,
                                      k=mismatch_per_prompt, **kw) if mismatch_per_prompt \
            else None
        self.dataset = StepIndex(max(len(self.forget), len(self.normal)))
        self.batches = 0

    def batch(self, indices: list[int]) -> Batch:
        """The :class:`~fastunlearn.batching.Batch` of these dataset indices."""
        if not indices:
            raise DataError("an unlearning batch needs at least one index")
        f = [i % len(self.forget) for i in indices]
        n = [i % len(self.normal) for i in indices]
        rows, index = [self.forget[i] for i in f], list(f)
        if self.mismatch is not None:
            # The indices too: processes and data-loader workers (each with its own count)
            # draw differently.
            rng = random.Random(f"{self.seed}:{self.batches}:{indices}")
            rows += self.mismatch.rows(f, rng)
            index += [i for i in f for _ in range(self.mismatch.k)]
        rows += [self.normal[i] for i in n]
        index += n
        self.batches += 1
        return collate_rows(rows, self.pad_id, index)

    def __call__(self, features: list) -> dict[str, torch.Tensor]:
        indices = [int(x["index"] if isinstance(x, dict) else x) for x in features]
        return batch_dict(self.batch(indices))


def batch_dict(batch: Batch) -> dict[str, torch.Tensor]:
    """The Trainer's view of a Batch: a dict of tensors (moved to the device by the Trainer)."""
    return {k: getattr(batch, k) for k in BATCH_KEYS}


def dict_batch(d: dict) -> Batch:
    """The host Batch of a collated dict (inverse of :func:`batch_dict`)."""
    t = {k: d[k].detach().cpu() for k in BATCH_KEYS}
    mask = t["attention_mask"]
    return Batch(t["input_ids"], mask, t["labels"], t["kind"], t["row_index"], int(mask.sum()),
                 mask.numel())
