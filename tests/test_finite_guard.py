"""The trainer's finite guards: parameters (at an interval and before saving), every loss term,
the divergence bounds."""
import pytest
import torch

from fastunlearn.cli import main
from fastunlearn.trainer import Trainer
from tests.test_bad_input import base_args, write_jsonl
from tests.tiny_model import tiny_llama, tiny_tokenizer


def bare_trainer(model):
    t = Trainer.__new__(Trainer)  # only what check_parameters_finite reads
    t.policy, t.step = model, 7
    return t


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_parameter_is_named(bad):
    model = tiny_llama(128)
    t = bare_trainer(model)
    t.check_parameters_finite("after step 7")  # a healthy model passes
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = bad
    with pytest.raises(FloatingPointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is "
                                                 r"not finite after step 7"):
        t.check_parameters_finite("after step 7")


def test_frozen_parameters_are_not_the_guards_business():
    model = tiny_llama(128)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.model.norm.weight.requires_grad_(False)
    bare_trainer(model).check_parameters_finite("before saving")


def test_interval_and_before_saving(tmp_path, monkeypatch):
    """check_finite_every=2 over 3 steps: checked after step 2 and before saving."""
    calls = []
    real = Trainer.check_parameters_finite

    def record(self, when):
        calls.append(when)
        return real(self, when)

    monkeypatch.setattr(Trainer, "check_parameters_finite", record)
    tiny_llama(128, seed=0).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "forget.jsonl", [{"prompt": f"p{i}", "answer": f"a{i}"}
                                            for i in range(8)])
    write_jsonl(tmp_path / "normal.jsonl", [{"q": f"q{i}", "a": f"b{i}"} for i in range(8)])
    args = base_args(tmp_path, tmp_path / "run") + ["train.check_finite_every=2",
                                                    "eval.enabled=false"]
    assert main(args) == 0
    assert calls == ["after step 2", "before saving"]
