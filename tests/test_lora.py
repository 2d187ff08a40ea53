"""LoRA (peft) policy: the reference is the same model with adapters disabled, or a named one."""
import contextlib
import copy

import pytest
import torch

from fastunlearn.config import ConfigError
from fastunlearn.models import head_of, save_model, trunk_of
from fastunlearn.reference_cache import build_reference_cache
from fastunlearn.step import ReferenceRunner
from fastunlearn.trainer import Trainer
from tests.test_trainer import make_trainer, tiny_cfg, tiny_recipe
from tests.tiny_model import tiny_llama, tiny_opt, tiny_tokenizer

pytest.importorskip("peft")

IDS = torch.tensor([[6, 40, 41, 42, 70, 71, 9, 10, 11, 12], [6, 50, 51, 52, 53, 80, 81, 82, 1, 1]])
MASK = torch.tensor([[1] * 10, [1] * 8 + [0] * 2])


def lora_trainer(steps=4, **model):
    cfg = tiny_cfg(steps=steps, lr=1e-2)
    cfg.model.lora = True
    cfg.model.lora_r = 4
    cfg.model.lora_alpha = 8
    for k, v in model.items():
        setattr(cfg.model, k, v)
    trainer = make_trainer(cfg)
    original = copy.deepcopy(trainer._model)  # setup injects adapters into the model in place
    trainer.setup()
    return trainer, original


def logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, **kw).logits


def test_adapters_disabled_equal_the_original_model():
    trainer, original = lora_trainer()
    policy = trainer.policy
    assert trunk_of(policy) is policy.get_base_model().model
    assert head_of(policy).weight is original.lm_head.weight or \
        torch.equal(head_of(policy).weight, original.lm_head.weight)
    expect = logits(original)
    for _ in range(4):
        with policy.disable_adapter():
            torch.testing.assert_close(logits(policy), expect, rtol=0, atol=0)
        # the runner the loss uses: adapters off, trunk hidden states == the original's
        hidden = trainer.ref_runner.hidden({"input_ids": IDS, "attention_mask": MASK},
                                             contextlib.nullcontext)
        ref_hidden = original.model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        torch.testing.assert_close(hidden, ref_hidden, rtol=0, atol=0)
        trainer.train_step()
    # and the adapters do change the policy (so the comparisons above can fail)
    assert (logits(policy) - expect).abs().max() > 1e-3
    assert trainer.metrics_rows[-1]["normal_kl"] > 0


def test_only_adapter_parameters_change():
    trainer, _ = lora_trainer()
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainable = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for _ in range(4):
        trainer.train_step()
    after = trainer.policy.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert changed, "nothing was trained"
    assert all("lora_" in k for k in changed), sorted(k for k in changed if "lora_" not in k)
    assert any("lora_B" in k for k in changed)  # B starts at zero: it must have moved
    # the optimizer holds only adapter parameters
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    named = dict(trainer.policy.named_parameters())
    assert opt_params == {id(named[n]) for n in trainable}


def test_save_merged_and_separate_load(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, _ = lora_trainer()
    for _ in range(4):
        trainer.train_step()
    trainer.policy.eval()
    expect = logits(trainer.policy)

    save_model(trainer.policy, trainer.tokenizer, tmp_path / "merged", merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora_" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged), expect, rtol=1e-4, atol=1e-5)
    # saving merged leaves the live policy with its adapters (training can go on)
    assert any("lora_" in n for n, _ in trainer.policy.named_parameters())

    save_model(trainer.policy, trainer.tokenizer, tmp_path / "adapter", merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    base = tiny_llama(128, seed=0)  # make_trainer's base model
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(loaded), expect, rtol=1e-5, atol=1e-6)
    with loaded.disable_adapter():
        assert (logits(loaded) - expect).abs().max() > 1e-3


def test_lora_gradient_checkpointing_same_step():
    """Checkpointing recomputes activations: the same losses, adapters still get gradients."""
    rows = {}
    for ckpt in (False, True):
        trainer, _ = lora_trainer(gradient_checkpointing=ckpt)
        layer = trainer.policy.get_base_model().model.layers[0]
        assert getattr(layer, "gradient_checkpointing", False) == ckpt
        rows[ckpt] = [trainer.train_step() for _ in range(3)]
    for a, b in zip(rows[False], rows[True]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    assert rows[True][-1]["loss"] != rows[True][0]["loss"]  # the adapters were updated


def test_lora_cached_reference_matches_adapters(tmp_path):
    runs = {}
    for mode in ("adapters", "cached"):
        trainer, _ = lora_trainer(reference=mode, reference_cache_dir=str(tmp_path))
        if mode == "cached":
            assert trainer.ref_runner.cache is not None
        runs[mode] = [trainer.train_step() for _ in range(3)]
    assert runs["adapters"][-1]["normal_kl"] > 0
    for a, b in zip(runs["adapters"], runs["cached"]):
        for k in ("loss", "normal_kl"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (k, a[k], b[k])


def test_named_reference_is_used_with_lora(tmp_path):
    """model.reference_name with LoRA loads that model as the reference (the adapters-off
    policy was used instead: the KL at step 1 was 0)."""
    other = tiny_llama(128, seed=7)
    save_model(other, tiny_tokenizer(), tmp_path / "ref")
    for mode in ("auto", "cached"):
        trainer, original = lora_trainer(reference_name=str(tmp_path / "ref"), reference=mode,
                                         reference_cache_dir=str(tmp_path / "cache"))
        if mode == "auto":
            assert not trainer.ref_runner.adapters_off
            assert torch.equal(head_of(trainer.reference).weight, other.lm_head.weight)
        else:
            assert trainer.ref_runner.cache is not None
        first = trainer.train_step()
        assert first["normal_kl"] > 1e-3, (mode, first)  # the named model differs from the policy


def test_named_reference_with_adapters_mode_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="reference=adapters"):
        lora_trainer(reference_name=str(tmp_path), reference="adapters")


def test_reference_passes_run_in_eval_mode():
    """OPT has dropout 0.1: the adapters-off reference of a training policy must not apply it
    (two reference passes over the same rows differed), and the cached build neither."""
    cfg = tiny_cfg(steps=2, lr=1e-2)
    cfg.model.lora, cfg.model.lora_r, cfg.model.lora_alpha = True, 4, 8
    trainer = Trainer(cfg, model=tiny_opt(seed=4, dropout=0.1), tokenizer=tiny_tokenizer(),
                      recipe=tiny_recipe(), progress=False)
    trainer.setup()
    assert trainer.policy.training and trainer.ref_runner.adapters_off
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    first = trainer.ref_runner.hidden(inputs, contextlib.nullcontext)
    torch.testing.assert_close(trainer.ref_runner.hidden(inputs, contextlib.nullcontext), first,
                               rtol=0, atol=0)
    assert trainer.policy.training  # mode restored for training
    with torch.no_grad():  # and train mode does apply dropout, so the check above can fail
        a = trunk_of(trainer.policy)(**inputs).last_hidden_state
        b = trunk_of(trainer.policy)(**inputs).last_hidden_state
    assert (a - b).abs().max() > 1e-3
    rows = trainer.rows_by_kind[2][:4]
    caches = [build_reference_cache(ReferenceRunner(trainer.policy, None), rows, device="cpu",
                                    compute_dtype=torch.float32, pad_id=1) for _ in range(2)]
    torch.testing.assert_close(caches[0].hidden, caches[1].hidden, rtol=0, atol=0)
