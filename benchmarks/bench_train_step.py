"""End-to-end unlearning step: the paper's way against ours (ms / step, tokens / s, peak memory).

    python benchmarks/bench_train_step.py                 # GPU default (or CPU variant on CPU)
    python benchmarks/bench_train_step.py --quick         # tiny model, seconds (CI)
    python benchmarks/bench_train_step.py --lora-8b       # Llama-3-8B-sized LoRA run (GPU)
    python benchmarks/bench_train_step.py --device cpu --threads 2
    python benchmarks/bench_train_step.py --device cpu --threads 2 --interleave --rounds 2 \
        --impls ours+cached,ours+simnpo+cached   # paired timing on a shared machine

One step = B rows of each kind (forget, mismatch, normal) of length T, random tokens (throughput
does not depend on the weights or the text), the first T/4 tokens of every row are prompt
(label -100), then AdamW.

impl ``paper``: three separate HF forwards with ``labels=`` (forget NLL * -eps_forget, mismatch
NLL), a forward of the normal rows through the policy and through a full reference copy with the
logits materialised, a full-vocabulary fp32 KL masked to valid tokens (the true KL, unlike the
paper's code), one backward, AdamW (fused on CUDA, PyTorch's default foreach on CPU).

impl ``ours...``: the ``Trainer``, set up by its own setup steps on the benchmark's model and
rows, one ``train_step`` per step (draw the batch, one policy trunk pass over [forget; mismatch;
normal] through ``UnlearnStep``, reference on the normal rows only, ignored rows dropped,
fused loss backend picked by ``auto``, gradient clipping, fused AdamW on CUDA and CPU). Options
appended to the name: ``+lora`` (peft adapters, reference = adapters disabled), ``+cached`` (cached
reference, no reference model in memory), ``+bf16ref`` (reference copy in bf16), ``+ckpt``
(activation checkpointing), ``+bf16w`` (bf16 weights instead of fp32 master weights),
``+sr`` (with ``+bf16w``: StochasticRoundingAdamW with bf16 moments instead of torch's
AdamW, 8 bytes per trainable parameter, see fastunlearn/optim.py), ``+torchlin`` (CPU: keep
torch's own GEMMs in the nn.Linear layers instead of the oneDNN ones that
``train.cpu_linear=auto`` picks, see fastunlearn/cpu_linear.py), ``+lean`` (RMSNorm /
SwiGLU that save less for backward, ``model.lean_layers``, see fastunlearn/lean_layers.py);
``+freemem`` (CPU: glibc returns freed large blocks to the kernel, ``train.keep_freed_memory=
false``; by default the trainer keeps them, see fastunlearn/cpu_memory.py; ``paper+keepmem``
keeps them for the paper's step too); ``@name`` forces a loss backend (e.g. ``ours@chunked``);
``+graddiff``, ``+npo``, ``+simnpo``, ``+idk_dpo`` or ``+rmu`` trains with that ``loss.method``
instead of the paper's (idk_dpo's preferred rows: each forget prompt with a mismatch row's
answer; rmu: no mismatch rows).

Repetition: ``--rounds N`` runs the whole list N times, round after round. ``--interleave``
builds every impl of a shape in one process and takes their steps in turn (A B C A B C ...):
each row then also has ``paired_ratio``, the median over turns of its step time over the first
impl's in the same turn, which a shared machine's slow load drifts do not move. Interleaved rows
have no peak memory, and process-wide settings (threads, the allocator's) apply to every impl.

Precision: on CUDA weights fp32 (master) with bf16 autocast, for both impls (``+bf16w``: bf16
weights); on CPU fp32 throughout (``+bf16w``: bf16 weights and bf16 autocast). Timing:
warm-up steps, then timed steps, median (CUDA synchronised). Peak memory:
``torch.cuda.max_memory_allocated`` on CUDA (weights, gradients, optimizer state and
activations; stats reset after setup); on CPU the peak RSS (VmHWM, reset after setup) minus the
RSS before the model was built, measured in one subprocess per config.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402

# The repository (for the commit id); overridable when running a snapshot copy of this file.
ROOT = Path(os.environ.get("FASTUNLEARN_BENCH_ROOT") or Path(__file__).resolve().parents[1])
IGNORE = -100

# Architectures (random weights). rope theta: SmolLM2 1e5, Llama-3 5e5.
MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 tie_word_embeddings=True, rope_theta=10000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       tie_word_embeddings=False, rope_theta=500000.0),
}

# (model, B, T, impls) per preset. The GPU default fits about 1-2 minutes on an H100 / H200.
GPU_DEFAULT = [
    ("smollm2-135m", 8, 1024, ["paper", "ours", "ours+lora", "ours+cached", "ours+cached+ckpt",
                               "ours+lean", "ours+cached+lean", "ours+bf16w+sr+cached+lean"]),
    ("llama-3.2-1b", 8, 1024, ["paper", "ours", "ours+lean", "ours+ckpt", "ours+cached+ckpt",
                               "ours+bf16w+sr+cached+lean"]),
    ("llama-3.2-1b", 2, 512, ["paper", "ours", "ours+lora", "ours+cached", "ours+bf16ref",
                              "ours+bf16w+sr", "ours+bf16w+sr+cached+lean"]),
]
CPU_DEFAULT = [("smollm2-135m", 2, 128, ["paper", "ours", "ours+torchlin", "ours@chunked",
                                         "ours+lean", "ours+cached", "ours+lora",
                                         "ours+lora+cached", "ours+bf16w", "ours+bf16w+sr",
                                         "ours+bf16w+sr+lean", "ours+bf16w+sr+cached+lean"])]
QUICK = [("tiny", 2, 32, ["paper", "ours", "ours+cached", "ours+lora", "ours+torchlin",
                          "ours+lean", "ours+bf16w+sr"])]
LORA_8B = [("llama-3-8b", 2, 512, ["ours+bf16w+lora+ckpt", "ours+bf16w+lora+cached+ckpt"]),
           ("llama-3-8b", 8, 1024, ["ours+bf16w+lora+ckpt"])]
OPTIONS = ("lora", "cached", "bf16ref", "ckpt", "bf16w", "sr", "torchlin", "lean", "keepmem",
           "freemem")
# ``loss.method`` other than the paper's (``ours+npo``); rmu runs without mismatch rows
METHODS = ("graddiff", "npo", "simnpo", "idk_dpo", "rmu")


# ----------------------------------------------------------------------------- helpers
def parse_impl(impl: str) -> dict:
    """'ours+lora+ckpt@chunked' -> {'name': 'ours', 'lora': True, 'ckpt': True, ...,
    'backend': 'chunked'} (``@backend`` forces a loss backend; default: the run's --backend)."""
    impl, _, backend = impl.partition("@")
    name, *opts = impl.split("+")
    if name not in ("paper", "ours"):
        raise ValueError(f"impl must start with 'paper' or 'ours', got {impl!r}")
    methods = [o for o in opts if o in METHODS]
    opts = [o for o in opts if o not in METHODS]
    bad = [o for o in opts if o not in OPTIONS]
    if bad:
        raise ValueError(f"unknown impl option {bad[0]!r} (known: "
                         f"{', '.join(OPTIONS + METHODS)})")
    if len(methods) > 1 or (methods and name == "paper"):
        raise ValueError("one method option at most, and only on ours")
    if name == "paper" and set(opts) - {"bf16w", "keepmem"}:
        raise ValueError("paper takes only the +bf16w and +keepmem options")
    if name == "ours" and "keepmem" in opts:
        raise ValueError("ours keeps freed memory by default (+freemem turns that off)")
    if name == "paper" and backend:
        raise ValueError("paper runs HF's own loss: no @backend")
    if "sr" in opts and "bf16w" not in opts:
        raise ValueError("+sr (stochastic-rounding AdamW) needs +bf16w")
    return {"name": name, "backend": backend or None, "method": methods[0] if methods else
            "paper", **{o: o in opts for o in OPTIONS}}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_model(name: str, device: torch.device, dtype: torch.dtype, attn: str):
    """A random-weight LlamaForCausalLM built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**MODELS[name], max_position_embeddings=4096, rms_norm_eps=1e-5,
                      attn_implementation=attn, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.use_cache = False
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of an 8B model
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.train()


def make_batch(b: int, t: int, vocab: int, seed: int = 0):
    """[forget; mismatch; normal] rows of random tokens, first T/4 of each row prompt."""
    from fastunlearn.batching import Batch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3 * b, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 4] = IGNORE
    mask = torch.ones_like(ids)
    kind = torch.arange(3).repeat_interleave(b)
    row_index = torch.arange(b).repeat(3)
    return Batch(ids, mask, labels, kind, row_index, 3 * b * t, 3 * b * t)


def _touch_torch(dev: torch.device) -> None:
    w = torch.nn.Parameter(torch.randn(8, 8, device=dev))
    torch.optim.AdamW([w]).zero_grad()
    (w @ w).sum().backward()


class _Row:
    def __init__(self, input_ids, labels, kind):
        self.input_ids, self.labels, self.kind = input_ids, labels, kind


# -------------------------------------------------------------------------------- steps
def paper_step(policy, ref, batch, opt, eps, autocast):
    """The paper's structure: three forwards with labels= / logits, full fp32 KL, AdamW."""
    b = batch.input_ids.shape[0] // 3
    dev = next(policy.parameters()).device
    ids, mask, labels = (x.to(dev) for x in (batch.input_ids, batch.attention_mask, batch.labels))
    f, m, n = slice(0, b), slice(b, 2 * b), slice(2 * b, 3 * b)
    with autocast():
        forget_nll = policy(input_ids=ids[f], attention_mask=mask[f], labels=labels[f]).loss
        mismatch_nll = policy(input_ids=ids[m], attention_mask=mask[m], labels=labels[m]).loss
        logits = policy(input_ids=ids[n], attention_mask=mask[n]).logits
        with torch.no_grad():
            ref_logits = ref(input_ids=ids[n], attention_mask=mask[n]).logits
    # Full-vocabulary fp32 KL(p_ref || p_cur) at every position, masked to valid tokens.
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    logq = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    kl_tok = (logq.exp() * (logq - logp)).sum(-1)
    valid = (labels[n, 1:] != IGNORE).float()
    kl = (kl_tok * valid).sum() / valid.sum()
    loss = -eps[0] * forget_nll + eps[1] * mismatch_nll + eps[2] * kl
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def ours_trainer(policy, rows, opt_: dict, device: torch.device, compute_dtype: torch.dtype,
                 backend: str, b: int):
    """A Trainer set up by its own setup steps on the given model and rows (one step per
    ``train_step``): the run's code path, not a copy of it."""
    from fastunlearn.config import RunConfig
    from fastunlearn.trainer import Trainer

    cfg = RunConfig()
    t, m = cfg.train, cfg.model
    t.device, t.batch_size, t.lr, t.max_grad_norm = str(device), b, 2e-6, 1.0
    t.steps = 10**6  # the linear schedule stays at lr for the few timed steps
    t.precision = "bf16" if compute_dtype == torch.bfloat16 else "fp32"
    t.optimizer = "adamw_sr" if opt_["sr"] else "adamw"
    t.cpu_linear = "torch" if opt_["torchlin"] else "auto"
    t.keep_freed_memory = not opt_["freemem"]
    # Random weights: no finite check between steps, no divergence bound.
    t.check_finite_every, t.max_normal_kl, t.max_mismatch_nll = 0, None, None
    m.dtype = "bfloat16" if opt_["bf16w"] else "float32"
    m.lora, m.lora_dropout = opt_["lora"], 0.0
    m.reference = "cached" if opt_["cached"] else ("adapters" if opt_["lora"] else "copy")
    m.reference_dtype = "bfloat16" if opt_["bf16ref"] else "auto"
    m.gradient_checkpointing, m.lean_layers = opt_["ckpt"], opt_["lean"]
    cfg.loss.backend, cfg.loss.method = backend, opt_["method"]
    if opt_["method"] == "rmu":
        cfg.loss.eps_mismatch = 0.0
    cfg.eval.enabled, cfg.save_model = False, False
    trainer = Trainer(cfg, model=policy, progress=False)
    trainer.setup(rows_by_kind=rows, pad_id=0)
    return trainer


def batch_rows(batch, method: str = "paper") -> list[list]:
    """The rows of a [forget; mismatch; normal] batch, by kind (the trainer's input); idk_dpo
    also gets a preferred row per forget row (its prompt, the answer of a mismatch row)."""
    from fastunlearn.data import KIND_PREFERRED, PreferredRows

    rows = [[], [], []]
    for i in range(batch.input_ids.shape[0]):
        k = int(batch.kind[i])
        rows[k].append(_Row(batch.input_ids[i].tolist(), batch.labels[i].tolist(), k))
    if method == "idk_dpo":
        preferred = PreferredRows()
        for f, m in zip(rows[0], rows[1]):
            cut = next(j for j, y in enumerate(f.labels) if y != IGNORE)
            ids = f.input_ids[:cut] + m.input_ids[cut:]
            preferred.append(_Row(ids, f.labels[:cut] + m.labels[cut:], KIND_PREFERRED))
        rows.append(preferred)
    return rows


# ------------------------------------------------------------------------- one config
def build_config(model_name: str, b: int, t: int, impl: str, device: str,
                 backend: str = "auto", attn: str = "auto"):
    """(the result row's build fields, the step function) of one impl."""
    from fastunlearn.models import frozen_copy, pick_attn_implementation

    opt_ = parse_impl(impl)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    weights_dtype = torch.bfloat16 if opt_["bf16w"] else torch.float32
    compute_dtype = torch.bfloat16 if (cuda or opt_["bf16w"]) else torch.float32
    attn = pick_attn_implementation(dev) if attn == "auto" else attn
    torch.manual_seed(0)
    policy = build_model(model_name, dev, weights_dtype, attn)
    vocab = MODELS[model_name]["vocab_size"]
    batch = make_batch(b, t, vocab)
    row = {"model": model_name, "B": b, "T": t, "impl": impl, "device_type": dev.type,
           "weights": str(weights_dtype).replace("torch.", ""),
           "compute": str(compute_dtype).replace("torch.", ""), "attn": attn,
           "tokens_per_step": 3 * b * t,
           "valid_fraction": float((batch.labels[:, 1:] != IGNORE).float().mean())}
    if compute_dtype == torch.float32:
        autocast = contextlib.nullcontext
    else:
        def autocast():
            return torch.autocast(dev.type, dtype=compute_dtype)
    eps = (0.5, 1.0, 1.0)

    if opt_["name"] == "paper":
        if opt_["keepmem"]:
            from fastunlearn.cpu_memory import keep_freed_memory

            keep_freed_memory()
        ref = frozen_copy(policy)  # the paper keeps a second full model
        params = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-6, fused=cuda)

        def step():
            return paper_step(policy, ref, batch, opt, eps, autocast)
        row.update(backend="hf", reference="copy", linear_gemm="torch")
    else:
        trainer = ours_trainer(policy, batch_rows(batch, opt_["method"]), opt_, dev,
                               compute_dtype, opt_["backend"] or backend, b)
        swapped = any(type(m) is torch.nn.Linear and "forward" in m.__dict__
                      for m in trainer.policy.modules())
        row["linear_gemm"] = "onednn" if swapped else "torch"
        reference = {"cached": "cached", "adapters": "adapters"}.get(
            trainer.cfg.model.reference, "copy-bf16" if opt_["bf16ref"] else "copy")
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]

        def step():
            return trainer.train_step()["loss"]
        row.update(backend=trainer.backend, reference=reference, method=opt_["method"],
                   optimizer=type(trainer.optimizer).__name__)
    row["trainable_params"] = sum(p.numel() for p in params)
    return row, step


