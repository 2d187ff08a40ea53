"""Reading (prompt, answer) data sets from the files people have.

Sources (see :data:`FORMATS`): JSON lines, JSON and CSV files (each optionally gzip-compressed),
Parquet files, a ``datasets.save_to_disk`` folder and, when online, a Hugging Face hub dataset id
(``owner/name``, optionally ``owner/name:split``). A record gives its example either in prompt /
answer columns or in a chat ``messages`` column: the last assistant turn is the answer, the turns
before it the prompt.

Every row is checked as it is read, so rows that later land in a held-out split are checked too.
Every problem is a :class:`DataError` with a one-line message naming the file and the line (text
files) or row.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = [
    "CHARS_PER_TOKEN_BOUND", "ChatPrompt", "DataError", "FORMATS", "Pair", "clip_to_tokens",
    "load_pairs", "pair_record", "read_records", "read_text", "record_pair", "with_user_text",
]

FORMATS = (".jsonl", ".json", ".csv", ".parquet")  # files; plus datasets folders and hub ids
_TEXT_FORMATS = (".jsonl", ".json", ".csv")
_INSTALL_DATA = "pip install 'fastunlearn[data]'"
# A hub dataset id: "name" or "owner/name", optionally ":split".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
# Longest token text in common vocabularies: SmolLM2's is 81 characters (a run of spaces),
# GPT-2-style vocabularies are similar. A 3x margin keeps the cut far from the last token kept.
CHARS_PER_TOKEN_BOUND = 256


class DataError(ValueError):
    """Bad or missing data; the message is one line naming the file / column / row."""


@dataclass(frozen=True)
class Pair:
    """One (prompt, answer) example: plain strings, not yet formatted.

    ``complete`` is False for an answer that was cut off (e.g. a collected answer that hit
    ``max_new_tokens``): no EOS is appended to it, since the text does not end there.
    ``prompt`` is a :class:`ChatPrompt` for a multi-turn chat record.
    """

    prompt: str
    answer: str
    complete: bool = True


class ChatPrompt(str):
    """A multi-turn chat prompt: the text of its last user turn, plus every turn up to it.

    It is a ``str`` (the last user turn), so it prints, deduplicates and clips like a plain
    prompt; ``generation.format_prompt`` renders all of ``messages`` with the chat template.
    """

    turns: tuple[tuple[str, str], ...]

    def __new__(cls, turns: tuple[tuple[str, str], ...]):
        obj = super().__new__(cls, turns[-1][1])
        obj.turns = tuple(turns)
        return obj

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.turns]

    def __eq__(self, other):
        return str(self) == str(other) and self.turns == getattr(other, "turns", None)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(self.turns)

    def __repr__(self):
        return f"ChatPrompt({self.turns!r})"

    def __reduce__(self):
        return (ChatPrompt, (self.turns,))


def with_user_text(prompt: str, text: str) -> str:
    """``prompt`` with the text of its last user turn replaced by ``text`` (for truncation):
    ``text`` itself for a plain prompt, the same conversation for a :class:`ChatPrompt`."""
    turns = getattr(prompt, "turns", None)
    return ChatPrompt(turns[:-1] + (("user", text),)) if turns else text


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())[:200]


def _kind_of(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    return next((s for s in FORMATS if name.endswith(s)), "")


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
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise DataError(f"{p}: cannot read ({type(e).__name__}: {_one_line(e)})") from None


# --------------------------------------------------------------------------- records

def read_records(path: str | os.PathLike) -> list[Any]:
    """Records of a data source (see the module docstring for the sources).

    ``.json`` may hold a list, an object whose single list value is the records, or JSON lines.
    CSV rows come back as dicts of strings. Raises DataError on any problem.
    """
    return [rec for _, rec in _located_records(path)]


def _located_records(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs; ``where`` ("line 5", "row 3") locates the record in errors."""
    p = Path(path)
    if p.is_dir():
        return _dataset_folder_records(p)
    kind = _kind_of(p)
    if not p.exists() and not kind and _HUB_ID.match(str(path)) and not str(path).startswith("."):
        return _hub_records(str(path))
    if kind == ".parquet":
        return _parquet_records(p)
    if kind not in _TEXT_FORMATS:
        raise DataError(f"{p}: unsupported file type (use .jsonl, .json, .csv or .parquet, the "
                        f"first three optionally .gz; a datasets folder; or a hub dataset id)")
    text = read_text(p)
    if kind == ".csv":
        return _csv_records(p, text)
    if kind == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            if "Extra data" not in str(e):
                raise DataError(f"{p}: invalid JSON ({_one_line(e)})") from None
            data = None  # several top-level values: JSON lines under a .json name
        except _DuplicateKey as e:
            raise DataError(f"{p}: duplicate key {e.args[0]!r} in a record") from None
        if data is not None:
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DataError(f"{p}: expected a JSON list of records")
                data = lists[0]
            if not isinstance(data, list):
                raise DataError(f"{p}: expected a JSON list of records")
            return [(f"record {i}", rec) for i, rec in enumerate(data, 1)]
    records = []
    # Split at "\n" only: str.splitlines() also splits at U+2028 and other separators that
    # JSON strings may hold as they are.
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {i}", json.loads(line, object_pairs_hook=_no_duplicate_keys)))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: line {i}: invalid JSON ({_one_line(e)})") from None
        except _DuplicateKey as e:
            raise DataError(f"{p}: line {i}: duplicate key {e.args[0]!r}") from None
    return records


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(items: list[tuple[str, Any]]) -> dict:
    # json keeps the last of repeated keys without a word; a repeated column is refused instead.
    out = {}
    for k, v in items:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _csv_records(p: Path, text: str) -> list[tuple[str, Any]]:
    """CSV rows as dicts, refusing what would silently misread: a repeated header name, a row
    with the wrong number of fields, unbalanced quotes, and quoted line breaks whose lines look
    like rows of the file (a stray quote that merged rows)."""
    # Long texts are legitimate (rows are clipped to the token budget later): lift the csv
    # module's 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1  # first physical line of the record being read
    try:
        header = next(reader, None)
        if header is None:
            return []
        seen = set()
        for name in header:
            if name in seen:
                raise DataError(f"{p}: line 1: column {name!r} appears twice in the header")
            seen.add(name)
        records = []
        start = reader.line_num + 1
        for row in reader:
            end = reader.line_num
            if row and not (len(row) == 1 and not row[0].strip()):  # skip blank lines
                if len(row) != len(header):
                    raise DataError(f"{p}: line {start}: {len(row)} fields, but the header has "
                                    f"{len(header)}")
                if end > start:
                    _check_line_breaks(p, row, len(header), start, end)
                records.append((f"line {start}", dict(zip(header, row))))
            start = end + 1
    except csv.Error as e:
        raise DataError(f"{p}: line {start}: cannot parse CSV ({_one_line(e)}); check the quotes "
                        f"from this line on") from None
    return records


