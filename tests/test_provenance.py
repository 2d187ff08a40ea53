"""Saved models record what produced them: versions, model card, save dtype."""
from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import fastunlearn
from fastunlearn.config import ConfigError, RunConfig, set_value, validate
from fastunlearn.models import ModelError, save_model
from fastunlearn.provenance import model_card, provenance, versions

from .tiny_model import tiny_llama, tiny_tokenizer


def test_versions_name_the_installed_packages():
    v = versions()
    assert v["fastunlearn"] == fastunlearn.__version__
    assert v["torch"] == importlib.metadata.version("torch")
    assert v["transformers"] == importlib.metadata.version("transformers")
    for name in ("triton", "peft"):
        try:
            assert v[name] == importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            assert name not in v


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_save_model_writes_card_and_versions(tmp_path):
    cfg = RunConfig().to_dict()
    before = {"forget_nll": 1.25, "normal_kl": 0.0, "samples": ["not a number"]}
    after = {"forget_nll": 7.5, "normal_kl": 0.125}
    save_model(tiny_llama(), tiny_tokenizer(), tmp_path / "m", config=cfg, before=before,
               after=after)
    card = (tmp_path / "m" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "arXiv:2310.10683" in card
    assert "| forget_nll | 1.25 | 7.5 |" in card and "| normal_kl | 0 | 0.125 |" in card
    assert "samples" not in card.split("## Versions")[0]  # only scalar metrics in the table
    for name, version in versions().items():
        assert f"| {name} | {version} |" in card
    assert f"`eps_forget={cfg['loss']['eps_forget']}`" in card
    assert "transformers >= 5" in card
    info = json.loads((tmp_path / "m" / "fastunlearn.json").read_text())
    assert info["versions"] == versions()
    assert info["config"] == json.loads(json.dumps(cfg))
    assert info["before"]["forget_nll"] == 1.25 and info["after"]["normal_kl"] == 0.125
    assert info["save_dtype"] == "float32"


def test_card_without_metrics_or_config():
    card = model_card(provenance())
    assert "## Metrics" not in card and "## Training config" not in card
    assert "## Versions" in card


@pytest.mark.parametrize("tie", [True, False])
def test_save_dtype_bfloat16_casts_the_files_not_the_model(tmp_path, tie):
    model = tiny_llama(tie=tie)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    save_model(model, tiny_tokenizer(), tmp_path, save_dtype="bfloat16")
    saved = _weights(tmp_path)
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    assert ("lm_head.weight" in saved) == (not tie)  # a tied head is still written once
    for k, v in saved.items():
        assert torch.equal(v, original[k].to(torch.bfloat16)), k
    for k, v in model.state_dict().items():  # the caller's model keeps its fp32 weights
        assert v.dtype == torch.float32 and torch.equal(v, original[k])
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert back.dtype == torch.bfloat16


def test_save_dtype_auto_follows_training_precision(tmp_path):
    model = tiny_llama()
    save_model(model, tiny_tokenizer(), tmp_path / "fp32")
    assert all(t.dtype == torch.float32 for t in _weights(tmp_path / "fp32").values())
    save_model(model, tiny_tokenizer(), tmp_path / "bf16", training_dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in _weights(tmp_path / "bf16").values())
    save_model(model, tiny_tokenizer(), tmp_path / "forced", save_dtype="float32",
               training_dtype=torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in _weights(tmp_path / "forced").values())
    info = json.loads((tmp_path / "bf16" / "fastunlearn.json").read_text())
    assert info["save_dtype"] == "bfloat16"


def test_save_dtype_float32_widens_bf16_weights(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    save_model(model, tiny_tokenizer(), tmp_path, save_dtype="float32")
    assert all(t.dtype == torch.float32 for t in _weights(tmp_path).values())
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"


def test_bad_save_dtype(tmp_path):
    with pytest.raises(ModelError, match="save dtype must be auto"):
        save_model(tiny_llama(), tiny_tokenizer(), tmp_path, save_dtype="float16")
    cfg = RunConfig()
    set_value(cfg, "model.save_dtype", "fp16")
    with pytest.raises(ConfigError, match="model.save_dtype must be auto, float32 or bfloat16"):
        validate(cfg)


@pytest.mark.parametrize("merge", [True, False])
def test_save_dtype_with_lora(tmp_path, merge):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    save_model(model, tiny_tokenizer(), tmp_path, merge_lora=merge, save_dtype="bfloat16")
    name = "model.safetensors" if merge else "adapter_model.safetensors"
    saved = load_file(str(tmp_path / name))
    assert saved and all(t.dtype == torch.bfloat16 for t in saved.values())
    assert any("lora_" in k for k in saved) != merge
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert json.loads((tmp_path / "fastunlearn.json").read_text())["save_dtype"] == "bfloat16"