def time_steps(step, warmup: int, steps: int, cuda: bool) -> tuple[list, list, torch.Tensor]:
    """(wall seconds, process CPU seconds, last loss) of ``steps`` steps after ``warmup``."""
    times, cpu_times, loss = [], [], None
    for i in range(warmup + steps):
        sec, cpu, loss = _one_step(step, cuda)
        if i >= warmup:
            times.append(sec)
            cpu_times.append(cpu)
    return times, cpu_times, loss


def _one_step(step, cuda: bool):
    if cuda:
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = step()
    if cuda:
        torch.cuda.synchronize()
    # process CPU seconds (all threads): less sensitive than wall time to other load
    return time.perf_counter() - start, time.process_time() - cpu_start, loss


def _timing_fields(times, cpu_times, loss, b: int, t: int, warmup: int, steps: int) -> dict:
    ms = 1e3 * statistics.median(times)
    return dict(ms_per_step=round(ms, 2), ms_all=[round(1e3 * x, 2) for x in times],
                tokens_per_s=round(3 * b * t / (ms / 1e3), 1), loss=float(loss),
                warmup=warmup, steps=steps,
                cpu_s_per_step=round(statistics.median(cpu_times), 3))


def run_config(model_name: str, b: int, t: int, impl: str, device: str, warmup: int,
               steps: int, backend: str = "auto", attn: str = "auto") -> dict:
    """Build, warm up, time. Returns one result row (no 'commit'/'torch' fields)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    _touch_torch(dev)  # lazily loaded libraries / pools are not the step's memory
    rss0 = proc_status_kib("VmRSS")
    row, step = build_config(model_name, b, t, impl, device, backend, attn)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    row.update(_timing_fields(*time_steps(step, warmup, steps, cuda), b, t, warmup, steps))
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        row["device"] = torch.cuda.get_device_name(dev)
    else:
        row["peak_gib"] = round((proc_status_kib("VmHWM") - rss0) / 2**20, 3)
        row["device"] = "cpu"
        row["threads"] = torch.get_num_threads()
    return row


def run_interleaved(model_name: str, b: int, t: int, impls: list[str], device: str,
                    warmup: int, steps: int, backend: str = "auto",
                    attn: str = "auto") -> list[dict]:
    """Every impl built in this one process, their steps taken in turn (A B C A B C ...), so
    a shared machine's load drifts hit every impl alike. Each row also gets
    ``paired_ratio``: the median over turns of its step time over the first impl's in the same
    turn. No peak memory (the impls share the process)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    built = [build_config(model_name, b, t, impl, device, backend, attn) for impl in impls]
    for _ in range(warmup):
        for _row, step in built:
            _one_step(step, cuda)
    times = [[] for _ in built]
    cpu_times = [[] for _ in built]
    losses = [None] * len(built)
    for _ in range(steps):
        for k, (_row, step) in enumerate(built):
            sec, cpu, losses[k] = _one_step(step, cuda)
            times[k].append(sec)
            cpu_times[k].append(cpu)
    rows = []
    for k, (row, _step) in enumerate(built):
        row.update(_timing_fields(times[k], cpu_times[k], losses[k], b, t, warmup, steps))
        row.update(interleaved_with=impls, device=torch.cuda.get_device_name(dev) if cuda
                   else "cpu", paired_ratio=round(statistics.median(
                       x / y for x, y in zip(times[k], times[0])), 4),
                   paired_cpu_ratio=round(statistics.median(
                       x / y for x, y in zip(cpu_times[k], cpu_times[0])), 4))
        if not cuda:
            row["threads"] = torch.get_num_threads()
        rows.append(row)
    return rows


