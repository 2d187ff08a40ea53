"""Data: formatting, truncation, mismatch rows, collation (file reading: test_data_files.py)."""
import pytest
import torch

from fastunlearn.data import (
    DataError,
    Pair,
    Row,
    collate,
    ensure_pad_token,
    format_example,
    make_mismatch,
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
