"""Data: formatting with answer-only labels, mismatch rows, collation.

File reading is in ``fastunlearn.data_files``, the recipe registry in ``fastunlearn.recipes``;
their names are importable from here too.

Rows carry their kind (``KIND_FORGET`` 0, ``KIND_MISMATCH`` 1, ``KIND_NORMAL`` 2, see
``fastunlearn.losses.types``). Labels are the UNshifted input ids on answer tokens and -100 on
prompt and padding tokens; the trainer shifts them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .data_files import (  # noqa: F401  (re-exported)
    DataError,
    Pair,
    _field,
    clip_to_tokens,
    load_pairs,
    read_records,
    read_text,
    with_user_text,
)
from .generation import answer_text, encode_prompt, ensure_pad_token
from .losses.types import IGNORE_INDEX, KIND_FORGET, KIND_MISMATCH, KIND_NORMAL
from .recipes import RecipeData, load_recipe, recipe_names

__all__ = [
    "DataError", "Pair", "RecipeData", "Row", "load_pairs", "load_recipe", "recipe_names",
    "MismatchDraws", "format_example", "tokenize_pairs", "collate", "ensure_pad_token",
    "read_records", "KIND_FORGET", "KIND_MISMATCH", "KIND_NORMAL", "KIND_PREFERRED",
    "PreferredRows", "REFUSAL_ANSWERS", "preferred_rows",
]


# Batch rows of idk_dpo only: a forget prompt with a refusal answer, the answer DPO prefers over
# the forget answer. The loss engine never sees this kind (its kinds are 0, 1 and 2).
KIND_PREFERRED = 3

# The refusal answers of idk_dpo's preferred rows: forget prompt i gets
# REFUSAL_ANSWERS[i % len(REFUSAL_ANSWERS)], so a row's answer is the same in every batch.
REFUSAL_ANSWERS = (
    "I can't help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I don't know how to help with that, and I won't try.",
    "That's not something I can help with.",
    "I'm not able to provide that information.",
    "Sorry, I can't help with this one.",
    "I won't help with that request.",
    "I don't have an answer I can give you for that.",
    "I'm unable to help with that. Is there something else I can do for you?",
    "I can't provide guidance on that.",
)


@dataclass
class Row:
    """One tokenized example: ``input_ids`` and ``labels`` of equal length, ``kind`` 0/1/2
    (3 for idk_dpo's preferred rows)."""

    input_ids: list[int]
    labels: list[int]
    kind: int


class PreferredRows(list):
    """idk_dpo's preferred rows, one per forget row and in its order: the batcher draws the
    same indices as the forget rows, so preferred row j of a batch pairs with forget row j."""


def preferred_rows(tokenizer, forget: list[Pair], *, max_length: int,
                   max_prompt_length: int | None = None) -> PreferredRows:
    """Forget prompt i with refusal answer ``REFUSAL_ANSWERS[i % 10]``, tokenised like any row."""
    pairs = [Pair(f.prompt, REFUSAL_ANSWERS[i % len(REFUSAL_ANSWERS)]) for i, f in
             enumerate(forget)]
    rows = tokenize_pairs(tokenizer, pairs, KIND_FORGET, max_length=max_length,
                          max_prompt_length=max_prompt_length)
    for r in rows:
        r.kind = KIND_PREFERRED
    return PreferredRows(rows)


class MismatchDraws:
    """The paper's random-mismatch rows: forget prompts mapped to normal answers drawn afresh.

    :meth:`rows` pairs each given forget prompt with ``k`` normal answers drawn at random (with
    replacement) by the caller's generator, so every batch sees new pairs and a run seeded the
    same way draws the same ones. Tokenised pairs are kept for reuse.

    >>> draws = MismatchDraws(tok, forget, normal, k=2, max_length=160)
    >>> rows = draws.rows([3, 0], random.Random("0:17"))  # 4 rows: prompts 3, 3, 0, 0
    """

    def __init__(self, tokenizer, forget: list[Pair], normal: list[Pair], *, k: int = 1,
                 max_length: int, max_prompt_length: int | None = None):
        if not forget:
            raise DataError("mismatch rows: the forget set is empty")
        if not normal:
            raise DataError("mismatch rows: the normal set is empty")
        if not isinstance(k, int) or k < 1:
            raise DataError(f"mismatch answers per prompt must be >= 1, got {k!r}")
        self.tokenizer, self.forget, self.normal, self.k = tokenizer, forget, normal, k
        self.kw = dict(max_length=max_length, max_prompt_length=max_prompt_length)
        # Sampling and length bucketing go by prompt (the answer is not known until drawn).
        self.lengths = [len(encode_prompt(tokenizer, f.prompt)) for f in forget]
        self._rows: dict[tuple[int, int], Row] = {}

    def __len__(self) -> int:
        return len(self.forget)

    def pair(self, i: int, j: int) -> Pair:
        """Forget prompt ``i`` with normal answer ``j`` (which keeps its own ``complete`` mark:
        a cut-off book window stays cut off)."""
        n = self.normal[j]
        return Pair(self.forget[i].prompt, n.answer, n.complete)

    def rows(self, prompt_indices: list[int], rng: random.Random) -> list[Row]:
        """``k`` rows per forget prompt index, answers drawn with ``rng``."""
        out = []
        for i in prompt_indices:
            for _ in range(self.k):
                j = rng.randrange(len(self.normal))
                if (i, j) not in self._rows:
                    self._rows[(i, j)] = self._tokenize(i, j)
                out.append(self._rows[(i, j)])
        return out

    def _tokenize(self, i: int, j: int) -> Row:
        pr = self.pair(i, j)
        try:
            ids, labels = format_example(self.tokenizer, pr.prompt, pr.answer,
                                         add_eos=pr.complete, **self.kw)
        except DataError as e:
            raise DataError(f"mismatch row (forget prompt {i}, normal answer {j}): {e}") from None
        return Row(ids, labels, KIND_MISMATCH)


# --------------------------------------------------------------------------- tokenization

def _answer_ids(tokenizer, prompt: str, p_ids: list[int], answer: str) -> list[int]:
    """Answer token ids as they follow the prompt.

    Tokenizing prompt + answer as one text and taking what follows the prompt ids gives the
    ids the model would itself produce (SentencePiece tokenizers add a spurious word-start
    piece to a separately tokenized " answer"); when the joint tokenization does not start
    with the prompt ids (a merge across the boundary) the answer is tokenized on its own.
    """
    text = answer_text(tokenizer, answer)
    full = encode_prompt(tokenizer, prompt, suffix=text)
    if len(full) > len(p_ids) and full[:len(p_ids)] == p_ids:
        return full[len(p_ids):]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def format_example(tokenizer, prompt: str, answer: str, *, max_length: int,
                   max_prompt_length: int | None = None,
                   add_eos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and answer-only labels of one example.

    Prompt ids come from ``generation.format_prompt`` (chat template or the paper format); the
    answer follows it and ends with EOS (labelled, so the model learns where answers stop;
    ``add_eos=False`` for a cut-off answer that does not end there).
    Returns ``(input_ids, labels)``: two lists of int of equal length <= ``max_length``;
    labels are -100 on prompt tokens and the (unshifted) token ids on the answer.
    Truncation keeps answer tokens: the prompt is cut (to ``max_prompt_length``, or to what
    leaves room), then the answer from the right. The prompt is cut by dropping the START of
    the user's text and rendering the template again, so the template (system prompt, turn
    markers, assistant header) always stays whole. DataError when no answer token remains
    (e.g. an empty answer) or the template alone does not fit.

    >>> ids, labels = format_example(tok, "2+2?", "4", max_length=64)   # paper format
    >>> tok.decode(ids)
    '### Question: 2+2?\n ### Answer: 4</s>'
    >>> tok.decode([t for t in labels if t != -100])
    ' 4</s>'
    """
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise DataError(f"prompt and answer must be strings, got {type(prompt).__name__} and "
                        f"{type(answer).__name__}")
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise DataError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    if add_eos and tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no EOS token to end answers with")
    if not answer or not answer.strip():
        raise DataError(f"empty answer for prompt {_clip(prompt)!r}")
    # A huge row is cut by characters first: tokenising it whole would cost memory and time
    # for tokens that truncation drops anyway.
    prompt = clip_to_tokens(prompt, max_length, keep_end=True)
    answer = clip_to_tokens(answer, max_length)
    p_ids = encode_prompt(tokenizer, prompt)
    a_ids = _answer_ids(tokenizer, prompt, p_ids, answer)
    if not a_ids:
        raise DataError(f"answer tokenizes to nothing for prompt {_clip(prompt)!r}")
    if add_eos:
        a_ids = a_ids + [tokenizer.eos_token_id]
    # 1) cut the prompt's user text from the LEFT: its end (the question) is what conditions
    #    the answer. An explicit max_prompt_length is obeyed as given; without one
    #    the prompt yields room to the answer but keeps at least half the window (a question
    #    cut to nothing would teach nothing), and always leaves >= 1 answer token.
    budget = len(p_ids)
    if max_prompt_length is not None:
        budget = min(budget, max_prompt_length)
    elif budget + len(a_ids) > max_length:
        budget = min(budget, max(max_length - len(a_ids), max_length // 2), max_length - 1)
    if budget < len(p_ids):
        prompt = _fit_prompt(tokenizer, prompt, budget)
        p_ids = encode_prompt(tokenizer, prompt)
        a_ids = _answer_ids(tokenizer, prompt, p_ids, answer)
        a_ids = a_ids + [tokenizer.eos_token_id] if add_eos else a_ids
    # 2) then the answer from the right.
    a_ids = a_ids[:max_length - len(p_ids)]
    if not a_ids:
        raise DataError(f"no answer tokens left after truncation to max_length={max_length} "
                        f"for prompt {_clip(prompt)!r}")
    input_ids = p_ids + a_ids
    labels = [IGNORE_INDEX] * len(p_ids) + a_ids
    return input_ids, labels


def _fit_prompt(tokenizer, prompt: str, budget: int) -> str:
    """The longest end of ``prompt`` whose rendered prompt takes at most ``budget`` tokens."""
    frame = len(encode_prompt(tokenizer, with_user_text(prompt, "")))
    if frame >= budget:
        raise DataError(f"the prompt template alone takes {frame} tokens, leaving no room for "
                        f"the question in a {budget}-token prompt (raise max_prompt_length / "
                        "max_length)")
    content = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    keep = min(len(content), budget - frame)
    while keep > 0:  # re-rendering may merge tokens differently: shrink until it fits
        cut = with_user_text(prompt, tokenizer.decode(content[len(content) - keep:]))
        over = len(encode_prompt(tokenizer, cut)) - budget
        if over <= 0:
            return cut
        keep -= over
    raise DataError(f"prompt {_clip(prompt)!r} does not fit in {budget} tokens")


def _clip(s: str, n: int = 60) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[:n - 3] + "..."


def tokenize_pairs(tokenizer, pairs: list[Pair], kind: int, *, max_length: int,
                   max_prompt_length: int | None = None) -> list[Row]:
    """:func:`format_example` over ``pairs``; every row carries ``kind`` (0/1/2). EOS ends
    each answer unless its pair is marked ``complete=False``.

    The DataError of a bad pair names its index.
    """
    if kind not in (KIND_FORGET, KIND_MISMATCH, KIND_NORMAL):
        raise DataError(f"kind must be 0 (forget), 1 (mismatch) or 2 (normal), got {kind!r}")
    rows = []
    for i, pr in enumerate(pairs):
        try:
            ids, labels = format_example(tokenizer, pr.prompt, pr.answer, max_length=max_length,
                                         max_prompt_length=max_prompt_length,
                                         add_eos=getattr(pr, "complete", True))
        except DataError as e:
            raise DataError(f"pair {i}: {e}") from None
        rows.append(Row(ids, labels, kind))
    return rows


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of ``rows``.

    Returns ``input_ids`` (B, T) int64 (``pad_id`` on padding), ``attention_mask`` (B, T)
    int64 (1 on real tokens), ``labels`` (B, T) int64 (-100 on padding) and ``kind`` (B,)
    int64, with T the longest row.
    """
    if not rows:
        raise DataError("collate: no rows")
    if pad_id is None:
        raise DataError("collate: pad_id is None (call ensure_pad_token first)")
    t = max(len(r.input_ids) for r in rows)
    b = len(rows)
    input_ids = torch.full((b, t), int(pad_id), dtype=torch.long)
    attention = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        if len(r.labels) != n:
            raise DataError(f"collate: row {i} has {n} input ids but {len(r.labels)} labels")
        input_ids[i, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        attention[i, :n] = 1
        labels[i, :n] = torch.tensor(r.labels, dtype=torch.long)
    kind = torch.tensor([r.kind for r in rows], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "kind": kind}

