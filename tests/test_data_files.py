"""Reading data files: every format, every row validated, one-line errors naming file and line."""
import csv
import gzip
import json
import sys
import time

import pytest

from fastunlearn.data_files import (
    CHARS_PER_TOKEN_BOUND,
    ChatPrompt,
    DataError,
    Pair,
    clip_to_tokens,
    load_pairs,
    pair_record,
    read_records,
    record_pair,
    with_user_text,
)

ROWS = [{"prompt": "p1", "answer": "a1"}, {"prompt": "p2", "answer": "a2"}]
WANT = [Pair("p1", "a1"), Pair("p2", "a2")]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_text_formats(tmp_path):
    jl = _write(tmp_path / "x.jsonl", "\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    js = _write(tmp_path / "x.json", json.dumps(ROWS))
    js_obj = _write(tmp_path / "obj.json", json.dumps({"data": ROWS, "version": 1}))
    js_lines = _write(tmp_path / "lines.json", "\n".join(json.dumps(r) for r in ROWS))
    cs = tmp_path / "x.csv"
    with open(cs, "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "answer"])
        w.writeheader()
        w.writerows(ROWS)
    gz = tmp_path / "x.csv.gz"
    gz.write_bytes(gzip.compress(cs.read_bytes()))
    for p in (jl, js, js_obj, js_lines, cs, gz):
        assert load_pairs(p) == WANT, p
    assert load_pairs(jl, limit=1) == WANT[:1]
    q = _write(tmp_path / "q.jsonl", json.dumps({"q": "p", "a": "x"}))
    assert load_pairs(q, prompt_col="q", answer_col="a") == [Pair("p", "x")]


def test_jsonl_lines_split_at_newlines_only(tmp_path):
    rows = [{"prompt": "p\u2028q\x1c", "answer": "a\u2029"}, {"prompt": "p2", "answer": "a2"}]
    p = tmp_path / "sep.jsonl"
    p.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert load_pairs(p) == [Pair(r["prompt"], r["answer"]) for r in rows]


def test_complete_column(tmp_path):
    jl = _write(tmp_path / "c.jsonl", json.dumps({"prompt": "p", "answer": "a", "complete": False})
                + "\n" + json.dumps({"prompt": "q", "answer": "b"}))
    assert [p.complete for p in load_pairs(jl)] == [False, True]
    cs = _write(tmp_path / "c.csv", "prompt,answer,complete\np,a,false\nq,b,True\n")
    assert [p.complete for p in load_pairs(cs)] == [False, True]
    bad = _write(tmp_path / "bad.csv", "prompt,answer,complete\np,a,maybe\n")
    with pytest.raises(DataError, match="bad.csv: line 2: column 'complete'"):
        load_pairs(bad)


@pytest.mark.parametrize("name, text, match", [
    ("nope.jsonl", None, "file not found"),
    ("cols.jsonl", json.dumps({"question": "q", "response": "r"}),
     r"line 1: column 'prompt' not found; available columns: question, response"),
    ("empty.jsonl", "\n", "no rows"),
    ("empty.json", "[]", "no rows"),
    ("broken.jsonl", '{"prompt": "a", "answer": "b"}\n{oops\n', "line 2: invalid JSON"),
    ("broken.json", "[{", "invalid JSON"),
    ("x.txt", "x", "unsupported file type"),
    ("row2.jsonl", json.dumps({"prompt": "a", "answer": "b"}) + "\n" + json.dumps({"prompt": "c"}),
     "line 2: column 'answer' not found"),
    ("null.json", json.dumps([{"prompt": "a", "answer": None}]), "record 1: column 'answer' is "
     "empty"),
    ("list.jsonl", json.dumps({"prompt": "a", "answer": ["b"]}), "is a list, expected text"),
    ("dupkey.jsonl", '{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": "b", '
     '"answer": "c"}', "line 2: duplicate key 'answer'"),
])
def test_errors_name_file_and_line(tmp_path, name, text, match):
    p = tmp_path / name if text is None else _write(tmp_path / name, text)
    with pytest.raises(DataError, match=match) as e:
        load_pairs(p)
    assert name in _one_line(e)


def test_bad_gzip(tmp_path):
    bad_gz = tmp_path / "x.jsonl.gz"
    bad_gz.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read"):
        load_pairs(bad_gz)


# --------------------------------------------------------------------------- never corrupted

@pytest.mark.parametrize("text", [
    # the stray quote closes at the end of a later row: four rows read as one answer
    'prompt,answer\nq1,"a1\nq2,a2\nq3,a3\nq4,a4"\nq5,a5\n',
    # never closed
    'prompt,answer\nq1,"a1\nq2,a2\nq3,a3\n',
    # closes where a later field opens its own quotes
    'prompt,answer\nq1,"a1\nq2,a2\nq3,"a3, x"\n',
])
def test_csv_stray_quote_is_refused_with_its_line(tmp_path, text):
    p = _write(tmp_path / "stray.csv", text)
    with pytest.raises(DataError, match="stray.csv: line 2: ") as e:
        load_pairs(p)
    _one_line(e)


def test_csv_stray_quote_in_a_wider_file(tmp_path):
    p = _write(tmp_path / "w.csv", 'id,prompt,answer\n1,q1,"a1\n2,q2,a2"\n3,q3,a3\n')
    with pytest.raises(DataError, match=r"line 2: a quoted field spans lines 2-3.*stray quote"):
        load_pairs(p)


def test_csv_multiline_answers_are_kept(tmp_path):
    rows = [{"prompt": "list, please", "answer": "Sure, here.\nStep 1, do x."},
            {"prompt": "code", "answer": "def f(a, b):\n    return a + b\n"},
            {"prompt": "poem", "answer": "roses\nare\nred"}]
    p = tmp_path / "multi.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "answer"])
        w.writeheader()
        w.writerows(rows)
    assert [(x.prompt, x.answer) for x in load_pairs(p)] == [(r["prompt"], r["answer"])
                                                             for r in rows]


def test_csv_long_field(tmp_path):
    long = "word " * 100_000  # over the csv module's default 128 KiB field limit
    p = _write(tmp_path / "long.csv", f'prompt,answer\nq,"{long}"\n')
    assert load_pairs(p) == [Pair("q", long)]


def test_csv_duplicate_header_is_refused(tmp_path):
    p = _write(tmp_path / "dup.csv", "prompt,answer,answer\nq,good,bad\n")
    with pytest.raises(DataError, match="dup.csv: line 1: column 'answer' appears twice"):
        load_pairs(p)


@pytest.mark.parametrize("row", ["q,a,extra", "q"])
def test_csv_wrong_field_count(tmp_path, row):
    p = _write(tmp_path / "n.csv", f"prompt,answer\nq0,a0\n\n{row}\n")
    with pytest.raises(DataError, match=r"n.csv: line 4: \d fields, but the header has 2"):
        load_pairs(p)


@pytest.mark.parametrize("bad", [{"prompt": "q", "answer": "   "}, {"prompt": "\t", "answer": "a"}])
def test_every_row_is_validated(tmp_path, bad):
    """A blank answer or prompt is refused wherever the row is, held-out split included."""
    rows = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(40)] + [bad]
    p = _write(tmp_path / "f.jsonl", "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"f.jsonl: line 41: the (answer|prompt) is blank"):
        load_pairs(p)


def test_blank_row_in_heldout_split_is_refused(tmp_path):
    """Through the config path: whichever rows the seeded split holds out, a blank answer fails
    before any split."""
    from fastunlearn.config import DataSection
    from fastunlearn.inputs import load_training_data

    rows = [{"prompt": f"q{i}", "answer": f"a{i}" if i != 3 else " "} for i in range(12)]
    f = _write(tmp_path / "forget.jsonl", "\n".join(json.dumps(r) for r in rows))
    n = _write(tmp_path / "normal.jsonl", "\n".join(json.dumps(r) for r in ROWS * 3))
    for seed in range(4):
        with pytest.raises(DataError, match="forget.jsonl: line 4: the answer is blank"):
            load_training_data(DataSection(forget_file=str(f), normal_file=str(n), seed=seed,
                                           n_heldout=2))


def test_clip_to_tokens_bounds_huge_rows():
    n = 3 * CHARS_PER_TOKEN_BOUND
    text = "x" * (n + 50)
    assert clip_to_tokens("short", 3) == "short"
    assert clip_to_tokens(text, 3) == text[:n]
    assert clip_to_tokens("ab" + text, 3, keep_end=True) == text[-n:]
    chat = ChatPrompt((("system", "s"), ("user", "u" * (n + 1))))
    clipped = clip_to_tokens(chat, 3, keep_end=True)
    assert isinstance(clipped, ChatPrompt) and clipped.turns[0] == ("system", "s")
    assert len(clipped) == n


def test_clip_keeps_every_token_that_format_example_keeps():
    from fastunlearn.data import format_example
    from tests.tiny_model import tiny_tokenizer

    tok = tiny_tokenizer()
    prompt, answer = "q " * 5000, "answer words " * 5000
    full = format_example(tok, prompt, answer, max_length=96, max_prompt_length=40)
    clipped = format_example(tok, clip_to_tokens(prompt, 96, keep_end=True),
                             clip_to_tokens(answer, 96), max_length=96, max_prompt_length=40)
    assert clipped == full


# --------------------------------------------------------------------------- chat messages

def test_chat_messages(tmp_path):
    recs = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "and 3+3?"},
                      {"role": "assistant", "content": "6"}]},
    ]
    p = _write(tmp_path / "chat.jsonl", "\n".join(json.dumps(r) for r in recs))
    single, multi = load_pairs(p)
    assert single == Pair("hi", "yo") and type(single.prompt) is str
    assert multi.answer == "6" and multi.prompt == ChatPrompt(tuple(
        (m["role"], m["content"]) for m in recs[1]["messages"][:-1]))
    assert str(multi.prompt) == "and 3+3?"
    assert multi.prompt != "and 3+3?"  # the history is part of the prompt


