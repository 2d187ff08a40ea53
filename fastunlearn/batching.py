"""Drawing micro-batches: one (3B, T) batch per step holding B rows of each kind.

Rows of each kind are cycled through in shuffled epochs. With ``bucket_by_length`` each epoch is
"sortish": shuffled, cut into windows of ``window`` batches, sorted by length inside a window,
so rows of a batch have similar lengths and less padding is computed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .losses.types import IGNORE_INDEX


@dataclass
class Batch:
    input_ids: torch.Tensor  # (R, T) long
    attention_mask: torch.Tensor  # (R, T) long
    labels: torch.Tensor  # (R, T) long, unshifted, IGNORE_INDEX on prompt / padding
    kind: torch.Tensor  # (R,) long
    row_index: torch.Tensor  # (R,) long: index of each row within its kind's row list
    real_tokens: int  # non-pad tokens
    padded_tokens: int  # R * T

    @property
    def real_fraction(self) -> float:
        return self.real_tokens / max(self.padded_tokens, 1)


class KindSampler:
    """Endless stream of index groups of size ``batch_size`` over rows of one kind."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, bucket: bool,
                 window: int = 32):
        if not lengths:
            raise ValueError("cannot sample from an empty row set")
        self.lengths, self.batch_size = lengths, batch_size
        self.bucket, self.window = bucket, window
        self.rng = random.Random(seed)
        self.queue: list[list[int]] = []

    def _refill(self) -> None:
        order = list(range(len(self.lengths)))
        self.rng.shuffle(order)
        while len(order) < self.batch_size:  # tiny sets: repeat rows to fill a batch
            order += order[: self.batch_size - len(order)]
        if self.bucket:
            span = self.window * self.batch_size
            order = [i for s in range(0, len(order), span)
                     for i in sorted(order[s:s + span], key=self.lengths.__getitem__)]
        groups = [order[s:s + self.batch_size]
                  for s in range(0, len(order) - self.batch_size + 1, self.batch_size)]
        self.rng.shuffle(groups)
        self.queue.extend(groups)

    def next(self) -> list[int]:
        if not self.queue:
            self._refill()
        return self.queue.pop()


def collate_rows(rows, pad_id: int, row_index: list[int] | None = None) -> Batch:
    """Right-pad rows (objects with input_ids, labels, kind) into one Batch."""
    t = max(len(r.input_ids) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r.input_ids)
        input_ids[i, :k] = torch.tensor(r.input_ids)
        labels[i, :k] = torch.tensor(r.labels)
        mask[i, :k] = 1
    kind = torch.tensor([r.kind for r in rows], dtype=torch.long)
    index = torch.tensor(row_index if row_index is not None else [-1] * n, dtype=torch.long)
    return Batch(input_ids, mask, labels, kind, index, int(mask.sum()), n * t)


class UnlearnBatcher:
    """One concatenated batch per call: [forget rows; mismatch rows; normal rows]."""

    def __init__(self, rows_by_kind: list[list], batch_size: int, pad_id: int, seed: int,
                 bucket: bool = True):
        self.rows_by_kind = rows_by_kind
        self.pad_id = pad_id
        self.samplers = [KindSampler([len(r.input_ids) for r in rows], batch_size, seed + k, bucket)
                         for k, rows in enumerate(rows_by_kind)]

    def next(self) -> Batch:
        picks = [(k, i) for k, s in enumerate(self.samplers) for i in s.next()]
        rows = [self.rows_by_kind[k][i] for k, i in picks]
        return collate_rows(rows, self.pad_id, [i for _, i in picks])
