"""Small text metrics written for this package (no extra dependencies).

Tokenisation for all metrics: lower-cased words and single punctuation marks
(``words("Hi, there!") == ["hi", ",", "there", "!"]``).

* ``rouge_l(pred, ref)``: ROUGE-L F1 from the longest common subsequence (0..1; two empty
  texts -> 1.0, exactly one empty -> 0.0).
* ``bleu(pred, ref, max_n=4)``: sentence BLEU with add-one smoothing of the n-gram
  precisions for n > 1 (Lin & Och 2004) and the brevity penalty; identical texts -> 1.0.
* ``distinct_n(texts, n)``: unique n-grams / total n-grams pooled over ``texts``.
* ``degeneration(text)``: None or the reason ("empty", "whitespace", "repetitive") an output
  is degenerate; ``degenerate_rate(texts)`` is the fraction flagged.
"""
from __future__ import annotations

import math
import re
from collections import Counter

_WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word / punctuation tokens of ``text``."""
    return _WORD_RE.findall(text.lower())


def _lcs_len(a: list[str], b: list[str]) -> int:
    # O(len(a) * len(b)) time, O(min) memory: one DP row over the shorter sequence.
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (beta = 1) of ``pred`` against ``ref``."""
    p, r = words(pred), words(ref)
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    lcs = _lcs_len(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def _ngrams(toks: list[str], n: int) -> Counter:
    return Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))


def bleu(pred: str, ref: str, max_n: int = 4) -> float:
    """Smoothed sentence BLEU of ``pred`` against one reference ``ref`` (0..1)."""
    if max_n < 1:
        raise ValueError(f"bleu: max_n must be >= 1, got {max_n}")
    p, r = words(pred), words(ref)
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    log_prec = 0.0
    for n in range(1, max_n + 1):
        pn, rn = _ngrams(p, n), _ngrams(r, n)
        match = sum(min(c, rn[g]) for g, c in pn.items())
        total = max(len(p) - n + 1, 0)
        if n == 1:
            if match == 0:
                return 0.0
            log_prec += math.log(match / total)
        else:  # add-one smoothing keeps short sentences from scoring exactly zero
            log_prec += math.log((match + 1) / (total + 1))
    bp = 1.0 if len(p) > len(r) else math.exp(1 - len(r) / len(p))
    return bp * math.exp(log_prec / max_n)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique n-grams / all n-grams over ``texts`` (0.0 when there is no n-gram at all)."""
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    total, uniq = 0, set()
    for t in texts:
        toks = words(t)
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        uniq.update(grams)
    return len(uniq) / total if total else 0.0


def degeneration(text: str, *, min_tokens: int = 6, max_repeat_frac: float = 0.5) -> str | None:
    """Why ``text`` is a degenerate output, or None.

    * ``"empty"``: no characters; ``"whitespace"``: only whitespace (the collapse mode of
      gradient ascent);
    * ``"repetitive"``: with at least ``min_tokens`` tokens, one token makes up more than
      ``max_repeat_frac`` of them, or more than ``max_repeat_frac`` of the 3-grams are
      repeats of an earlier 3-gram (loops such as "I I I I" or "the cat the cat the cat").
      A long run of one character without spaces ("!!!!!!!!", "aaaaaaaa") also counts.
    """
    if text == "":
        return "empty"
    if not text.strip():
        return "whitespace"
    toks = words(text)
    stripped = re.sub(r"\s+", "", text)
    if len(stripped) >= 8 and Counter(stripped).most_common(1)[0][1] / len(stripped) > 0.8:
        return "repetitive"
    if len(toks) >= min_tokens:
        if Counter(toks).most_common(1)[0][1] / len(toks) > max_repeat_frac:
            return "repetitive"
        tri = [tuple(toks[i:i + 3]) for i in range(len(toks) - 2)]
        if tri and 1 - len(set(tri)) / len(tri) > max_repeat_frac:
            return "repetitive"
    return None


def degenerate_rate(texts: list[str], **kw) -> float:
    """Fraction of ``texts`` flagged by ``degeneration`` (0.0 for an empty list)."""
    if not texts:
        return 0.0
    return sum(degeneration(t, **kw) is not None for t in texts) / len(texts)