def test_chat_prompt_is_rendered_with_its_history():
    from fastunlearn.data import format_example
    from fastunlearn.generation import format_prompt
    from tests.tiny_model import tiny_tokenizer

    tok = tiny_tokenizer(chat_template=True)
    turns = (("system", "be brief"), ("user", "2+2?"), ("assistant", "4"), ("user", "3+3?"))
    text = format_prompt(tok, ChatPrompt(turns))
    assert text == tok.apply_chat_template([{"role": r, "content": c} for r, c in turns],
                                           tokenize=False, add_generation_prompt=True)
    ids, labels = format_example(tok, ChatPrompt(turns), "6", max_length=256)
    assert "be brief" in tok.decode(ids) and tok.decode([t for t in labels if t != -100]) \
        .startswith("6")
    with pytest.raises(ValueError, match="multi-turn chat prompt needs a tokenizer with a chat"):
        format_prompt(tiny_tokenizer(chat_template=False), ChatPrompt(turns))


def test_with_user_text_keeps_the_conversation():
    chat = ChatPrompt((("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "long")))
    cut = with_user_text(chat, "lo")
    assert isinstance(cut, ChatPrompt) and str(cut) == "lo"
    assert cut.turns == chat.turns[:-1] + (("user", "lo"),)
    assert with_user_text("plain prompt", "pt") == "pt"


def test_pair_record_round_trip_keeps_chat_history(tmp_path):
    chat = Pair(ChatPrompt((("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"))),
                "a2", complete=False)
    pairs = [Pair("p", "a"), chat]
    assert [record_pair(json.loads(json.dumps(pair_record(x)))) for x in pairs] == pairs
    p = _write(tmp_path / "rt.jsonl", "".join(json.dumps(pair_record(x)) + "\n" for x in pairs))
    back = load_pairs(p)
    assert back == pairs and back[1].prompt.turns == chat.prompt.turns
    with pytest.raises(DataError, match="heldout.json: record 3: the answer is blank"):
        record_pair({"prompt": "q", "answer": ""}, source="heldout.json", where="record 3")


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "hi"}], "at least a user and an assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "message 2 needs"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"},
      {"role": "user", "content": "more?"}], "must end with a user turn and then the assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}],
     "the answer is blank"),
])
def test_bad_chat_messages(tmp_path, messages, match):
    p = _write(tmp_path / "chat.jsonl", json.dumps({"messages": messages}))
    with pytest.raises(DataError, match=f"chat.jsonl: line 1: .*{match}"):
        load_pairs(p)


