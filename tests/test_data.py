"""Data: file loading, recipes and their held-out splits, formatting, truncation, collation."""
import csv
import gzip
import json

import pytest
import torch

from fastunlearn.data import (
    DataError,
    Pair,
    Row,
    collate,
    ensure_pad_token,
    format_example,
    load_pairs,
    load_recipe,
    make_mismatch,
    recipe_names,
    tokenize_pairs,
)
from fastunlearn.generation import format_prompt
from tests.tiny_model import tiny_tokenizer

IGNORE = -100


# --------------------------------------------------------------------------- formatting

@pytest.mark.parametrize("chat", [True, False])
def test_answer_only_labels(chat):
    tok = tiny_tokenizer(chat_template=chat)
    ids, labels = format_example(tok, "How are you?", "Fine, thanks.", max_length=256)
    assert len(ids) == len(labels)
    n_prompt = sum(1 for x in labels if x == IGNORE)
    # prompt part is exactly the formatted prompt, all masked
    assert tok.decode(ids[:n_prompt]) == format_prompt(tok, "How are you?")
    assert all(x == IGNORE for x in labels[:n_prompt])
    # answer part is labelled with its own (unshifted) ids and ends with EOS
    assert labels[n_prompt:] == ids[n_prompt:]
    answered = tok.decode([x for x in labels if x != IGNORE])
    lead = "" if chat else " "
    assert answered == lead + "Fine, thanks." + tok.eos_token
    assert labels[-1] == tok.eos_token_id


def test_paper_format_full_text():
    tok = tiny_tokenizer(chat_template=False)
    ids, _ = format_example(tok, "Q?", "A.", max_length=256)
    assert tok.decode(ids) == "### Question: Q?\n ### Answer: A." + tok.eos_token


@pytest.mark.parametrize("chat", [True, False])
def test_truncation_cuts_prompt_from_left_and_keeps_answer(chat):
    tok = tiny_tokenizer(chat_template=chat)
    prompt, answer = "p" * 200 + " the real question?", "short answer"
    ids, labels = format_example(tok, prompt, answer, max_length=64)
    assert len(ids) == 64
    kept = [x for x in labels if x != IGNORE]
    assert tok.decode(kept).strip() == answer + tok.eos_token  # whole answer survives
    # the prompt's END (question + assistant header) survives, its start is cut
    full_prompt = format_prompt(tok, prompt)
    n_prompt = len(ids) - len(kept)
    assert full_prompt.endswith(tok.decode(ids[:n_prompt]))
    assert n_prompt < len(full_prompt)


def test_truncation_long_answer_cut_from_right():
    tok = tiny_tokenizer(chat_template=False)
    prompt, answer = "What?", "abcdefghij" * 20
    ids, labels = format_example(tok, prompt, answer, max_length=80)
    n_prompt = sum(1 for x in labels if x == IGNORE)
    assert len(ids) == 80
    # the prompt (under half the window) stays whole; the answer keeps its beginning
    assert tok.decode(ids[:n_prompt]) == format_prompt(tok, prompt)
    assert (" " + answer).startswith(tok.decode(ids[n_prompt:]))
    # without max_prompt_length a long prompt keeps half the window against a long answer
    ids, labels = format_example(tok, "w" * 100, answer, max_length=80)
    assert sum(1 for x in labels if x == IGNORE) == 40 and len(ids) == 80


def test_max_prompt_length():
    tok = tiny_tokenizer(chat_template=True)
    ids, labels = format_example(tok, "q" * 100, "answer", max_length=128, max_prompt_length=20)
    assert sum(1 for x in labels if x == IGNORE) == 20
    assert len(ids) == 20 + len("answer") + 1


def test_no_answer_token_left_is_an_error():
    tok = tiny_tokenizer(chat_template=True)
    with pytest.raises(DataError, match="no answer tokens left"):
        format_example(tok, "q" * 100, "answer", max_length=32, max_prompt_length=32)


def test_cut_off_answer_gets_no_eos():
    tok = tiny_tokenizer(chat_template=True)
    ids, labels = format_example(tok, "Q?", "half an ans", max_length=64, add_eos=False)
    assert tok.decode([x for x in labels if x != IGNORE]) == "half an ans"
    assert labels[-1] != tok.eos_token_id
    rows = tokenize_pairs(tok, [Pair("Q?", "half an ans", complete=False), Pair("Q?", "done")],
                          0, max_length=64)
    assert rows[0].labels[-1] != tok.eos_token_id and rows[1].labels[-1] == tok.eos_token_id
    assert Pair("a", "b") == Pair("a", "b", True)  # complete defaults to True


