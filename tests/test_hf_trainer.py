"""fastunlearn.integrations.hf: the Trainer trains exactly as fastunlearn's own step loop."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
datasets = pytest.importorskip("datasets")

from fastunlearn.data import DataError, format_example  # noqa: E402
from fastunlearn.integrations.hf import UnlearnCollator, UnlearnTrainer  # noqa: E402
from fastunlearn.losses.types import IGNORE_INDEX  # noqa: E402

from . import hf_trainer_case as case  # noqa: E402
from .tiny_model import tiny_llama, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _per_step(batches, grad_accum: int, processes: list[list[dict]] | None = None):
    """Micro-batches grouped by optimiser step (over all processes when given)."""
    per_rank = processes if processes is not None else [batches]
    return [[b for rank in per_rank for b in rank[s * grad_accum:(s + 1) * grad_accum]]
            for s in range(case.STEPS)]


def _assert_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    moved = 0.0
    for name in got:
        err = float((got[name].float() - want[name].float()).abs().max())
        assert err <= TOL, f"{name}: max |diff| {err:.3g}"
    for name in got:  # the check has teeth: training moved the weights
        moved = max(moved, float((want[name] - case.trainable_state(tiny_llama())
                                  .get(name, want[name])).abs().max()))
    assert moved > 1e-3


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_trainer_equals_own_step_loop(tmp_path, grad_accum):
    trainer, batches = case.train(tmp_path, grad_accum)
    assert trainer.state.global_step == case.STEPS
    policy = case.replay(_per_step(batches, grad_accum))
    _assert_close(case.trainable_state(trainer.policy), case.trainable_state(policy))
    logged = trainer.state.log_history[0]
    assert {"forget_nll", "mismatch_nll", "normal_kl"} <= logged.keys()


def test_trainer_with_separate_reference(tmp_path):
    trainer, batches = case.train(tmp_path, 2, reference=tiny_llama(seed=7))
    policy = case.replay(_per_step(batches, 2), reference=tiny_llama(seed=7))
    _assert_close(case.trainable_state(trainer.policy), case.trainable_state(policy))


def test_trainer_activation_checkpointing_reaches_the_policy(tmp_path):
    trainer, batches = case.train(tmp_path, 2, activation_checkpointing=True)
    assert trainer.policy.is_activation_checkpointing
    policy = case.replay(_per_step(batches, 2))
    _assert_close(case.trainable_state(trainer.policy), case.trainable_state(policy))


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                     init_lora_weights=False)  # nonzero B: the adapters change the output
    return get_peft_model(model, cfg)


def test_trainer_peft_reference_is_adapters_off(tmp_path):
    pytest.importorskip("peft")
    trainer, batches = case.train(tmp_path, 2, model=_lora(tiny_llama()))
    assert trainer.model.mode == "adapters"
    policy = case.replay(_per_step(batches, 2), model=_lora(tiny_llama()), reference="adapters")
    got, want = case.trainable_state(trainer.policy), case.trainable_state(policy)
    assert got and all("lora_" in n for n in got)
    for name in got:
        assert float((got[name] - want[name]).abs().max()) <= TOL, name


def test_trainer_bf16_matches_bf16_step(tmp_path):
    trainer, batches = case.train(tmp_path, 2, bf16=True)
    assert trainer.model.compute_dtype == torch.bfloat16
    policy = case.replay(_per_step(batches, 2), compute_dtype=torch.bfloat16)
    _assert_close(case.trainable_state(trainer.policy), case.trainable_state(policy))


def test_trainer_refuses_fp16_and_bad_eps(tmp_path):
    from transformers import TrainingArguments

    tok = tiny_tokenizer()
    data = case.collator(tok)
    with pytest.raises(ValueError, match="eps must be three coefficients"):
        UnlearnTrainer(model=tiny_llama(), args=TrainingArguments(str(tmp_path), use_cpu=True),
                       train_dataset=data.dataset, data_collator=data, eps=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="reference must be"):
        UnlearnTrainer(model=tiny_llama(), args=TrainingArguments(str(tmp_path), use_cpu=True),
                       train_dataset=data.dataset, data_collator=data, reference="cached")


def test_saved_checkpoint_is_the_policy_with_provenance(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer, _ = case.train(tmp_path / "run", 1)
    trainer.save_model(str(tmp_path / "saved"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    want = trainer.policy.state_dict()
    for name, t in back.state_dict().items():
        assert torch.equal(t, want[name]), name
    info = json.loads((tmp_path / "saved" / "fastunlearn.json").read_text())
    assert info["config"]["loss"] == dict(zip(("eps_forget", "eps_mismatch", "eps_normal"),
                                              case.EPS))
    assert "torch" in info["versions"]
    assert (tmp_path / "saved" / "README.md").read_text().startswith("---\n")


def test_resume_from_checkpoint_continues_the_run(tmp_path):
    """A run resumed from its step-2 checkpoint ends where the uninterrupted run ends (no
    mismatch rows here: their draws count the collator's batches, which a resume skips)."""
    kw = {"mismatch_per_prompt": 0, "save_strategy": "steps", "save_steps": 2}
    full, _ = case.train(tmp_path / "a", 1, **kw)
    assert (tmp_path / "a" / "checkpoint-2" / "fastunlearn.json").is_file()
    resumed, _ = case.train(tmp_path / "b", 1, resume=str(tmp_path / "a" / "checkpoint-2"),
                            **kw)
    assert resumed.state.global_step == case.STEPS
    got, want = case.trainable_state(resumed.policy), case.trainable_state(full.policy)
    for name in want:
        assert float((got[name] - want[name]).abs().max()) <= TOL, name
    fresh = case.trainable_state(tiny_llama())
    assert any(not torch.allclose(got[n], fresh[n]) for n in got)


def test_evaluate_reports_the_unlearning_loss(tmp_path):
    from fastunlearn.integrations.hf_data import StepIndex, dict_batch
    from fastunlearn.unlearn_step import coefficients, prepare

    trainer, _ = case.train(tmp_path, 1)
    recorded = trainer.data_collator.batches
    metrics = trainer.evaluate(eval_dataset=StepIndex(3))  # one batch of 3 indices
    batch = dict_batch(recorded[-1])
    assert batch.kind.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    step = trainer.model.eval()
    inputs = prepare(batch, torch.device("cpu"), trainer.policy)
    with torch.no_grad():
        want = step(inputs, coefficients(case.EPS, inputs.counts)).loss
    assert metrics["eval_loss"] == pytest.approx(float(want), rel=1e-6)


# ---------------------------------------------------------------------------- collator

def test_collator_builds_forget_mismatch_normal_with_answer_only_labels():
    tok = tiny_tokenizer()
    forget, normal = case.records()
    col = UnlearnCollator(tok, forget, normal, max_length=64, mismatch_per_prompt=2)
    assert len(col.dataset) == max(len(forget), len(normal))
    out = col([1, 6])
    assert out["kind"].tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    assert out["row_index"].tolist()[:2] == [1, 6] and out["row_index"].tolist()[6:] == [1, 0]
    ids, labels = format_example(tok, forget[1]["prompt"], forget[1]["answer"], max_length=64)
    n = len(ids)
    assert out["input_ids"][0, :n].tolist() == ids and out["labels"][0, :n].tolist() == labels
    assert (out["labels"][0, n:] == IGNORE_INDEX).all() and not out["attention_mask"][0, n:].any()
    # normal rows: the chat's last assistant turn is the answer, the user turn the prompt
    msgs = normal[0]["messages"]
    text = tok.decode([t for t in out["labels"][7].tolist() if t != IGNORE_INDEX])
    assert text.startswith(msgs[-1]["content"]) and msgs[0]["content"] in tok.decode(
        out["input_ids"][7][out["attention_mask"][7].bool()])
    # mismatch rows: the forget prompt with some normal answer
    prompt = tok.decode(out["input_ids"][2][out["labels"][2] == IGNORE_INDEX])
    answer = tok.decode(out["labels"][2][out["labels"][2] != IGNORE_INDEX])
    assert forget[1]["prompt"][-12:] in prompt  # (cut from the left to fit max_length)
    assert any(answer.startswith(m["messages"][-1]["content"]) for m in normal)


def test_collator_bad_data():
    tok = tiny_tokenizer()
    forget, normal = case.records()
    with pytest.raises(DataError, match="forget set: no rows"):
        UnlearnCollator(tok, [], normal)
    bad = datasets.Dataset.from_list([{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="normal set"):
        UnlearnCollator(tok, forget, bad)


# ------------------------------------------------------------------ accelerate launch

def _launch(tmp_path, grad_accum: int, *extra: str, engine: str = "ddp", gpus: bool = False):
    """Two processes of hf_trainer_case.py: accelerate launch (``extra``: its options), or
    torchrun for DeepSpeed (configured by TrainingArguments)."""
    script = [str(ROOT / "tests" / "hf_trainer_case.py"), str(tmp_path), str(grad_accum), engine]
    if engine == "zero3":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *script]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               *extra, *script]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes (gloo), like the replay
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"batches_{r}.pt") for r in range(2)]
    engines = [json.loads((tmp_path / f"engine_{r}.json").read_text()) for r in range(2)]
    assert all(e["world"] == 2 for e in engines)
    return ranks, torch.load(tmp_path / "weights.pt"), engines[0]


