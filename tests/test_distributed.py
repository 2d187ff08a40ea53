"""Sharded unlearning (FSDP2 over gloo, 2 forked ranks) against one process, and checkpoints.

Every case runs the same loop (``train``) on one process and on two: UnlearnStep, the ranks'
shares of the same global batch, all-reduced normalisers, summed gradients, clipping and AdamW.
After 3 steps the two runs hold the same weights within 1e-5.
"""
from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fastunlearn import checkpoint as ckpt
from fastunlearn import distributed as fdist
from fastunlearn.batching import UnlearnBatcher
from fastunlearn.models import frozen_copy
from fastunlearn.unlearn_step import (
    UnlearnStep,
    accumulate,
    clip_grad_norm,
    prepare,
    shard,
)
from tests.dist_harness import run_killed, run_ranks
from tests.tiny_model import tiny_llama

EPS = (0.5, 1.0, 1.0)
TOL = 1e-5


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    kind: int


def make_rows(n: int = 6, seed: int = 0, method: str = "paper") -> list[list[Row]]:
    """Rows of each kind with random lengths; the prompt part of each row is ignored. idk_dpo
    also gets a preferred row per forget row (its prompt, another answer)."""
    from fastunlearn.data import KIND_PREFERRED, PreferredRows

    rng = random.Random(seed)
    kinds = []
    for kind in range(3):
        rows = []
        for _ in range(n):
            length, prompt = rng.randint(5, 12), rng.randint(1, 3)
            ids = [rng.randint(6, 127) for _ in range(length)]
            rows.append(Row(ids, [-100] * prompt + ids[prompt:], kind))
        kinds.append(rows)
    if method == "idk_dpo":
        preferred = PreferredRows()
        for r in kinds[0]:
            prompt = r.labels.count(-100)
            ids = r.input_ids[:prompt] + [rng.randint(6, 127) for _ in range(rng.randint(2, 6))]
            preferred.append(Row(ids, [-100] * prompt + ids[prompt:], KIND_PREFERRED))
        kinds.append(preferred)
    return kinds


def build(opts: dict) -> UnlearnStep:
    from fastunlearn.method_terms import MethodSettings

    policy = tiny_llama(tie=opts.get("tie", True), seed=0)
    ref = opts.get("ref", "copy")
    method = MethodSettings(opts.get("method", "paper"), beta=0.5)
    if "method" in opts and ref == "copy":
        return UnlearnStep(policy, frozen_copy(policy), backend=opts.get("backend", "reference"),
                           method=method)
    if ref == "adapters":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False))
        return UnlearnStep(policy, mode="adapters", backend=opts.get("backend", "reference"))
    if ref == "cached":
        from fastunlearn.method_terms import reference_kinds
        from fastunlearn.reference_cache import load_or_build_cache
        from fastunlearn.step import ReferenceRunner

        rows = make_rows(method=method.name)
        cache = load_or_build_cache(ReferenceRunner(policy, frozen_copy(policy)), rows[2], None,
                                    device="cpu", compute_dtype=torch.float32, pad_id=1,
                                    logprob_rows={k: rows[k] for k in
                                                  reference_kinds(method.name) if k != 2})
        head = cache.head("cpu")
        step = UnlearnStep(policy, mode="cached", ref_head=head.weight, ref_bias=head.bias,
                           backend=opts.get("backend", "reference"), method=method)
        step.cache = cache
        return step
    ref_dtype = opts.get("ref_dtype")  # a reference copy in another dtype than the policy
    return UnlearnStep(policy, frozen_copy(policy, ref_dtype),
                       backend=opts.get("backend", "reference"))