def _check_line_breaks(p: Path, row: list[str], n_fields: int, start: int, end: int) -> None:
    """A quoted field may hold line breaks; but when every line after its first parses as a
    full row of the file, a stray quote has almost surely merged rows into one field. With two
    columns one such line is ambiguous (``Yes, sure``), so two or more are required there."""
    for value in row:
        lines = [ln for ln in value.replace("\r\n", "\n").split("\n")[1:] if ln.strip()]
        if not lines or (n_fields == 2 and len(lines) < 2) or n_fields < 2:
            continue
        if all(len(next(csv.reader([ln]))) == n_fields for ln in lines):
            raise DataError(f"{p}: line {start}: a quoted field spans lines {start}-{end} and "
                            f"its lines look like rows of this file (a stray quote?); write "
                            f"multi-line text as JSON lines")


def _import_optional(module: str, what: str, p: Path | str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise DataError(f"{p}: reading {what} needs {module.split('.')[0]}: "
                        f"{_INSTALL_DATA}") from None


def _table_records(p: Path | str, columns: list[str], rows: list[dict]) -> list[tuple[str, Any]]:
    dup = next((c for i, c in enumerate(columns) if c in columns[:i]), None)
    if dup is not None:
        raise DataError(f"{p}: column {dup!r} appears twice")
    return [(f"row {i}", r) for i, r in enumerate(rows, 1)]


def _parquet_records(p: Path) -> list[tuple[str, Any]]:
    pq = _import_optional("pyarrow.parquet", "Parquet", p)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises its own error types for a bad file
        raise DataError(f"{p}: cannot read Parquet ({type(e).__name__}: {_one_line(e)})") from None
    return _table_records(p, list(table.column_names), table.to_pylist())


def _one_split(p: Path | str, ds, split: str | None):
    """A Dataset from a Dataset or DatasetDict: ``split``, else "train", else the only one."""
    if not hasattr(ds, "keys"):
        return ds
    names = list(ds.keys())
    pick = split or ("train" if "train" in names else (names[0] if len(names) == 1 else None))
    if pick not in names:
        raise DataError(f"{p}: choose a split with {p}:<split>; splits: {', '.join(names)}"
                        if split is None else f"{p}: no split {split!r}; splits: "
                        f"{', '.join(names)}")
    return ds[pick]


def _dataset_folder_records(p: Path) -> list[tuple[str, Any]]:
    if not any((p / f).exists() for f in ("dataset_info.json", "state.json",
                                            "dataset_dict.json")):
        raise DataError(f"{p}: is a directory but not a datasets.save_to_disk folder")
    datasets = _import_optional("datasets", "a datasets folder", p)
    try:
        ds = _one_split(p, datasets.load_from_disk(str(p)), None)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{p}: cannot load dataset ({type(e).__name__}: {_one_line(e)})") from None
    return _table_records(p, list(ds.column_names), ds.to_list())


def _hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_records(spec: str) -> list[tuple[str, Any]]:
    repo, _, split = spec.partition(":")
    if not _hub_reachable():
        raise DataError(f"{spec}: no such file, and the Hugging Face hub is not reachable to "
                        f"load it as a dataset id (offline?)")
    datasets = _import_optional("datasets", "a hub dataset", spec)
    try:
        ds = _one_split(spec, datasets.load_dataset(repo), split or None)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{spec}: cannot load hub dataset ({type(e).__name__}: "
                        f"{_one_line(e)})") from None
    return _table_records(spec, list(ds.column_names), ds.to_list())


# --------------------------------------------------------------------------- pairs

def _field(p: Path, rec: Any, col: str, where: int | str) -> str:
    """Column ``col`` of the record at ``where`` (a 1-based row number or "line 5") as text."""
    where = f"row {where}" if isinstance(where, int) else where
    if not isinstance(rec, dict):
        raise DataError(f"{p}: {where}: a {type(rec).__name__}, expected an object")
    if col not in rec:
        avail = ", ".join(map(str, rec.keys())) or "none"
        raise DataError(f"{p}: {where}: column {col!r} not found; available columns: {avail}")
    val = rec[col]
    if val is None:
        raise DataError(f"{p}: {where}: column {col!r} is empty (null)")
    if isinstance(val, (dict, list)):
        raise DataError(f"{p}: {where}: column {col!r} is a {type(val).__name__}, expected text")
    return str(val)


def _complete(p: Path, rec: Any, where: str) -> bool:
    """Optional ``complete`` column (written by ``fastunlearn collect`` for cut-off answers)."""
    val = rec.get("complete", True) if isinstance(rec, dict) else True
    if val is None:
        return True
    if isinstance(val, str):  # CSV
        low = val.strip().lower()
        if low in ("", "1", "true", "yes"):
            return True
        if low in ("0", "false", "no"):
            return False
    elif isinstance(val, (bool, int)) and val in (0, 1):
        return bool(val)
    raise DataError(f"{p}: {where}: column 'complete' must be true or false, got {val!r}")


_ROLES = ("system", "user", "assistant", "tool")


def _chat_pair(p: Path, messages: Any, where: str) -> tuple[str, str]:
    """(prompt, answer) of a chat record: the last turn is the assistant's answer, the turns
    before it (ending with a user turn) the prompt, a :class:`ChatPrompt` when more than one."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{p}: {where}: 'messages' must be a list of at least a user and an "
                        f"assistant turn")
    turns = []
    for j, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                or m.get("role") not in _ROLES:
            raise DataError(f"{p}: {where}: message {j} needs a role ({', '.join(_ROLES)}) and "
                            f"text content")
        turns.append((m["role"], m["content"]))
    if turns[-1][0] != "assistant" or turns[-2][0] != "user":
        raise DataError(f"{p}: {where}: 'messages' must end with a user turn and then the "
                        f"assistant turn that is the answer")
    prompt = turns[:-1]
    return (prompt[0][1] if len(prompt) == 1 else ChatPrompt(tuple(prompt))), turns[-1][1]


def load_pairs(path: str | os.PathLike, *, prompt_col: str = "prompt",
               answer_col: str = "answer", limit: int | None = None) -> list[Pair]:
    """(prompt, answer) pairs from a data source (see the module docstring).

    A record without ``prompt_col`` but with a ``messages`` list is read as a chat. Every row
    is validated: a missing / unreadable source, a missing column (the message lists the
    available ones), a null, blank or non-text value, or an empty result raise
    :class:`DataError`. ``limit`` keeps the first N rows. An optional boolean ``complete``
    column marks cut-off answers (see :class:`Pair`).
    """
    p = path if isinstance(path, Path) else Path(path)
    if limit is not None and limit < 1:
        raise DataError(f"{p}: limit must be >= 1, got {limit}")
    located = _located_records(path)
    pairs = [record_pair(rec, source=p, where=where, prompt_col=prompt_col,
                         answer_col=answer_col) for where, rec in located[:limit]]
    if not pairs:
        raise DataError(f"{p}: no rows (empty data set)")
    return pairs


def record_pair(rec: Any, *, source: str | os.PathLike = "record", where: str = "row 1",
                prompt_col: str = "prompt", answer_col: str = "answer") -> Pair:
    """The validated :class:`Pair` of one record (prompt / answer columns or chat
    ``messages``); errors name ``source`` and ``where``. Inverse of :func:`pair_record`."""
    if isinstance(rec, dict) and prompt_col not in rec and "messages" in rec:
        prompt, answer = _chat_pair(source, rec["messages"], where)
    else:
        prompt = _field(source, rec, prompt_col, where)
        answer = _field(source, rec, answer_col, where)
    for what, text in (("prompt", prompt), ("answer", answer)):
        if not text.strip():
            raise DataError(f"{source}: {where}: the {what} is blank")
    return Pair(prompt, answer, _complete(source, rec, where))


def pair_record(pair: Pair) -> dict[str, Any]:
    """A JSON-ready record of ``pair`` that :func:`record_pair` reads back equal: a multi-turn
    prompt is written as chat ``messages`` (as a plain string it would lose its history)."""
    turns = getattr(pair.prompt, "turns", None)
    if turns:
        rec = {"messages": [{"role": r, "content": c} for r, c in turns]
                           + [{"role": "assistant", "content": pair.answer}]}
    else:
        rec = {"prompt": str(pair.prompt), "answer": pair.answer}
    if not pair.complete:
        rec["complete"] = False
    return rec


def clip_to_tokens(text: str, max_tokens: int, *, keep_end: bool = False) -> str:
    """``text`` cut to ``max_tokens * CHARS_PER_TOKEN_BOUND`` characters before tokenising, so a
    huge row costs no more than the tokens it can keep. ``keep_end`` keeps the end (a prompt is
    cut from the left); otherwise the start (an answer is cut from the right). No token that
    would be kept is lost: ``max_tokens`` tokens never span that many characters.
    """
    n = max(int(max_tokens), 1) * CHARS_PER_TOKEN_BOUND
    if isinstance(text, ChatPrompt):  # clip each turn, keeping the conversation
        if all(len(c) <= n for _, c in text.turns):
            return text
        return ChatPrompt(tuple((r, clip_to_tokens(c, max_tokens, keep_end=True))
                                for r, c in text.turns))
    if len(text) <= n:
        return text
    return text[len(text) - n:] if keep_end else text[:n]