@pytest.mark.slow
def test_accelerate_ddp_two_processes_equal_one(tmp_path):
    ranks, weights, engine = _launch(tmp_path, 2, "--multi_gpu")  # torchrun; gloo, no GPU
    assert engine["wrapper"] == "DistributedDataParallel"
    assert ranks[0][0]["row_index"][0] != ranks[1][0]["row_index"][0]  # each its own rows
    policy = case.replay(_per_step(None, 2, ranks))
    _assert_close({n: weights[n] for n in case.trainable_state(policy)},
                  case.trainable_state(policy))


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="accelerate shards with FSDP on GPUs "
                    "only (on the CPU its state is MULTI_CPU, plain DDP)")
def test_accelerate_fsdp2_two_processes_equal_one(tmp_path):
    ranks, weights, engine = _launch(tmp_path, 2, "--use_fsdp", "--fsdp_version", "2",
                             "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
                             "--fsdp_reshard_after_forward", "true",
                             "--fsdp_state_dict_type", "FULL_STATE_DICT", engine="fsdp",
                                     gpus=True)
    assert engine["fsdp_units"] == 3  # two decoder layers and the step (the root)
    policy = case.replay(_per_step(None, 2, ranks))
    _assert_close({n: weights[n] for n in case.trainable_state(policy)},
                  case.trainable_state(policy))


@pytest.mark.slow
def test_deepspeed_zero3_two_processes_equal_one(tmp_path):
    """ZeRO-3 partitions every weight (the head too: empty outside a forward), and the step's
    forward still trains on the whole head. On the CPU accelerate counts one data process
    (both processes train on the same batches), on GPUs two: the replay takes either."""
    pytest.importorskip("deepspeed")
    ranks, weights, engine = _launch(tmp_path, 2, engine="zero3")
    assert engine["wrapper"] == "DeepSpeedEngine"
    assert engine["head_elements_outside_forward"] == 0  # partitioned
    if engine["data_processes"] == 1:
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(*ranks))
        policy = case.replay(_per_step(ranks[0], 2))
    else:
        policy = case.replay(_per_step(None, 2, ranks))
    _assert_close({n: weights[n] for n in case.trainable_state(policy)},
                  case.trainable_state(policy))