class Run:
    """Model, optimiser, scheduler and this rank's data stream of one test run."""

    def __init__(self, opts: dict):
        self.opts = opts
        self.step_module = build(opts)
        if fdist.world_size() > 1:
            shard(self.step_module)
        self.step_module.train()
        params = [p for p in self.step_module.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, eps=1e-6)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: 1.0 / (1 + s))
        from fastunlearn.method_terms import reference_kinds

        self.method = opts.get("method", "paper")
        batcher = UnlearnBatcher(make_rows(method=self.method), opts.get("batch_size", 4),
                                 pad_id=1, seed=0, bucket=False, pack=opts.get("pack", False),
                                 separate=frozenset(reference_kinds(self.method)) | {2})
        self.data = fdist.RankBatcher(batcher)
        self.step = 0

    def train_step(self) -> dict:
        cache = getattr(self.step_module, "cache", None)
        micro = [prepare(self.data.next(), torch.device("cpu"), self.step_module.policy, cache,
                         self.method) for _ in range(self.opts.get("grad_accum", 1))]
        metrics = accumulate(self.step_module, micro, EPS)
        params = [p for p in self.step_module.policy.parameters() if p.requires_grad]
        metrics["grad_norm"] = clip_grad_norm(params, self.opts.get("max_grad_norm", 0.5))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return metrics

    def checkpoint_state(self) -> ckpt.TrainState:
        return ckpt.TrainState(self.step_module.policy, self.optimizer, self.scheduler,
                               self.data, self.step)

    def full_weights(self) -> dict | None:
        return ckpt.full_state_dict(self.step_module.policy)


def train(opts: dict) -> tuple[dict | None, list[dict]]:
    run = Run(opts)
    if opts.get("resume"):
        run.step = ckpt.load(opts["resume"], run.checkpoint_state(),
                             fingerprint=opts.get("fp", "x"))
    rows = []
    while run.step < opts.get("steps", 3):
        rows.append(run.train_step())
        every = opts.get("save_every")
        if every and run.step % every == 0:
            ckpt.save(opts["ckpt_dir"], run.checkpoint_state(), fingerprint=opts.get("fp", "x"),
                      keep=opts.get("keep", 1))
        if opts.get("kill_at") == run.step:
            os.kill(os.getpid(), signal.SIGKILL)
    return run.full_weights(), rows


def assert_close_weights(a: dict, b: dict, tol: float = TOL) -> None:
    assert a.keys() == b.keys()
    worst, name = max((float((a[k].float() - b[k].float()).abs().max()), k) for k in a)
    assert worst <= tol, f"largest weight difference {worst:.3g} > {tol} ({name})"


def assert_moved(before_opts: dict, after: dict) -> None:
    """The comparison means something only if the weights actually changed."""
    start = build(before_opts).policy.state_dict()
    moved = max(float((start[k].float() - after[k].float()).abs().max()) for k in after)
    assert moved > 1e-3


CASES = {
    "reference-tied-copy": {"backend": "reference"},
    "chunked-untied-copy": {"backend": "chunked", "tie": False},
    "reference-tied-adapters": {"backend": "reference", "ref": "adapters"},
    "reference-untied-cached": {"backend": "reference", "tie": False, "ref": "cached"},
    "chunked-tied-accum2": {"backend": "chunked", "grad_accum": 2, "batch_size": 2},
    "reference-untied-packed": {"backend": "reference", "tie": False, "pack": True},
    "chunked-untied-bf16-reference": {"backend": "chunked", "tie": False,
                                      "ref_dtype": torch.bfloat16},
    # per-sequence forget terms: normalised by the forget sequences of all ranks
    "chunked-tied-npo-accum2": {"backend": "chunked", "method": "npo", "grad_accum": 2,
                                "batch_size": 2},
    "reference-untied-idk_dpo-packed": {"backend": "reference", "tie": False,
                                        "method": "idk_dpo", "pack": True},
    "chunked-tied-graddiff": {"backend": "chunked", "method": "graddiff"},
    "chunked-untied-npo-cached": {"backend": "chunked", "tie": False, "method": "npo",
                                  "ref": "cached", "pack": True},
}


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process(name):
    opts = CASES[name]
    one, rows1 = train(opts)
    (two, rows2), _ = run_ranks(train, opts)
    assert_moved(opts, one)
    assert_close_weights(one, two)
    for r1, r2 in zip(rows1, rows2):
        assert r1["counts"] == r2["counts"]
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-5)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5)


def test_cpp_backend_two_ranks_equal_one_process():
    from fastunlearn.losses import resolve_backend
    from fastunlearn.losses.registry import BackendUnavailableError

    try:
        resolve_backend("cpp", "cpu")
    except BackendUnavailableError as exc:
        pytest.skip(f"cpp backend unavailable: {exc}")
    opts = {"backend": "cpp", "tie": False}
    one, _ = train(opts)
    (two, _), _ = run_ranks(train, opts)
    assert_close_weights(one, two)


