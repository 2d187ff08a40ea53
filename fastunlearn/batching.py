"""Drawing micro-batches: one (3B, T) batch per step holding B rows of each kind.

Rows of each kind are cycled through in shuffled epochs. With ``bucket_by_length`` each epoch is
"sortish": shuffled, cut into windows of ``window`` batches, sorted by length inside a window,
so rows of a batch have similar lengths and less padding is computed. With ``pack`` the rows are
packed end to end into sequences instead (first fit by decreasing length): each row restarts its
position ids, and the trunk gets an explicit block-diagonal causal mask built from them
(packing.py), so no row sees another. Normal rows are packed into
sequences of their own, placed last, so the reference still runs on normal rows only; so are the
kinds in ``separate`` (the forget rows when the reference also runs on them).
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
    # Packed batches only: positions restart at 0 for every row; the kind of every token
    # (rows of different kinds share a sequence). ``kind`` is then NORMAL for the normal-only
    # sequences and FORGET for the others.
    position_ids: torch.Tensor | None = None  # (R, T) long
    token_kind: torch.Tensor | None = None  # (R, T) long
    # Packed batches only: the row indices (within their kind) packed into each sequence, in
    # order; ``row_index`` then holds the first of them. The cached reference reads these.
    members: list[list[int]] | None = None
    # Packed batches only: the index of each token's row in the collated row list (-1 on
    # padding): the sequence a token belongs to, for sequence-level losses. Unpacked, a
    # token's row is its batch row.
    token_row: torch.Tensor | None = None  # (R, T) long

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


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of row indices, first fit by decreasing length; no bin exceeds ``capacity``."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack_rows(rows, pad_id: int, row_index: list[int] | None = None,
              separate: frozenset = frozenset({2})) -> Batch:
    """Pack rows (objects with input_ids, labels, kind) into as few sequences as the longest row
    allows. Rows of a kind in ``separate`` share sequences only with rows of that kind (normal
    rows by default: the reference runs on them alone); the other kinds' sequences come first,
    then each separate kind's, in increasing kind order."""
    index = row_index if row_index is not None else [-1] * len(rows)
    capacity = max(len(r.input_ids) for r in rows)
    group_of = [r.kind if r.kind in separate else -1 for r in rows]
    groups = [[i for i, g in enumerate(group_of) if g == key] for key in sorted(set(group_of))]
    seqs = [[g[j] for j in b] for g in groups
            for b in _first_fit([len(rows[i].input_ids) for i in g], capacity)]
    n = len(seqs)
    input_ids = torch.full((n, capacity), pad_id, dtype=torch.long)
    labels = torch.full((n, capacity), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, capacity), dtype=torch.long)
    positions = torch.zeros((n, capacity), dtype=torch.long)
    token_kind = torch.zeros((n, capacity), dtype=torch.long)
    token_row = torch.full((n, capacity), -1, dtype=torch.long)
    kind = torch.zeros(n, dtype=torch.long)
    for s, members in enumerate(seqs):
        at = 0
        for i in members:
            r, k = rows[i], len(rows[i].input_ids)
            input_ids[s, at:at + k] = torch.tensor(r.input_ids)
            labels[s, at:at + k] = torch.tensor(r.labels)
            labels[s, at] = IGNORE_INDEX  # never predicted from the previous row's last token
            mask[s, at:at + k] = 1
            positions[s, at:at + k] = torch.arange(k)
            token_kind[s, at:at + k] = r.kind
            token_row[s, at:at + k] = i
            at += k
        # The padding tail is a segment of its own (positions restart), attended by nothing.
        positions[s, at:] = torch.arange(capacity - at)
        # a shared sequence is marked forget; a separate kind's sequence carries its kind
        kind[s] = max(group_of[members[0]], 0)
    seq_index = torch.tensor([index[m[0]] for m in seqs], dtype=torch.long)
    return Batch(input_ids, mask, labels, kind, seq_index, int(mask.sum()), n * capacity,
                 positions, token_kind, [[index[i] for i in m] for m in seqs], token_row)


@dataclass
class KindDraw:
    """The rows of one kind drawn for one batch: the sampled indices and the rows made from them
    (``per_pick`` consecutive rows per index: 1 for a row list, K for drawn mismatch rows)."""

    picked: list[int]
    rows: list

    @property
    def per_pick(self) -> int:
        return len(self.rows) // max(len(self.picked), 1)

    def part(self, share: slice) -> KindDraw:
        """The picks in ``share`` (a slice of ``picked``) with their rows."""
        per = self.per_pick
        return KindDraw(self.picked[share], self.rows[share.start * per:share.stop * per])


class UnlearnBatcher:
    """One concatenated batch per call: [forget rows; mismatch rows; normal rows; preferred rows].

    A kind is a list of rows, rows drawn afresh per batch (``data.MismatchDraws``: its
    ``lengths`` are sampled like rows, then ``rows(indices, rng)`` makes the batch's rows with a
    generator seeded by the seed and the batch number, so a run is reproducible), rows that
    follow the forget rows' draw (``data.PreferredRows``: the same indices, so the j-th preferred
    row of a batch pairs with its j-th forget row), or None (the kind is not drawn).
    ``next()`` is ``collate(draw())``; a process of a sharded run collates only its share of
    each kind's draw (``distributed.RankBatcher``). ``separate``: the kinds that packing keeps
    in sequences of their own (see :func:`pack_rows`)."""

    def __init__(self, rows_by_kind: list, batch_size: int, pad_id: int, seed: int,
                 bucket: bool = True, pack: bool = False, separate: frozenset = frozenset({2})):
        from .data import PreferredRows

        self.rows_by_kind = rows_by_kind
        self.pad_id = pad_id
        self.pack = pack
        self.separate = separate
        self.seed = seed
        self.draws = 0
        self.follows_forget = [isinstance(rows, PreferredRows) for rows in rows_by_kind]
        # one sampler per drawn kind, in kind order (the checkpointed stream position)
        self.sampled = [k for k, rows in enumerate(rows_by_kind)
                        if rows is not None and not self.follows_forget[k]]
        self.samplers = [KindSampler(_lengths(rows_by_kind[k]), batch_size, seed + k, bucket)
                         for k in self.sampled]

    def draw(self) -> list[KindDraw]:
        """The next batch's rows of each drawn kind, not yet collated (advances the stream)."""
        picks = {k: sampler.next() for k, sampler in zip(self.sampled, self.samplers)}
        out = []
        for k, source in enumerate(self.rows_by_kind):
            if source is None:
                continue
            picked = picks[0] if self.follows_forget[k] else picks[k]
            if isinstance(source, list):
                rows = [source[i] for i in picked]
            else:
                rows = source.rows(picked, random.Random(f"{self.seed}:{k}:{self.draws}"))
            out.append(KindDraw(picked, rows))
        self.draws += 1
        return out

    def next(self) -> Batch:
        return self.collate(self.draw())

    def collate(self, draws: list[KindDraw]) -> Batch:
        rows = [r for d in draws for r in d.rows]
        index = [i for d in draws for i in d.picked for _ in range(d.per_pick)]
        if self.pack:
            return pack_rows(rows, self.pad_id, index, self.separate)
        return collate_rows(rows, self.pad_id, index)


def _lengths(source) -> list[int]:
    return [len(r.input_ids) for r in source] if isinstance(source, list) else source.lengths
