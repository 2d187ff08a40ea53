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
    # the user text's END (the question) survives, its start is cut; the format is whole
    n_prompt = len(ids) - len(kept)
    rendered = tok.decode(ids[:n_prompt])
    cut = next(prompt[i:] for i in range(len(prompt)) if format_prompt(tok, prompt[i:]) == rendered)
    assert cut.endswith(" the real question?") and len(cut) < len(prompt)


SYSTEM_TEMPLATE = (
    "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("limit", [dict(max_length=96), dict(max_length=160, max_prompt_length=70)])
def test_truncation_keeps_the_chat_template_intact(limit):
    """A long question is cut inside the user's text; the system prompt, the turn markers and
    the assistant header stay whole (cutting the rendered text started rows mid-system-prompt)."""
    tok = tiny_tokenizer()
    tok.chat_template = SYSTEM_TEMPLATE
    prompt = "background " * 30 + "so what is the answer?"
    ids, labels = format_example(tok, prompt, "forty-two", **limit)
    n_prompt = sum(1 for x in labels if x == IGNORE)
    rendered = tok.decode(ids[:n_prompt])
    head = "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\n"
    tail = "<|im_end|>\n<|im_start|>assistant\n"
    assert rendered.startswith(head) and rendered.endswith(tail)
    user_text = rendered[len(head):-len(tail)]
    assert prompt.endswith(user_text) and 0 < len(user_text) < len(prompt)
    assert rendered == format_prompt(tok, user_text)
    assert tok.decode(ids[n_prompt:]) == "forty-two" + tok.eos_token
    assert n_prompt <= limit.get("max_prompt_length", 96)


def test_truncation_refuses_a_template_longer_than_the_prompt_budget():
    tok = tiny_tokenizer()
    tok.chat_template = SYSTEM_TEMPLATE
    with pytest.raises(DataError, match="template alone takes"):
        format_example(tok, "q" * 100, "a", max_length=128, max_prompt_length=30)


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


def test_truncation_keeps_the_earlier_turns_of_a_chat_prompt():
    """A multi-turn prompt cut to its budget loses the start of its last user turn only."""
    from fastunlearn.data_files import ChatPrompt

    tok = tiny_tokenizer()
    prompt = ChatPrompt((("user", "first question"), ("assistant", "first answer"),
                         ("user", "x" * 200 + " the real question?")))
    ids, _ = format_example(tok, prompt, "ok", max_length=120, max_prompt_length=100)
    text = tok.decode(ids)
    assert "first question" in text and "first answer" in text
    assert text.count("<|im_start|>") == 4  # three turns and the assistant header
    assert "the real question?" in text and "x" * 200 not in text


def test_a_huge_row_is_cut_by_characters_before_tokenising(monkeypatch):
    """A 5 MB answer costs what its kept tokens cost: the tokenizer never sees the whole text."""
    tok = tiny_tokenizer()
    seen = []
    real_call = type(tok).__call__

    def counting(self, text, *args, **kwargs):
        seen.append(len(text) if isinstance(text, str) else 0)
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", counting)
    ids, labels = format_example(tok, "q" * 5_000_000, "a" * 5_000_000, max_length=64)
    assert len(ids) == 64 and max(seen) < 100_000
    want, _ = format_example(tok, "q" * 2000, "a" * 2000, max_length=64)
    assert ids == want