# ---------------------------------------------------------------------------- resume
def test_resume_after_kill_is_bitwise_identical(tmp_path, one_thread):
    straight, rows_straight = train({"steps": 6})
    opts = {"steps": 6, "save_every": 3, "ckpt_dir": tmp_path, "kill_at": 4}
    assert run_killed(train, opts) == -signal.SIGKILL
    assert ckpt.latest(tmp_path).name == "step-00000003"
    resumed, rows_resumed = train({"steps": 6, "resume": tmp_path})
    assert len(rows_resumed) == 3
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert [r["loss"] for r in rows_straight[3:]] == [r["loss"] for r in rows_resumed]


def test_resume_two_ranks_after_kill(tmp_path):
    (straight, _), _ = run_ranks(train, {"steps": 6})
    with pytest.raises(RuntimeError, match="died"):
        run_ranks(train, {"steps": 6, "save_every": 3, "ckpt_dir": tmp_path, "kill_at": 3})
    (resumed, _), _ = run_ranks(train, {"steps": 6, "resume": tmp_path})
    assert_close_weights(straight, resumed, tol=1e-6)


def test_two_rank_checkpoint_resumes_in_one_process(tmp_path):
    run_ranks(train, {"steps": 3, "save_every": 3, "ckpt_dir": tmp_path})
    meta = (ckpt.latest(tmp_path) / "meta.json").read_text()
    assert '"world_size": 2' in meta
    straight, _ = train({"steps": 6})
    resumed, rows = train({"steps": 6, "resume": tmp_path})
    assert len(rows) == 3
    assert_close_weights(straight, resumed)


def _crash_before_commit(opts):
    """Save at step 3, then die inside the step-6 save after its files are written."""
    def die(folder):
        if folder.name.startswith(".tmp-step-00000006"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(folder)
    real = ckpt._fsync_tree
    ckpt._fsync_tree = die
    train(opts)


def test_checkpoint_cut_mid_write_is_never_loaded(tmp_path, one_thread):
    opts = {"steps": 6, "save_every": 3, "ckpt_dir": tmp_path}
    assert run_killed(_crash_before_commit, opts) == -signal.SIGKILL
    assert (tmp_path / ".tmp-step-00000006").is_dir()
    assert ckpt.latest(tmp_path).name == "step-00000003"
    straight, _ = train({"steps": 6})
    resumed, rows = train({"steps": 6, "resume": tmp_path})
    assert len(rows) == 3
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_damaged_checkpoint_is_refused(tmp_path):
    train({"steps": 2, "save_every": 1, "ckpt_dir": tmp_path, "keep": 2})
    newest = ckpt.step_dir(tmp_path, 2)
    assert newest.is_dir()
    data = max((p for p in newest.iterdir() if p.suffix == ".distcp"),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:-10])  # cut
    assert ckpt.latest(tmp_path) == ckpt.step_dir(tmp_path, 1)
    with pytest.raises(ckpt.CheckpointError, match="incomplete or damaged"):
        ckpt.resolve(newest)
    (ckpt.step_dir(tmp_path, 1) / ckpt.MANIFEST).unlink()  # never finished
    assert ckpt.latest(tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match="no finished checkpoint"):
        ckpt.resolve(tmp_path)


def test_resume_from_another_config_is_refused(tmp_path):
    train({"steps": 1, "save_every": 1, "ckpt_dir": tmp_path, "fp": "aaaa"})
    with pytest.raises(ckpt.CheckpointError, match="another config or model"):
        train({"steps": 2, "resume": tmp_path, "fp": "bbbb"})


def test_config_fingerprint_ignores_resumable_keys():
    base = {"train": {"steps": 10, "lr": 1e-5, "save_every": 5}, "out": "a"}
    same = {"train": {"steps": 20, "lr": 1e-5, "save_every": 2}, "out": "b"}
    other = {"train": {"steps": 10, "lr": 2e-5, "save_every": 5}, "out": "a"}
    fp = ckpt.config_fingerprint(base, "m")
    assert fp == ckpt.config_fingerprint(same, "m")
    assert fp != ckpt.config_fingerprint(other, "m")
    assert fp != ckpt.config_fingerprint(base, "another-model")


