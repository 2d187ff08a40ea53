"""The trainer and ``fastunlearn run`` on several processes; checkpoints and resume through the
real CLI; the launch errors.

Several processes: 2 gloo ranks forked after the imports (tests/dist_harness.py), or ``torchrun``
itself (fresh interpreters: about 40 s).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastunlearn import checkpoint as ckpt
from fastunlearn.cli import main
from tests.dist_harness import run_killed, run_ranks
from tests.test_cli import base_args, tiny_dir  # noqa: F401 - the fixture
from tests.test_trainer import make_trainer, tiny_cfg

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------ the trainer on two ranks
def _train(opts: dict):
    """Three steps of the Trainer (setup steps included); the gathered weights and losses."""
    cfg = tiny_cfg(steps=3, batch_size=2, **opts.get("train", {}))
    for k, v in opts.get("model", {}).items():
        setattr(cfg.model, k, v)
    trainer = make_trainer(cfg)
    trainer.setup()
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    return ckpt.full_state_dict(trainer.policy), losses, trainer.distributed


TRAINER_CASES = {
    "copy": {},
    "cached": {"model": {"reference": "cached"}},
    "bf16-reference": {"model": {"reference_dtype": "bfloat16"}},
    "lora": {"model": {"lora": True, "lora_r": 4}, "train": {"lr": 1e-2}},
    "accum2-packed": {"train": {"grad_accum": 2, "packing": True}},
}


@pytest.mark.parametrize("name", list(TRAINER_CASES))
def test_trainer_on_two_ranks_equals_one_process(name, one_thread):
    """Meta build, rank-0 load, sharding, rank shares, all-reduced normalisers: the same
    weights and losses as one process."""
    opts = TRAINER_CASES[name]
    one, losses1, sharded1 = _train(opts)
    (two, losses2, sharded2), _ = run_ranks(_train, opts)
    assert (sharded1, sharded2) == (False, True)
    assert losses1[-1] != pytest.approx(losses1[0], abs=1e-3)  # the weights moved
    worst = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    assert worst <= 1e-5, worst
    assert losses1 == pytest.approx(losses2, abs=1e-5)


def test_named_reference_on_two_ranks_equals_one_process(tmp_path, one_thread):
    """Another model as reference: rank 0 loads it too, and fills the sharded copy."""
    from tests.tiny_model import tiny_llama, tiny_tokenizer

    tiny_llama(128, seed=1).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    opts = {"model": {"reference_name": str(tmp_path)}}
    one, losses1, _ = _train(opts)
    (two, losses2, _), _ = run_ranks(_train, opts)
    assert losses1[0] != pytest.approx(_train({})[1][0], abs=1e-3)  # the KL sees the other model
    worst = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    assert worst <= 1e-5, worst
    assert losses1 == pytest.approx(losses2, abs=1e-5)


def _nan_on_rank_1():
    """A NaN in rank 1's shard only: every rank stops, naming the parameter."""
    import torch.distributed as torch_dist

    trainer = make_trainer(tiny_cfg(batch_size=2))
    trainer.setup()
    if torch_dist.get_rank() == 1:
        with torch.no_grad():
            trainer.policy.model.layers[1].mlp.up_proj.weight.to_local()[0, 0] = float("nan")
    try:
        trainer.check_parameters_finite("after step 1")
    except FloatingPointError as exc:
        return str(exc)
    return None


def test_a_non_finite_shard_stops_every_rank():
    got = run_ranks(_nan_on_rank_1)
    assert all(m and "model.layers.1.mlp.up_proj.weight is not finite" in m for m in got), got


def _save_lora(out: Path):
    cfg = tiny_cfg(steps=2, batch_size=2, lr=1e-2)
    cfg.model.lora, cfg.model.lora_r, cfg.save_model = True, 4, True
    trainer = make_trainer(cfg)
    trainer.setup()
    for _ in range(2):
        trainer.train_step()
    trainer.save(out)


def test_lora_on_two_ranks_saves_the_merged_model(tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    _save_lora(tmp_path / "one")
    run_ranks(_save_lora, tmp_path / "two")
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model").state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model").state_dict()
    assert not any("lora" in k for k in two)
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst <= 1e-5, worst


# ------------------------------------------------------------ checkpoints and resume
def _args(d, out, *extra):
    return base_args(d, out) + ["train.steps=6", "eval.enabled=false", *extra]


def _run_until(args: list[str], step: int, sig: int) -> None:
    """``fastunlearn run`` that sends itself ``sig`` after training step ``step``."""
    from fastunlearn.trainer import Trainer

    real = Trainer.train_step

    def train_step(self):
        row = real(self)
        if self.step == step:
            os.kill(os.getpid(), sig)
        return row
    Trainer.train_step = train_step
    main(args)


