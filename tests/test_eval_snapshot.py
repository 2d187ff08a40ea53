"""normal_kl without a reference model: measured against a snapshot of the first state."""
import copy

import torch

from fastunlearn.data import Pair, RecipeData
from fastunlearn.eval import EvalConfig, Evaluator
from fastunlearn.eval.likelihood import answer_kl, answer_kl_to_snapshot, reference_snapshot
from tests.tiny_model import tiny_llama, tiny_tokenizer


def _pairs(n, offset=0):
    return [Pair(f"q{i}?" + " x" * (i % 3), f"answer {i}" + "!" * i) for i in
            range(offset, offset + n)]


def test_snapshot_kl_equals_live_reference_kl():
    tok = tiny_tokenizer()
    model = tiny_llama(128, seed=3)
    original = copy.deepcopy(model)
    pairs = _pairs(5, 10)
    snap = reference_snapshot(model, tok, pairs, batch_size=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    s_live, n_live = answer_kl(model, original, tok, pairs, batch_size=2)
    s_snap, n_snap = answer_kl_to_snapshot(model, tok, pairs, snap, batch_size=2)
    assert n_live == n_snap and s_live > 0
    assert abs(s_live - s_snap) <= 1e-4 * s_live


def test_evaluator_without_reference_tracks_drift():
    tok = tiny_tokenizer()
    model = tiny_llama(128, seed=4)
    data = RecipeData("harmful", _pairs(2), _pairs(2, 10), _pairs(3, 20), _pairs(3, 30),
                      extra={})
    ev = Evaluator(tok, data, EvalConfig(generate=False, judge="none"), progress=False)
    first = ev.run(model, 0)
    assert abs(first["normal_kl"]) < 1e-5
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert ev.run(model, 1)["normal_kl"] > 0


def test_model_is_reference_generates_normal_answers_once():
    tok = tiny_tokenizer()
    model = tiny_llama(128, seed=6)
    data = RecipeData("harmful", _pairs(2), _pairs(2, 10), _pairs(3, 20), _pairs(3, 30),
                      extra={})
    cfg = EvalConfig(judge="none", max_new_tokens=3, n_harmful=2, n_normal=2, n_xstest=0)
    calls = []
    ev = Evaluator(tok, data, cfg, reference_model=copy.deepcopy(model), progress=False)
    gen = ev._gen
    ev._gen = lambda m, prompts, desc: calls.append(desc) or gen(m, prompts, desc)
    first = ev.run(model, 0, model_is_reference=True)
    assert "original answers" not in calls
    assert first["normal_rouge_l"] == 1.0