# ------------------------------------------------------------------- final HF model
def _save_sharded(tie, out):
    """The same sharded model saved both ways: gathered on rank 0, and consolidated."""
    from torch.distributed.tensor import DTensor

    step = UnlearnStep(tiny_llama(tie=tie, seed=0), frozen_copy(tiny_llama(tie=tie, seed=0)))
    shard(step)
    ckpt.save_hf(step.policy, None, out / "gathered")
    ckpt.save_hf(step.policy, None, out / "consolidated", gather_limit_bytes=0)
    # Why the head is read only inside UnlearnStep.forward: outside it is this rank's rows.
    head = step.policy.lm_head.weight
    return isinstance(head, DTensor), tuple(head.to_local().shape)


@pytest.mark.parametrize("tie", [True, False])
def test_sharded_model_saves_a_loadable_hf_directory(tmp_path, tie, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(ckpt, "FILE_BYTES", 20_000)  # forked ranks inherit it: several files
    shapes = run_ranks(_save_sharded, tie, tmp_path)
    assert shapes == [(True, (64, 32)), (True, (64, 32))]
    assert not (tmp_path / "consolidated" / "sharded").exists()
    assert len(list((tmp_path / "consolidated").glob("*.safetensors"))) > 1
    want = tiny_llama(tie=tie, seed=0).state_dict()
    for way in ("gathered", "consolidated"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / way)
        got = loaded.state_dict()
        for k in want:
            assert torch.equal(want[k], got[k]), (way, k)
        assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie


# ----------------------------------------------------------- data shares and launch
def test_rank_shares_cover_the_global_batch_exactly():
    rows = make_rows(n=7)
    whole = UnlearnBatcher(rows, 5, pad_id=1, seed=3, bucket=True)
    parts = [fdist.RankBatcher(UnlearnBatcher(rows, 5, pad_id=1, seed=3, bucket=True), r, 3)
             for r in range(3)]
    for _ in range(4):
        batch = whole.next()
        shares = [p.next() for p in parts]
        for kind in range(3):
            want = batch.row_index[batch.kind == kind].tolist()
            got = [i for s in shares for i in s.row_index[s.kind == kind].tolist()]
            assert got == want  # every row once, in order: none duplicated, none dropped
    assert [fdist.share(10, r, 4) for r in range(4)] == \
        [slice(0, 3), slice(3, 6), slice(6, 8), slice(8, 10)]


class DrawnRows:
    """Rows made afresh per batch (like data.MismatchDraws): two rows per pick."""

    def __init__(self, n: int):
        self.lengths = [5 + i % 4 for i in range(n)]

    def rows(self, picked, rng):
        out = []
        for i in picked:
            for _ in range(2):
                ids = [rng.randint(6, 127) for _ in range(self.lengths[i])]
                out.append(Row(ids, [-100] + ids[1:], 1))
        return out


def test_rank_shares_of_drawn_rows_cover_the_global_batch():
    rows = make_rows(n=7)
    rows[1] = DrawnRows(7)
    whole = UnlearnBatcher(rows, 5, pad_id=1, seed=3)
    parts = [fdist.RankBatcher(UnlearnBatcher(rows, 5, pad_id=1, seed=3), r, 2) for r in (0, 1)]
    for _ in range(3):
        batch = whole.next()
        shares = [p.next() for p in parts]
        want = batch.input_ids[batch.kind == 1]
        got = [s.input_ids[s.kind == 1] for s in shares]
        t = want.shape[1]
        got = torch.cat([torch.nn.functional.pad(g, (0, t - g.shape[1]), value=1) for g in got])
        assert torch.equal(got, want)


def test_rank_batcher_state_round_trip():
    rows = make_rows()
    a = fdist.RankBatcher(UnlearnBatcher(rows, 2, pad_id=1, seed=0))
    for _ in range(5):
        a.next()
    state = a.state_dict()
    b = fdist.RankBatcher(UnlearnBatcher(rows, 2, pad_id=1, seed=0))
    b.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(a.next().input_ids, b.next().input_ids)


def test_more_ranks_than_rows_per_kind_is_refused():
    with pytest.raises(fdist.DistributedError, match="cannot be split over 4 processes"):
        fdist.RankBatcher(UnlearnBatcher(make_rows(), 2, pad_id=1, seed=0), 0, 4)


@pytest.mark.parametrize("env", [{"ACCELERATE_USE_FSDP": "true"},
                                 {"ACCELERATE_USE_DEEPSPEED": "1"},
                                 {"FSDP_SHARDING_STRATEGY": "FULL_SHARD"}])
def test_accelerate_plugin_settings_are_refused(env):
    with pytest.raises(fdist.DistributedError, match="accelerate plugin settings") as info:
        fdist.check_launcher_env(env)
    assert "\n" not in str(info.value)
    fdist.check_launcher_env({"ACCELERATE_MIXED_PRECISION": "bf16", "WORLD_SIZE": "2"})


def test_single_process_needs_no_process_group():
    assert fdist.init_from_env("cpu").type == "cpu"
    assert not fdist.is_distributed()
    assert fdist.global_kind_counts([3, 4, 5]) == [3, 4, 5]


# ------------------------------------------------------------------------- bf16 weights
def _bf16_gradients(mixed: bool) -> dict:
    """Gradients of one step with bf16 compute: bf16 weights, or fp32 weights under FSDP's
    bf16 MixedPrecisionPolicy (autocast with one process)."""
    from torch.distributed.tensor import DTensor

    from fastunlearn.unlearn_step import bf16_policy

    policy = tiny_llama(tie=False, seed=0)
    if not mixed:
        policy = policy.to(torch.bfloat16)
    step = UnlearnStep(policy, frozen_copy(policy), backend="reference",
                       compute_dtype=torch.bfloat16)
    if fdist.world_size() > 1:
        shard(step, mp_policy=bf16_policy() if mixed else None)
    data = fdist.RankBatcher(UnlearnBatcher(make_rows(), 4, pad_id=1, seed=0, bucket=False))
    accumulate(step, [prepare(data.next(), torch.device("cpu"), step.policy)], EPS)
    grads = {}
    for name, p in step.policy.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name] = g.float()
    return grads