def run_isolated(spec: dict, timeout: float) -> dict:
    """One config in a fresh interpreter (CPU peak RSS must not see the previous config)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec),
           "--threads", str(torch.get_num_threads())]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _meta() -> dict:
    meta = {"torch": torch.__version__, "commit": git_commit(), "cpu_model": cpu_model(),
            "cpu_threads": torch.get_num_threads()}
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    return meta


def run_all_interleaved(plan, device: str, warmup: int, steps: int, backend: str,
                        attn: str = "auto", rounds: int = 1) -> list[dict]:
    """``run_interleaved`` per (model, shape) of ``plan``, ``rounds`` times over."""
    rows, meta = [], _meta()
    for rnd in range(rounds):
        for model_name, b, t, impls in plan:
            print(f"[bench] {model_name} B={b} T={t} interleaved: {', '.join(impls)}"
                  + (f" round {rnd + 1}/{rounds}" if rounds > 1 else ""), file=sys.stderr,
                  flush=True)
            load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
            for row in run_interleaved(model_name, b, t, impls, device, warmup, steps,
                                       backend, attn):
                row.update(meta, load_average_before=load, peak_gib=None)
                if rounds > 1:
                    row["round"] = rnd
                rows.append(row)
                print(f"[bench]   {row['impl']}: {row['ms_per_step']} ms, "
                      f"{row['paired_ratio']}x the first", file=sys.stderr, flush=True)
            gc.collect()
    return rows


def run_all(plan, device: str, warmup: int, steps: int, isolate: bool, backend: str,
            timeout: float, attn: str = "auto", rounds: int = 1) -> list[dict]:
    """Every config of ``plan``, ``rounds`` times over (round r runs every config before round
    r + 1 starts: slow drifts of a shared machine's load hit every impl alike)."""
    rows, meta = [], _meta()
    configs = [(m, b, t, impl) for m, b, t, impls in plan for impl in impls]
    for rnd, (model_name, b, t, impl) in ((r, c) for r in range(rounds) for c in configs):
        spec = dict(model_name=model_name, b=b, t=t, impl=impl, device=device,
                    warmup=warmup, steps=steps, backend=backend, attn=attn)
        tag = f" round {rnd + 1}/{rounds}" if rounds > 1 else ""
        print(f"[bench] {model_name} B={b} T={t} {impl}{tag} ...", file=sys.stderr,
              flush=True)
        load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        if isolate:
            row = run_isolated(spec, timeout)
        else:
            try:
                row = run_config(**spec)
            except torch.cuda.OutOfMemoryError as exc:
                row = {"error": "OOM: " + str(exc).splitlines()[0][:160]}
            except Exception as exc:  # one failing config must not lose the others
                row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            finally:
                gc.collect()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
        row = {"model": model_name, "B": b, "T": t, "impl": impl, **row, **meta,
               "load_average_before": load}
        if rounds > 1:
            row["round"] = rnd
        row.setdefault("device", device)
        for k in ("ms_per_step", "tokens_per_s", "peak_gib"):
            row.setdefault(k, None)
        rows.append(row)
        print(f"[bench]   -> {row.get('ms_per_step')} ms, {row.get('peak_gib')} GiB"
              + (f" ERROR {row['error']}" if "error" in row else ""),
              file=sys.stderr, flush=True)
    return rows


def _paper_ms(rows: list[dict]) -> dict:
    """ms / step of the paper-style row per (model, B, T, round)."""
    return {(r["model"], r["B"], r["T"], r.get("round")): r.get("ms_per_step") for r in rows
            if r["impl"] == "paper"}


def table(rows: list[dict]) -> str:
    head = f"{'model':<14} {'B':>2} {'T':>5} {'impl':<22} {'backend':<8} {'ms/step':>9} " \
           f"{'tok/s':>9} {'peak GiB':>9} {'vs paper':>8}"
    lines = [head, "-" * len(head)]
    paper = _paper_ms(rows)
    for r in rows:
        ms = r.get("ms_per_step")
        base = paper.get((r["model"], r["B"], r["T"], r.get("round")))
        speed = f"{base / ms:.2f}x" if ms and base else ""
        fmt = (lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-")
        lines.append(f"{r['model']:<14} {r['B']:>2} {r['T']:>5} {r['impl']:<22} "
                     f"{str(r.get('backend', '-')):<8} {fmt(ms, '9.1f')} "
                     f"{fmt(r.get('tokens_per_s'), '9.0f')} {fmt(r.get('peak_gib'), '9.2f')} "
                     f"{speed:>8}" + (f"  {r['error'][:40]}" if r.get("error") else ""))
    return "\n".join(lines)


def round_summary(rows: list[dict]) -> str:
    """Per config over the rounds: median, min and max ms / step, the median of the
    per-round ratios to the paper-style row (each ratio from one round's pair of runs) and,
    for interleaved runs, the median of the paired step-time ratios to the first impl."""
    paper = _paper_ms(rows)
    groups: dict = {}
    for r in rows:
        if r.get("ms_per_step"):
            groups.setdefault((r["model"], r["B"], r["T"], r["impl"]), []).append(r)
    head = f"{'model':<14} {'BxT':>7} {'impl':<26} {'rounds':>6} {'median ms':>10} " \
           f"{'min':>9} {'max':>9} {'vs paper':>8} {'paired / first':>14}"
    lines = [head, "-" * len(head)]
    for (model, b, t, impl), rs in groups.items():
        ms = [r["ms_per_step"] for r in rs]
        ratios = [paper[(model, b, t, r.get("round"))] / r["ms_per_step"] for r in rs
                  if paper.get((model, b, t, r.get("round")))]
        speed = f"{statistics.median(ratios):.2f}x" if ratios else ""
        paired = [r["paired_ratio"] for r in rs if r.get("paired_ratio")]
        paired = f"{statistics.median(paired):.3f}" if paired else ""
        lines.append(f"{model:<14} {f'{b}x{t}':>7} {impl:<26} {len(rs):>6} "
                     f"{statistics.median(ms):>10.1f} {min(ms):>9.1f} {max(ms):>9.1f} "
                     f"{speed:>8} {paired:>14}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="tiny model, T=32, 1 timed step (CI)")
    ap.add_argument("--lora-8b", action="store_true",
                    help="Llama-3-8B-sized LoRA run: bf16 frozen weights, adapters-disabled "
                         "reference, activation checkpointing (GPU)")
    ap.add_argument("--models", help="comma list to keep from the preset (e.g. smollm2-135m)")
    ap.add_argument("--impls", help="comma list replacing the preset's impls")
    ap.add_argument("--shape", help="BxT replacing the preset's shapes, e.g. 2x128")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--steps", type=int, help="timed steps")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--attn", default="auto",
                    choices=("auto", "sdpa", "flash_attention_2", "eager"),
                    help="attention implementation (auto: flash-attn 2 if installed on CUDA)")
    ap.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                    help="one subprocess per config (auto: on CPU, for honest peak RSS)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per isolated config")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole list this many times, interleaved (robust to drift)")
    ap.add_argument("--interleave", action="store_true",
                    help="build every impl in one process and alternate their steps (paired "
                         "timing; no peak memory; process-wide settings such as the "
                         "allocator's apply to all of them)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/train_step_<dev>.json)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_config(**json.loads(args.one))), flush=True)
        return 0

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    cuda = device.startswith("cuda")
    if args.quick:
        plan, warmup, steps, suffix = QUICK, 1, 1, "_quick"
        if not args.threads:  # 2 OpenMP threads on a loaded 2-core box can stall for seconds
            torch.set_num_threads(1)
    elif args.lora_8b:
        if not cuda:
            raise SystemExit("error: --lora-8b needs a CUDA device (16 GB of bf16 weights)")
        plan, warmup, steps, suffix = LORA_8B, 1, 2, "_lora8b"
    else:
        plan, warmup, steps, suffix = (GPU_DEFAULT, 2, 3, "") if cuda else \
            (CPU_DEFAULT, 1, 2, "")
    if args.models:
        keep = set(args.models.split(","))
        unknown = keep - set(MODELS)
        if unknown:
            raise SystemExit(f"error: unknown model {sorted(unknown)[0]!r} "
                             f"(known: {', '.join(MODELS)})")
        plan = [p for p in plan if p[0] in keep] or [(m, *plan[0][1:]) for m in sorted(keep)]
    if args.impls:
        impls = args.impls.split(",")
        for i in impls:
            try:
                parse_impl(i)
            except ValueError as exc:
                raise SystemExit(f"error: {exc}") from None
        plan = [(m, b, t, impls) for m, b, t, _ in plan]
    if args.shape:
        try:
            b, t = (int(x) for x in args.shape.lower().split("x"))
        except ValueError:
            raise SystemExit(f"error: --shape must look like 2x128, got {args.shape!r}") from None
        plan = list({(m, b, t, tuple(i)): None for m, _, _, i in plan})
        plan = [(m, b, t, list(i)) for m, b, t, i in plan]
    warmup = args.warmup if args.warmup is not None else warmup
    steps = args.steps if args.steps is not None else steps
    if steps < 1 or warmup < 0 or args.rounds < 1:
        raise SystemExit("error: --steps and --rounds must be >= 1 and --warmup >= 0")
    # auto: isolate on CPU (honest peak RSS), except --quick (speed; its peak is approximate)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not cuda and not args.quick)

    if args.interleave:
        rows = run_all_interleaved(plan, device, warmup, steps, args.backend, args.attn,
                                   args.rounds)
    else:
        rows = run_all(plan, device, warmup, steps, isolate, args.backend, args.timeout,
                       args.attn, args.rounds)
    if args.threads:
        for r in rows:
            r["threads"] = args.threads
    dev_name = "cuda" if cuda else "cpu"
    out = Path(args.out) if args.out else \
        ROOT / "benchmarks" / "results" / f"train_step_{dev_name}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(rows, indent=1)
    out.write_text(text + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / out.name).write_text(text + "\n")
    print(table(rows))
    if args.rounds > 1 or args.interleave:
        print(round_summary(rows))
    print(f"wrote {out}")
    return 1 if any("error" in r for r in rows) and all("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