@pytest.mark.parametrize("answer", ["", "   "])
def test_empty_answer_is_an_error(answer):
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match="empty answer"):
        format_example(tok, "q", answer, max_length=32)


def test_tokenize_pairs_kind_and_error_names_pair():
    tok = tiny_tokenizer()
    rows = tokenize_pairs(tok, [Pair("a", "b"), Pair("c", "d")], 1, max_length=64)
    assert [r.kind for r in rows] == [1, 1]
    with pytest.raises(DataError, match="pair 1"):
        tokenize_pairs(tok, [Pair("a", "b"), Pair("c", "")], 0, max_length=64)
    with pytest.raises(DataError, match="kind"):
        tokenize_pairs(tok, [Pair("a", "b")], 3, max_length=64)


def test_ensure_pad_token_uses_eos_without_resizing():
    tok = tiny_tokenizer(pad=False)
    n = len(tok)
    assert tok.pad_token_id is None
    ensure_pad_token(tok)
    assert tok.pad_token_id == tok.eos_token_id
    assert len(tok) == n
    tok2 = tiny_tokenizer(pad=True)
    ensure_pad_token(tok2)
    assert tok2.pad_token == "<pad>"  # an existing pad token is kept


# --------------------------------------------------------------------------- collate

def test_collate_right_padding():
    rows = [Row([5, 6, 7], [IGNORE, 6, 7], 0), Row([8], [8], 2), Row([9, 10], [IGNORE, 10], 1)]
    b = collate(rows, pad_id=1)
    assert b["input_ids"].shape == (3, 3) and b["input_ids"].dtype == torch.long
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1], [9, 10, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE], [IGNORE, 10, IGNORE]]
    assert b["kind"].tolist() == [0, 2, 1]
    for k in ("attention_mask", "labels", "kind"):
        assert b[k].dtype == torch.long
    with pytest.raises(DataError):
        collate([], pad_id=1)


# --------------------------------------------------------------------------- files