@pytest.mark.parametrize("mixed", [False, True], ids=["bf16-weights", "fp32-master-bf16-mp"])
def test_bf16_gradients_two_ranks_match_one_process(mixed):
    one = _bf16_gradients(mixed)
    two = run_ranks(_bf16_gradients, mixed)[0]
    for k in one:
        scale = float(one[k].abs().max())
        assert scale > 0, k
        assert float((one[k] - two[k]).abs().max()) <= 2e-2 * scale, k


# ------------------------------------------------------------ loading without N copies
def _loss_from_meta(tie: bool) -> tuple[float, dict | None]:
    """Every rank builds on the meta device; only rank 0 holds the real weights."""
    from fastunlearn.unlearn_step import materialize_from_rank0

    with torch.device("meta"):
        policy = tiny_llama(tie=tie, seed=0)
    step = UnlearnStep(policy, frozen_copy(policy), backend="reference")
    shard(step)
    source = tiny_llama(tie=tie, seed=0) if fdist.is_main() else None
    materialize_from_rank0(step, source, torch.device("cpu"))
    data = fdist.RankBatcher(UnlearnBatcher(make_rows(), 4, pad_id=1, seed=0, bucket=False))
    metrics = accumulate(step, [prepare(data.next(), torch.device("cpu"), step.policy)], EPS)
    return metrics["loss"], ckpt.full_state_dict(step.reference)


@pytest.mark.parametrize("tie", [True, False])
def test_meta_build_loads_from_rank0(tie):
    step = UnlearnStep(tiny_llama(tie=tie, seed=0), frozen_copy(tiny_llama(tie=tie, seed=0)),
                       backend="reference")
    data = fdist.RankBatcher(UnlearnBatcher(make_rows(), 4, pad_id=1, seed=0, bucket=False))
    want = accumulate(step, [prepare(data.next(), torch.device("cpu"), step.policy)], EPS)
    (loss, ref_weights), _ = run_ranks(_loss_from_meta, tie)
    assert loss == pytest.approx(want["loss"], abs=1e-5)
    assert_close_weights(tiny_llama(tie=tie, seed=0).state_dict(), ref_weights, tol=0.0)


