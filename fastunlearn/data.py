"""Data: (prompt, answer) pairs, bundled recipes, formatting with answer-only labels, collation.

Rows carry their kind (``KIND_FORGET`` 0, ``KIND_MISMATCH`` 1, ``KIND_NORMAL`` 2, see
``fastunlearn.losses.types``). Labels are the UNshifted input ids on answer tokens and -100 on
prompt and padding tokens; the trainer shifts them.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .generation import answer_text, encode_prompt, ensure_pad_token
from .losses.types import IGNORE_INDEX, KIND_FORGET, KIND_MISMATCH, KIND_NORMAL

__all__ = [
    "DataError", "Pair", "RecipeData", "Row", "load_pairs", "load_recipe", "recipe_names",
    "make_mismatch", "format_example", "tokenize_pairs", "collate", "ensure_pad_token",
    "read_records", "KIND_FORGET", "KIND_MISMATCH", "KIND_NORMAL",
]


class DataError(ValueError):
    """Bad or missing data; the message is one line naming the file / column / row."""


@dataclass(frozen=True)
class Pair:
    """One (prompt, answer) example: plain strings, not yet formatted.

    ``complete`` is False for an answer that was cut off (e.g. a collected answer that hit
    ``max_new_tokens``): no EOS is appended to it, since the text does not end there.
    """

    prompt: str
    answer: str
    complete: bool = True


@dataclass
class RecipeData:
    """A recipe's training sets, held-out sets (never trained on) and evaluation material."""

    name: str
    forget: list[Pair]
    normal: list[Pair]
    heldout_forget: list[Pair]
    heldout_normal: list[Pair]
    extra: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


@dataclass
class Row:
    """One tokenized example: ``input_ids`` and ``labels`` of equal length, ``kind`` 0/1/2."""

    input_ids: list[int]
    labels: list[int]
    kind: int


# --------------------------------------------------------------------------- file reading

_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")


def _kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for s in _SUFFIXES:
        if name.endswith(s):
            return s
    return ""


