"""Evaluation against a named reference that training only keeps as a cache."""
import pytest
import torch

from fastunlearn.config import RunConfig
from fastunlearn.data import Pair, RecipeData
from fastunlearn.eval.likelihood import answer_kl
from fastunlearn.generation import generate_answers
from fastunlearn.trainer import Trainer
from tests.tiny_model import tiny_llama, tiny_tokenizer

FORGET = [Pair(f"how to do bad thing {i}?", f"step one: bad {i}.") for i in range(8)]
NORMAL = [Pair(f"what is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(8)]


@pytest.fixture
def named_reference(tmp_path):
    folder = tmp_path / "reference"
    tiny_llama(128, seed=7).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_cached_named_reference_is_what_evaluation_compares_with(named_reference):
    cfg = RunConfig()
    cfg.model.reference, cfg.model.reference_name = "cached", str(named_reference)
    cfg.data.max_length, cfg.data.max_prompt_length = 48, 24
    cfg.train.device, cfg.train.steps = "cpu", 1
    cfg.eval.judge, cfg.eval.max_new_tokens = "none", 4
    cfg.eval.n_harmful, cfg.eval.n_normal, cfg.eval.n_xstest = 0, 2, 0
    recipe = RecipeData("tiny", FORGET[:6], NORMAL[:6], FORGET[6:], NORMAL[6:], extra={})
    trainer = Trainer(cfg, model=tiny_llama(128, seed=0), tokenizer=tiny_tokenizer(),
                      recipe=recipe, progress=False)
    trainer.setup()
    assert trainer.reference is None and trainer.evaluator.ref is None  # freed after setup
    metrics = trainer.evaluate()  # step 0: the policy is NOT the named reference

    ref = tiny_llama(128, seed=7)
    s, n = answer_kl(trainer.policy, ref, trainer.tokenizer, NORMAL[6:], max_length=48)
    assert s / n > 1e-3
    assert metrics["normal_kl"] == pytest.approx(s / n, rel=1e-4)
    prompts = [p.prompt for p in NORMAL[6:]]
    with torch.no_grad():
        originals = generate_answers(ref, trainer.tokenizer, prompts, max_new_tokens=4,
                                     progress=False)
    assert trainer.evaluator.original_normal_answers(trainer.policy) == originals