@pytest.mark.slow
def test_torchrun_launch_two_processes():
    """The real launcher: torchrun starts 2 fresh interpreters (about 30 s of imports each)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "benchmarks/bench_distributed.py", "--worlds", "2",
                          "--steps", "1"], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert all(r["world"] == 2 for r in rows)


# ------------------------------------------------------ stochastic-rounding AdamW, sharded
def _sr_adamw_steps(dtype, impl: str | None) -> dict | None:
    """Two optimiser steps on fixed random gradients: StochasticRoundingAdamW (``impl``) or
    torch's AdamW (None)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from fastunlearn.optim import StochasticRoundingAdamW

    step = UnlearnStep(tiny_llama(seed=0).to(dtype), mode="none")
    if fdist.world_size() > 1:
        shard(step)
    torch.manual_seed(5)
    for p in step.policy.parameters():
        g = (torch.randn(p.shape) * 1e-3).to(dtype)
        p.grad = distribute_tensor(g, p.device_mesh, p.placements) \
            if isinstance(p, DTensor) else g
    params = list(step.policy.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3) if impl is None else \
        StochasticRoundingAdamW(params, lr=1e-3, impl=impl)
    for _ in range(2):
        opt.step()
    return ckpt.full_state_dict(step.policy)


def test_stochastic_rounding_adamw_updates_sharded_parameters():
    want = _sr_adamw_steps(torch.float32, None)
    fp32 = run_ranks(_sr_adamw_steps, torch.float32, "torch")[0]
    assert_close_weights(want, fp32, tol=1e-6)  # fp32 parameters: exactly AdamW
    start = tiny_llama(seed=0).to(torch.bfloat16).state_dict()
    for impl in ("cpp", "torch"):
        bf16 = run_ranks(_sr_adamw_steps, torch.bfloat16, impl)[0]
        assert max(float((bf16[k].float() - start[k].float()).abs().max()) for k in start) > 0
        assert_close_weights(want, bf16, tol=2e-2)


# ------------------------------------------------------------------ cached reference
def _sharded_cache():
    from fastunlearn.unlearn_step import build_cache_sharded

    policy = tiny_llama(tie=False, seed=0)
    step = UnlearnStep(policy, mode="cached", ref_head=torch.zeros(1, 1), backend="reference")
    shard(step)
    rows = make_rows(n=5)
    cache = build_cache_sharded(step, rows[2], device=torch.device("cpu"),
                                compute_dtype=torch.float32, pad_id=1, batch_rows=2,
                                logprob_rows={0: rows[0]})
    return cache.hidden, cache.offsets, cache.head_weight, cache.logprobs[0]


