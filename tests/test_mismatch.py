"""Mismatch rows follow the paper: forget prompts with normal answers drawn afresh per batch."""
import random
from collections import defaultdict

import pytest

from fastunlearn.batching import UnlearnBatcher
from fastunlearn.data import DataError, MismatchDraws, Pair
from fastunlearn.inputs import tokenize_all
from fastunlearn.losses import KIND_MISMATCH
from tests.test_trainer import tiny_cfg, tiny_recipe
from tests.tiny_model import tiny_tokenizer


def _mismatch_rows(seed, steps=30, k=1, batch_size=3):
    """(prompt ids, answer ids) of the mismatch rows of ``steps`` batches."""
    tok = tiny_tokenizer()
    cfg = tiny_cfg()
    cfg.data.mismatch_answers = k
    rows = tokenize_all(tok, tiny_recipe(), cfg.data)
    batcher = UnlearnBatcher(rows, batch_size, tok.pad_token_id, seed)
    out = []
    for _ in range(steps):
        b = batcher.next()
        step = []
        for r in (b.kind == KIND_MISMATCH).nonzero().squeeze(1).tolist():
            n = int(b.attention_mask[r].sum())
            ids, labels = b.input_ids[r, :n].tolist(), b.labels[r, :n].tolist()
            cut = next(t for t, x in enumerate(labels) if x != -100)
            step.append((tuple(ids[:cut]), tuple(ids[cut:])))
        out.append(step)
    return out


def test_mismatch_answers_are_drawn_afresh_every_step():
    """Each forget prompt meets several normal answers over a run (it was paired once, at load
    time, with one fixed answer)."""
    steps = _mismatch_rows(seed=0)
    answers = defaultdict(set)
    for step in steps:
        for prompt, answer in step:
            answers[prompt].add(answer)
    assert max(len(a) for a in answers.values()) >= 3
    assert len(answers) == len(tiny_recipe().forget)  # every forget prompt is used
    normal_answers = {p.answer for p in tiny_recipe().normal}
    tok = tiny_tokenizer()
    for a in set().union(*answers.values()):  # the answers are normal answers, with EOS
        assert tok.decode(list(a)).removesuffix(tok.eos_token) in normal_answers


def test_mismatch_draws_are_reproducible_for_a_seed():
    assert _mismatch_rows(seed=4, steps=10) == _mismatch_rows(seed=4, steps=10)
    assert _mismatch_rows(seed=4, steps=10) != _mismatch_rows(seed=5, steps=10)


def test_k_answers_per_prompt():
    steps = _mismatch_rows(seed=0, steps=5, k=3, batch_size=2)
    for step in steps:
        assert len(step) == 6  # 2 prompts x 3 answers
        assert len({p for p, _ in step}) <= 2


def test_mismatch_draws_keep_complete_marks_and_check_inputs():
    tok = tiny_tokenizer()
    forget = [Pair(f"harm {i}", f"bad {i}") for i in range(5)]
    cut = MismatchDraws(tok, forget, [Pair("q", "window", complete=False)], max_length=64)
    rows = cut.rows([0, 1], random.Random(0))
    assert all(r.labels[-1] != tok.eos_token_id for r in rows)  # no EOS after a cut-off answer
    assert len(cut) == 5 and len(cut.lengths) == 5
    with pytest.raises(DataError, match="normal set is empty"):
        MismatchDraws(tok, forget, [], max_length=64)
    with pytest.raises(DataError, match=">= 1"):
        MismatchDraws(tok, forget, forget, k=0, max_length=64)