def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_load_pairs_formats(tmp_path):
    rows = [{"prompt": "p1", "answer": "a1"}, {"prompt": "p2", "answer": "a2"}]
    want = [Pair("p1", "a1"), Pair("p2", "a2")]
    jl = _write(tmp_path / "x.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    js = _write(tmp_path / "x.json", json.dumps(rows))
    js_lines = _write(tmp_path / "lines.json", "\n".join(json.dumps(r) for r in rows))
    cs = tmp_path / "x.csv"
    with open(cs, "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "answer"])
        w.writeheader()
        w.writerows(rows)
    gz = tmp_path / "x.csv.gz"
    gz.write_bytes(gzip.compress(cs.read_bytes()))
    for p in (jl, js, js_lines, cs, gz):
        assert load_pairs(p) == want, p
    assert load_pairs(jl, limit=1) == want[:1]
    q = _write(tmp_path / "q.jsonl", json.dumps({"q": "p", "a": "x"}))
    assert load_pairs(q, prompt_col="q", answer_col="a") == [Pair("p", "x")]


def test_load_pairs_complete_column(tmp_path):
    jl = _write(tmp_path / "c.jsonl", json.dumps({"prompt": "p", "answer": "a", "complete": False})
                + "\n" + json.dumps({"prompt": "q", "answer": "b"}))
    assert [p.complete for p in load_pairs(jl)] == [False, True]
    cs = _write(tmp_path / "c.csv", "prompt,answer,complete\np,a,false\nq,b,True\n")
    assert [p.complete for p in load_pairs(cs)] == [False, True]
    bad = _write(tmp_path / "bad.csv", "prompt,answer,complete\np,a,maybe\n")
    with pytest.raises(DataError, match="row 1 column 'complete'"):
        load_pairs(bad)


def test_load_pairs_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_pairs(tmp_path / "nope.jsonl")
    bad = _write(tmp_path / "cols.jsonl", json.dumps({"question": "q", "response": "r"}))
    with pytest.raises(DataError, match=r"column 'prompt' not found.*question, response"):
        load_pairs(bad)
    with pytest.raises(DataError, match="no rows"):
        load_pairs(_write(tmp_path / "empty.jsonl", "\n"))
    with pytest.raises(DataError, match="no rows"):
        load_pairs(_write(tmp_path / "empty.json", "[]"))
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        load_pairs(_write(tmp_path / "broken.jsonl", '{"prompt": "a", "answer": "b"}\n{oops\n'))
    with pytest.raises(DataError, match="invalid JSON"):
        load_pairs(_write(tmp_path / "broken.json", "[{"))
    with pytest.raises(DataError, match="unsupported file type"):
        load_pairs(_write(tmp_path / "x.parquet", "x"))
    bad_gz = tmp_path / "x.jsonl.gz"
    bad_gz.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read"):
        load_pairs(bad_gz)
    row2 = _write(tmp_path / "row2.jsonl",
                  json.dumps({"prompt": "a", "answer": "b"}) + "\n" + json.dumps({"prompt": "c"}))
    with pytest.raises(DataError, match="row 2 has no column 'answer'"):
        load_pairs(row2)


# --------------------------------------------------------------------------- recipes

def test_recipe_names_and_unknown():
    assert recipe_names()[0] == "harmful"
    assert set(recipe_names()) == {"harmful", "copyright", "hallucination"}
    with pytest.raises(DataError, match="unknown recipe 'nope'.*harmful, copyright, hallucination"):
        load_recipe("nope")
    with pytest.raises(DataError, match="unknown harmful forget source"):
        load_recipe("harmful:nope")


def _prompts(pairs):
    return {" ".join(p.prompt.lower().split()) for p in pairs}


@pytest.mark.parametrize("name", ["harmful", "harmful:jbb", "harmful:hh", "copyright",
                                  "hallucination"])
def test_recipe_heldout_disjoint_from_training(name):
    r = load_recipe(name, seed=3, n_heldout=8)
    assert len(r.heldout_forget) == 8 and len(r.heldout_normal) == 8
    assert r.forget and r.normal and r.sources
    train = _prompts(r.forget) | _prompts(r.normal)
    assert not (_prompts(r.heldout_forget) & train)
    assert not (_prompts(r.heldout_normal) & train)
    assert all(p.answer.strip() for p in r.forget + r.normal)


def test_recipe_seeded_and_caps():
    a = load_recipe("harmful", seed=0, n_forget=10, n_normal=12, n_heldout=4)
    b = load_recipe("harmful", seed=0, n_forget=10, n_normal=12, n_heldout=4)
    c = load_recipe("harmful", seed=1, n_forget=10, n_normal=12, n_heldout=4)
    full = load_recipe("harmful", seed=0, n_heldout=4)
    assert a == b
    assert a.heldout_forget != c.heldout_forget
    assert len(a.forget) == 10 and len(a.normal) == 12
    assert a.heldout_forget == full.heldout_forget  # caps never move the held-out split
    assert a.forget == full.forget[:10]


def test_recipe_extras():
    from fastunlearn.recipes.harmful import is_refusal

    h = load_recipe("harmful")
    assert h.extra["forget_source"] == "self" and len(h.forget) > 200
    assert not any(is_refusal(p.answer) for p in h.forget + h.heldout_forget)
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert len(h.extra["xstest_safe"]) == 250
    assert len(h.extra["harmful_eval_prompts"]) > 20
    c = load_recipe("copyright", n_heldout=4)
    forget_text = " ".join(f"{p.prompt} {p.answer}" for p in c.forget)
    assert len(c.extra["book_forget_heldout"]) == 4
    assert all(s not in forget_text for s in c.extra["book_forget_heldout"])
    assert "Gutenberg" not in forget_text  # header / footer stripped
    assert not any(p.complete for p in c.forget)  # windows stop mid-text: no EOS
    hal = load_recipe("hallucination", n_heldout=5)
    assert len(hal.extra["halueval"]) == 5
    assert {"question", "knowledge", "right_answer", "hallucinated_answer"} <= set(
        hal.extra["halueval"][0])
    assert [p.answer for p in hal.heldout_forget] == [
        it["hallucinated_answer"] for it in hal.extra["halueval"]]


def test_recipe_bad_sizes():
    with pytest.raises(DataError, match="n_heldout"):
        load_recipe("harmful", n_heldout=0)
    with pytest.raises(DataError, match="leaves nothing to train"):
        load_recipe("harmful:jbb", n_heldout=10_000)


# --------------------------------------------------------------------------- mismatch

def test_make_mismatch_seeded_from_normal_answers():
    forget = [Pair(f"harm {i}", f"bad {i}") for i in range(50)]
    normal = [Pair(f"q {i}", f"good {i}") for i in range(7)]
    m1 = make_mismatch(forget, normal, seed=0)
    assert make_mismatch(forget, normal, seed=0) == m1
    assert make_mismatch(forget, normal, seed=1) != m1
    assert [p.prompt for p in m1] == [p.prompt for p in forget]
    answers = {p.answer for p in normal}
    assert all(p.answer in answers for p in m1)
    assert len({p.answer for p in m1}) > 1  # drawn at random, not one constant answer
    cut = make_mismatch(forget, [Pair("q", "window", complete=False)], seed=0)
    assert not any(p.complete for p in cut)
    with pytest.raises(DataError, match="normal set is empty"):
        make_mismatch(forget, [], seed=0)