def test_cache_built_by_two_ranks_equals_one_process():
    from fastunlearn.reference_cache import load_or_build_cache
    from fastunlearn.step import ReferenceRunner

    policy = tiny_llama(tie=False, seed=0)
    rows = make_rows(n=5)
    want = load_or_build_cache(ReferenceRunner(policy, frozen_copy(policy)), rows[2], None,
                               device="cpu", compute_dtype=torch.float32, pad_id=1,
                               logprob_rows={0: rows[0]})
    for hidden, offsets, head, (logp, logp_offsets) in run_ranks(_sharded_cache):
        assert torch.equal(offsets, want.offsets)
        assert torch.allclose(hidden, want.hidden, atol=1e-5, rtol=0)
        assert torch.equal(head, want.head_weight)
        assert torch.equal(logp_offsets, want.logprobs[0][1])
        assert torch.allclose(logp, want.logprobs[0][0], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ likelihood metrics
def _likelihood(train_steps: int) -> dict:
    from fastunlearn.unlearn_step import likelihood_metrics

    run = Run({"backend": "reference", "tie": False})
    for _ in range(train_steps):  # KL is 0 before the policy moves
        run.train_step()
    data = fdist.RankBatcher(UnlearnBatcher(make_rows(), 6, pad_id=1, seed=9, bucket=False))
    micro = [prepare(data.next(), torch.device("cpu"), run.step_module.policy)]
    return likelihood_metrics(run.step_module, micro)


def test_likelihood_metrics_two_ranks_equal_one_process():
    one = _likelihood(2)
    two = run_ranks(_likelihood, 2)
    assert one["normal_kl"] > 1e-6
    for got in two:
        assert got["counts"] == one["counts"]
        for k in ("forget_nll", "mismatch_nll", "normal_kl"):
            assert got[k] == pytest.approx(one[k], rel=1e-4, abs=1e-7), k


@pytest.mark.parametrize("limit", [ckpt.GATHER_LIMIT_BYTES, 0], ids=["gathered", "consolidated"])
def test_one_process_saves_the_same_way(tmp_path, limit):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(tie=True, seed=0)
    ckpt.save_hf(model, None, tmp_path, gather_limit_bytes=limit)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


# ------------------------------------------------------------------- gradient accumulation
def _reduce_scatters(grad_accum: int) -> int:
    """Gradient reduce-scatters issued in one optimiser step of ``grad_accum`` micro-batches."""
    import torch.distributed as dist

    calls = []
    real = dist.reduce_scatter_single if hasattr(dist, "reduce_scatter_single") \
        else dist.reduce_scatter_tensor
    name = real.__name__

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    setattr(dist, name, counted)
    Run({"grad_accum": grad_accum, "batch_size": 2}).train_step()
    return len(calls)


def test_accumulation_reduces_gradients_once_per_step():
    one = run_ranks(_reduce_scatters, 1)[0]
    two = run_ranks(_reduce_scatters, 2)[0]
    assert one > 0
    assert two == one


# ------------------------------------------------------- one process: the trainer's step
def perturbed(step: UnlearnStep) -> UnlearnStep:
    """The policy moved away from its reference (same noise every call): a non-zero KL."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in step.policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return step


@pytest.mark.parametrize("ref", ["copy", "adapters", "cached"])
def test_mean_reduction_equals_sum_with_coefficients(ref):
    """``step.micro_batch_loss`` (reduction mean, the one-call form used by evaluation and
    tests) and training (sum with eps / token counts) give the same loss and gradients."""
    from fastunlearn.step import LossWeights, ReferenceRunner, kind_counts, micro_batch_loss
    from fastunlearn.unlearn_step import coefficients

    opts = {"ref": ref, "tie": False}
    batch = UnlearnBatcher(make_rows(), 4, pad_id=1, seed=0).next()
    step = perturbed(build(opts))
    out = step(prepare(batch, torch.device("cpu"), step.policy, getattr(step, "cache", None)),
               coefficients(EPS, kind_counts(batch)))
    out.loss.backward()
    mine = {n: p.grad for n, p in step.policy.named_parameters() if p.requires_grad}

    base = perturbed(build(opts))
    runner = ReferenceRunner(base.policy, base.reference, cache=getattr(base, "cache", None))
    want = micro_batch_loss(base.policy, runner, batch, LossWeights(*EPS),
                            device=torch.device("cpu"), compute_dtype=torch.float32,
                            backend="reference")
    want.loss.backward()
    assert float(out.normal_kl.detach()) > 1e-4  # the KL path is exercised
    assert float(out.loss) == pytest.approx(float(want.loss), abs=1e-6)
    for n, p in base.policy.named_parameters():
        if p.requires_grad:
            assert torch.allclose(mine[n], p.grad, atol=1e-6, rtol=1e-5), n


def test_copy_reference_with_another_head_form_is_refused():
    """The fused loss computes both heads one way: a reference that scales its logits
    differently from the policy would get a wrong KL."""
    from tests.tiny_model import tiny_granite

    step = UnlearnStep(tiny_granite(seed=0, logits_scaling=8.0),
                       frozen_copy(tiny_granite(seed=0, logits_scaling=4.0)), backend="reference")
    batch = UnlearnBatcher(make_rows(), 2, pad_id=1, seed=0).next()
    with pytest.raises(ValueError, match="logit scale / soft-cap differ"):
        step(prepare(batch, torch.device("cpu"), step.policy), coefficients_of(batch))


def coefficients_of(batch):
    from fastunlearn.step import kind_counts
    from fastunlearn.unlearn_step import coefficients

    return coefficients(EPS, kind_counts(batch))