# --------------------------------------------------------------------------- optional formats

def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    assert load_pairs(p) == WANT
    chat = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]), chat)
    assert load_pairs(chat) == [Pair("hi", "yo")]
    blank = tmp_path / "blank.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS + [{"prompt": "q", "answer": ""}]), blank)
    with pytest.raises(DataError, match="blank.parquet: row 3: the answer is blank"):
        load_pairs(blank)
    _write(tmp_path / "bad.parquet", "not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read Parquet"):
        load_pairs(tmp_path / "bad.parquet")


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"x.parquet: reading Parquet needs pyarrow: pip install "
                                        r"'fastunlearn\[data\]'"):
        load_pairs(tmp_path / "x.parquet")


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    assert load_pairs(folder) == WANT
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(dd))
    assert load_pairs(dd) == WANT  # the train split
    two = tmp_path / "two"
    datasets.DatasetDict({"a": datasets.Dataset.from_list(ROWS),
                          "b": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(two))
    with pytest.raises(DataError, match="choose a split.*splits: a, b"):
        load_pairs(two)


def test_plain_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="not a datasets.save_to_disk folder"):
        load_pairs(tmp_path)


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"},
                                 {"HF_ENDPOINT": "http://127.0.0.1:9"}])  # nothing listens
def test_hub_id_offline_fails_fast(monkeypatch, tmp_path, env):
    monkeypatch.chdir(tmp_path)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="someone/some-set: no such file, and the Hugging Face hub "
                                        "is not reachable") as e:
        load_pairs("someone/some-set")
    assert time.perf_counter() - t0 < 5
    _one_line(e)


def test_read_records_keeps_plain_records(tmp_path):
    p = _write(tmp_path / "r.json", json.dumps(["a", "b"]))
    assert read_records(p) == ["a", "b"]