def _weights(out: Path) -> dict:
    return load_file(out / "model" / "model.safetensors")


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_kill_equals_a_straight_run(tiny_dir, tmp_path, one_thread):  # noqa: F811
    assert main(_args(tiny_dir, tmp_path / "straight")) == 0
    out = tmp_path / "run"
    killed = _args(tiny_dir, out, "train.save_every=3")
    assert run_killed(_run_until, killed, 4, signal.SIGKILL) == -signal.SIGKILL
    root = tmp_path / "run.checkpoints"  # next to the output, outside its working folder
    assert ckpt.latest(root).name == "step-00000003"
    assert not out.exists()
    assert main(killed + ["--resume", str(root)]) == 0
    straight, resumed = _weights(tmp_path / "straight"), _weights(out)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert _losses(out) == _losses(tmp_path / "straight")  # steps 1-3 kept, 4-6 recomputed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-00000003")


def test_resumed_evaluation_keeps_the_original_reference(tiny_dir, tmp_path,  # noqa: F811
                                                          one_thread):
    """Cached reference of the policy itself: a resumed run's normal KL is still measured
    against the model before step 1 (not against the checkpoint's weights)."""
    def args(out, *extra):
        return base_args(tiny_dir, out) + ["train.steps=4", "model.reference=cached",
                                           "eval.enabled=true", *extra]
    assert main(args(tmp_path / "straight")) == 0
    out = tmp_path / "run"
    killed = args(out, "train.save_every=2")
    assert run_killed(_run_until, killed, 3, signal.SIGKILL) == -signal.SIGKILL
    assert main(killed + ["--resume", str(tmp_path / "run.checkpoints")]) == 0
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())["after"]
    resumed = json.loads((out / "summary.json").read_text())["after"]
    assert straight["normal_kl"] > 1e-4
    assert resumed["normal_kl"] == pytest.approx(straight["normal_kl"], rel=1e-4)


def test_sigterm_writes_a_final_checkpoint(tiny_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = _args(tiny_dir, out, "train.save_every=100")
    run_killed(_run_until, args, 2, signal.SIGTERM)
    assert ckpt.latest(tmp_path / "run.checkpoints").name == "step-00000002"
    assert not out.exists()


def test_checkpoint_resumes_on_two_ranks(tiny_dir, tmp_path, one_thread):  # noqa: F811
    """A checkpoint written by one process, resumed by the trainer on two."""
    def resumed(root):
        cfg = tiny_cfg(steps=4, batch_size=2)
        trainer = make_trainer(cfg)
        trainer.setup()
        trainer.load_checkpoint(root)
        while trainer.step < 4:
            trainer.train_step()
        return ckpt.full_state_dict(trainer.policy)

    cfg = tiny_cfg(steps=4, batch_size=2, save_every=2, checkpoint_dir=str(tmp_path / "ck"))
    trainer = make_trainer(cfg)
    trainer.setup()
    while trainer.step < 4:
        trainer.train_step()
        if trainer.step == 2:
            trainer.save_checkpoint()
    straight = trainer.policy.state_dict()
    got = run_ranks(resumed, tmp_path / "ck")[0]
    worst = max(float((straight[k] - got[k]).abs().max()) for k in straight)
    assert worst <= 1e-5, worst


# ------------------------------------------------------------------------ bad input
def _one_line_error(args, capsys, message):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_more_processes_than_rows_per_kind(tiny_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WORLD_SIZE", "4")  # refused before waiting for the other processes
    _one_line_error(_args(tiny_dir, tmp_path / "run", "train.batch_size=2"), capsys,
                    "train.batch_size=2 rows per kind cannot be split over 4 processes")


def test_accelerate_plugin_settings(tiny_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    _one_line_error(_args(tiny_dir, tmp_path / "run"), capsys, "accelerate plugin settings")


def test_resume_from_another_config(tiny_dir, tmp_path, capsys):  # noqa: F811
    assert main(_args(tiny_dir, tmp_path / "a", "train.save_every=6")) == 0
    capsys.readouterr()
    _one_line_error(_args(tiny_dir, tmp_path / "b", "train.lr=5e-4", "--resume",
                          str(tmp_path / "a.checkpoints")), capsys,
                    "was written by another config or model")
    _one_line_error(_args(tiny_dir, tmp_path / "b", "--resume", str(tmp_path)), capsys,
                    "no finished checkpoint")


# ------------------------------------------------------------------------- torchrun
def test_torchrun_two_processes_end_to_end(tiny_dir, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    args = base_args(tiny_dir, out) + ["train.batch_size=2", "eval.generate=true",
                                       "eval.judge=none", "eval.max_new_tokens=4",
                                       "eval.n_harmful=2", "eval.n_normal=2", "eval.n_xstest=0",
                                       "eval.samples=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "fastunlearn", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("fastunlearn: 3 steps") == 1  # rank 0 reports
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    assert summary["evaluation"]["generation"].startswith("rank 0")
    assert summary["after"]["forget_nll"] > summary["before"]["forget_nll"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    original = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), original.parameters()))
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
