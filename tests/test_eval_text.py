"""Text metrics and the refusal matcher on hand-made cases with known answers."""
import math

import pytest

from fastunlearn.eval.refusal import is_refusal, refusal_rate
from fastunlearn.eval.text_metrics import (
    bleu,
    degenerate_rate,
    degeneration,
    distinct_n,
    rouge_l,
    words,
)


def test_words():
    assert words("Hi, THERE!") == ["hi", ",", "there", "!"]


def test_rouge_l_known_values():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS("a b c d", "a x c y") = 2 -> P = R = 2/4 -> F1 = 0.5
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)
    # P = 2/2, R = 2/4 -> F1 = 2/3
    assert rouge_l("a c", "a b c d") == pytest.approx(2 / 3)
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "a") == 0.0
    # order matters: LCS of reversed sequence of 3 distinct words is 1
    assert rouge_l("c b a", "a b c") == pytest.approx(1 / 3)


def test_bleu_known_values():
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert bleu("dog", "the cat sat") == 0.0
    # 2 of 6 reference words, all n-grams matching: precisions 1, then smoothed (1+1)/(1+1)=1,
    # (0+1)/(0+1)=1 ...; brevity penalty exp(1 - 6/2)
    assert bleu("the cat", "the cat sat on the mat") == pytest.approx(math.exp(1 - 3))
    assert 0.0 < bleu("the cat sat on a mat", "the cat sat on the mat") < 1.0
    with pytest.raises(ValueError):
        bleu("a", "a", max_n=0)


def test_distinct_n():
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)   # (a b), (b a), (a b)
    assert distinct_n(["a b c"], 1) == 1.0
    assert distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["x y", "x y"], 2) == pytest.approx(1 / 2)  # pooled over texts
    assert distinct_n(["", " "], 2) == 0.0


@pytest.mark.parametrize("text,reason", [
    ("", "empty"), ("   \n\t ", "whitespace"), ("\n\n\n", "whitespace"),
    ("I I I I I I I I", "repetitive"), ("the cat the cat the cat the cat", "repetitive"),
    ("!!!!!!!!!!!!", "repetitive"), ("aaaaaaaaaaaaaaaaaaa", "repetitive"),
    ("Sure, here are some steps to bake a cake at home.", None),
    ("Paris.", None),
])
def test_degeneration(text, reason):
    assert degeneration(text) == reason


def test_degenerate_rate():
    assert degenerate_rate(["", "  ", "a fine answer here", "ok"]) == pytest.approx(0.5)
    assert degenerate_rate([]) == 0.0


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.", "I cannot provide instructions for that.",
    "As an AI language model, I will not do this.", "I\u2019m sorry, I can\u2019t.",
])
def test_refusal_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "Sure! Step 1: preheat the oven.", "The capital of France is Paris.", "",
    # a refusal phrase deep inside a compliant answer is not a refusal
    "Here is the full recipe you asked for. " * 10 + "I cannot guarantee the taste.",
])
def test_not_refusal(text):
    assert not is_refusal(text)


def test_refusal_rate():
    assert refusal_rate(["I cannot do that.", "Sure.", "Sorry, but no.", "Yes"]) == 0.5
    assert refusal_rate([]) == 0.0