def read_text(path: str | os.PathLike) -> str:
    """Whole file as UTF-8 text (``.gz`` decompressed); DataError when missing / unreadable."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected a file")
    try:
        raw = p.read_bytes()
        if p.name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
        return raw.decode("utf-8-sig")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read ({type(e).__name__}: {_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def read_records(path: str | os.PathLike) -> list[Any]:
    """Records of a ``.jsonl`` / ``.json`` / ``.csv`` file (also ``.gz``).

    ``.json`` may hold a list, an object whose single list value is the records, or JSON lines.
    CSV rows come back as dicts of strings. Raises DataError on any problem.
    """
    p = Path(path)
    kind = _kind_of(p)
    if kind not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{p}: unsupported file type (use .jsonl, .json or .csv, optionally .gz)")
    text = read_text(p)
    if kind == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(text)))
        except csv.Error as e:
            raise DataError(f"{p}: cannot parse CSV ({_one_line(e)})") from None
    if kind == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in str(e):
                raise DataError(f"{p}: invalid JSON ({_one_line(e)})") from None
            data = None  # several top-level values: JSON lines under a .json name
        if data is not None:
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DataError(f"{p}: expected a JSON list of records")
                data = lists[0]
            if not isinstance(data, list):
                raise DataError(f"{p}: expected a JSON list of records")
            return data
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: line {i}: invalid JSON ({_one_line(e)})") from None
    return records


def _field(p: Path, rec: Any, col: str, i: int) -> str:
    """Column ``col`` of record ``i`` (1-based) as a string; DataError naming what exists."""
    if not isinstance(rec, dict):
        raise DataError(f"{p}: row {i} is a {type(rec).__name__}, expected an object")
    if col not in rec:
        avail = ", ".join(map(str, rec.keys())) or "none"
        where = f"column {col!r} not found" if i == 1 else f"row {i} has no column {col!r}"
        raise DataError(f"{p}: {where}; available columns: {avail}")
    val = rec[col]
    if val is None:
        raise DataError(f"{p}: row {i} column {col!r} is empty (null)")
    if isinstance(val, (dict, list)):
        raise DataError(f"{p}: row {i} column {col!r} is a {type(val).__name__}, expected text")
    return str(val)


def _complete(p: Path, rec: Any, i: int) -> bool:
    """Optional ``complete`` column (written by ``fastunlearn collect`` for cut-off answers)."""
    val = rec.get("complete", True) if isinstance(rec, dict) else True
    if isinstance(val, str):  # CSV
        low = val.strip().lower()
        if low in ("", "1", "true", "yes"):
            return True
        if low in ("0", "false", "no"):
            return False
    elif isinstance(val, (bool, int)) and val in (0, 1):
        return bool(val)
    raise DataError(f"{p}: row {i} column 'complete' must be true or false, got {val!r}")


def load_pairs(path: str | os.PathLike, *, prompt_col: str = "prompt",
               answer_col: str = "answer", limit: int | None = None) -> list[Pair]:
    """(prompt, answer) pairs from a ``.jsonl`` / ``.json`` / ``.csv`` file (also ``.gz``).

    Missing / unreadable file, missing column (the message lists the available ones), a null
    value or an empty result raise :class:`DataError`. ``limit`` keeps the first N rows.
    An optional boolean ``complete`` column marks cut-off answers (see :class:`Pair`).
    """
    p = Path(path)
    if limit is not None and limit < 1:
        raise DataError(f"{p}: limit must be >= 1, got {limit}")
    records = read_records(p)
    if limit is not None:
        records = records[:limit]
    pairs = [Pair(_field(p, r, prompt_col, i), _field(p, r, answer_col, i), _complete(p, r, i))
             for i, r in enumerate(records, 1)]
    if not pairs:
        raise DataError(f"{p}: no rows (empty data set)")
    return pairs


# --------------------------------------------------------------------------- recipes

RECIPES = ("harmful", "copyright", "hallucination")


def recipe_names() -> list[str]:
    """Names accepted by :func:`load_recipe` (the first is the default)."""
    return list(RECIPES)


def load_recipe(name: str = "harmful", *, seed: int = 0, n_forget: int | None = None,
                n_normal: int | None = None, n_heldout: int = 16,
                forget_source: str | None = None) -> RecipeData:
    """A bundled recipe: ``"harmful"`` (default), ``"copyright"`` or ``"hallucination"``.

    Held-out items are split off first with a ``seed``-ed shuffle and never appear in
    ``forget`` / ``normal``. ``n_forget`` / ``n_normal`` cap the training sets (None: all).
    The harmful recipe's forget answers come from ``forget_source`` (``"self"``: the default
    model's own answers, default; ``"jbb"``: JailbreakBench jailbroken responses; ``"hh"``:
    hh-rlhf rejected replies); ``"harmful:jbb"`` selects it through the name as well.
    """
    if not isinstance(name, str):
        raise DataError(f"recipe name must be a string, got {type(name).__name__}")
    base, _, variant = name.partition(":")
    if base not in RECIPES:
        raise DataError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    if variant and forget_source and variant != forget_source:
        raise DataError(f"recipe {name!r} conflicts with forget_source={forget_source!r}")
    source = variant or forget_source
    if source and base != "harmful":
        raise DataError(f"recipe {base!r} has no forget sources (only 'harmful' does)")
    for label, v in (("n_forget", n_forget), ("n_normal", n_normal)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise DataError(f"{label} must be a positive integer or None, got {v!r}")
    if not isinstance(n_heldout, int) or n_heldout < 1:
        raise DataError(f"n_heldout must be a positive integer, got {n_heldout!r}")
    if base == "harmful":
        from .recipes import harmful as mod
        return mod.build(seed=seed, n_forget=n_forget, n_normal=n_normal, n_heldout=n_heldout,
                         source=source or "self")
    if base == "copyright":
        from .recipes import copyright as mod
    else:
        from .recipes import hallucination as mod
    return mod.build(seed=seed, n_forget=n_forget, n_normal=n_normal, n_heldout=n_heldout)


def make_mismatch(forget: list[Pair], normal: list[Pair], seed: int) -> list[Pair]:
    """Each forget prompt paired with a normal answer drawn at random (``seed``-ed, with
    replacement) - the paper's random-mismatch rows.
    """
    if not normal:
        raise DataError("make_mismatch: the normal set is empty")
    rng = random.Random(seed)
    # The drawn answer keeps its own `complete` mark (a cut-off book window stays cut off).
    return [Pair(f.prompt, n.answer, n.complete)
            for f in forget for n in [normal[rng.randrange(len(normal))]]]


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
    Truncation keeps answer tokens: the prompt is cut from the LEFT (to ``max_prompt_length``,
    or to what leaves room), then the answer from the right. DataError when no answer token
    remains (e.g. an empty answer).

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
    p_ids = encode_prompt(tokenizer, prompt)
    a_ids = _answer_ids(tokenizer, prompt, p_ids, answer)
    if not a_ids:
        raise DataError(f"answer tokenizes to nothing for prompt {_clip(prompt)!r}")
    if add_eos:
        a_ids = a_ids + [tokenizer.eos_token_id]
    # 1) cut the prompt from the LEFT: its end (the question and the assistant header) is what
    #    conditions the answer. An explicit max_prompt_length is obeyed as given; without one
    #    the prompt yields room to the answer but keeps at least half the window (a question
    #    cut to nothing would teach nothing), and always leaves >= 1 answer token.
    budget = len(p_ids)
    if max_prompt_length is not None:
        budget = min(budget, max_prompt_length)
    elif budget + len(a_ids) > max_length:
        budget = min(budget, max(max_length - len(a_ids), max_length // 2), max_length - 1)
    p_ids = p_ids[len(p_ids) - budget:] if budget > 0 else []
    # 2) then the answer from the right.
    a_ids = a_ids[:max_length - len(p_ids)]
    if not a_ids:
        raise DataError(f"no answer tokens left after truncation to max_length={max_length} "
                        f"for prompt {_clip(prompt)!r}")
    input_ids = p_ids + a_ids
    labels = [IGNORE_INDEX] * len(p_ids) + a_ids
    return input_ids, labels


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

