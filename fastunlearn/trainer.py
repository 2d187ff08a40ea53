"""The unlearning loop: setup / train_step / evaluate / save, in one explicit class.

    trainer = Trainer(cfg, out_dir)
    summary = trainer.run()      # setup, eval before, steps, eval after, save, report

Gradient accumulation is exact by token counts: every micro-batch uses ``reduction="sum"`` with
each coefficient divided by that kind's valid-token count over the whole accumulated step.
"""
from __future__ import annotations

import json
import math
import random
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .batching import UnlearnBatcher
from .config import ConfigError, RunConfig, validate
from .eval.heldout import write_heldout
from .lean_layers import use_lean_layers
from .losses import KIND_FORGET, KIND_MISMATCH, KIND_NORMAL, resolve_backend
from .models import (
    ModelError,
    check_head,
    frozen_copy,
    head_of,
    load_model_and_tokenizer,
    parse_dtype,
    save_model,
)
from .optim import StochasticRoundingAdamW
from .step import LossWeights, ReferenceRunner, kind_counts, micro_batch_loss


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def pick_compute_dtype(precision: str, device: torch.device,
                       weights: torch.dtype = torch.float32) -> torch.dtype:
    """``auto``: bf16 autocast on CUDA or when the weights are bf16 anyway, else fp32."""
    if precision == "auto":
        bf16 = device.type == "cuda" or weights == torch.bfloat16
        return torch.bfloat16 if bf16 else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def pick_optimizer(name: str, params: list[torch.Tensor]) -> str:
    """``auto``: bf16 trainable weights get stochastic-rounding AdamW (plain AdamW would round
    away the small updates, see optim.py); fp32 ones get torch's fused AdamW."""
    if name != "auto":
        return name
    return "adamw_sr" if any(p.dtype == torch.bfloat16 for p in params) else "adamw"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def linear_schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


class Trainer:
    """Holds the models, data and optimiser of one unlearning run."""

    def __init__(self, cfg: RunConfig, out_dir: Path | None = None, *, model=None, tokenizer=None,
                 recipe=None, progress: bool = True):
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir else None
        self.progress = progress
        self._model, self._tokenizer, self._recipe = model, tokenizer, recipe
        self.step = 0
        self.metrics_rows: list[dict] = []
        self.evals: list[dict] = []
        self.train_seconds = 0.0
        self.train_tokens = 0
        self.stop_reason: str | None = None
        self.work_dir: Path | None = None

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        from .inputs import load_training_data, tokenize_all

        cfg = self.cfg
        validate(cfg)  # also for configs built in code, not only loaded ones
        seed_everything(cfg.train.seed)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.train.device)
        # Resolve the backend now so an unavailable explicit choice fails before any work.
        self.backend = resolve_backend(cfg.loss.backend, self.device.type).name

        # Read the data before loading the model: a bad file fails in a second, not a minute.
        self.recipe = self._recipe or load_training_data(cfg.data)
        if self._model is None:
            self.policy, self.tokenizer = load_model_and_tokenizer(
                cfg.model.name, dtype=cfg.model.dtype, device=self.device,
                attn_implementation=cfg.model.attn_implementation)
        else:
            self.policy, self.tokenizer = self._model.to(self.device), self._tokenizer
        self.compute_dtype = pick_compute_dtype(cfg.train.precision, self.device,
                                                self.policy.get_output_embeddings().weight.dtype)
        from .data import ensure_pad_token
        ensure_pad_token(self.tokenizer)

        rows = tokenize_all(self.tokenizer, self.recipe, cfg.data)
        vocab = self.policy.get_output_embeddings().weight.shape[0]
        max_id = max(max(r.input_ids) for k in (KIND_FORGET, KIND_NORMAL) for r in rows[k])
        if max_id >= vocab:
            raise ModelError(f"tokenizer produces id {max_id} but the model's vocabulary "
                             f"is {vocab}")
        self.rows_by_kind = rows
        # The fused loss computes the logits from the trunk and the head: they must be the
        # model's own logits (logit scale, bias, soft-cap), else training sees another model.
        check_head(self.policy, rows[KIND_FORGET][0].input_ids[:16])

        ref_dtype = None if cfg.model.reference_dtype == "auto" else \
            parse_dtype(cfg.model.reference_dtype)
        cached = cfg.model.reference == "cached"
        if cfg.model.lora:
            if cfg.model.reference_name and cfg.model.reference == "adapters":
                raise ConfigError("model.reference=adapters is the policy with its adapters off, "
                                  "not model.reference_name: use reference=auto or cached")
            self.policy = self._wrap_lora(self.policy)
            # A named reference is loaded; otherwise the adapters disabled serve as one.
            self.reference = self._load_reference(ref_dtype) if cfg.model.reference_name \
                else None
        elif cached and not cfg.model.reference_name:
            self.reference = None  # before step 1 the policy is the reference: no copy needed
        else:
            self.reference = self._load_reference(ref_dtype)
        self._route_cpu_linears()
        self.ref_cache = None
        if cached:
            self.ref_cache = self._build_reference_cache(ref_dtype)
            # Freed: training reads the cache only; evaluation keeps a snapshot of a named one.
            self._eval_reference, self.reference = self.reference, None
        self.ref_runner = ReferenceRunner(self.policy, self.reference, cache=self.ref_cache)
        self.packing_off_reason = None
        self.packing = cfg.train.packing and self._packing_keeps_rows_apart()
        self.batcher = UnlearnBatcher(rows, cfg.train.batch_size, self.tokenizer.pad_token_id,
                                      cfg.train.seed, bucket=cfg.train.bucket_by_length,
                                      pack=self.packing)
        if cfg.model.lean_layers and not use_lean_layers(self.policy):
            warnings.warn("model.lean_layers=true: no RMSNorm or SwiGLU MLP module found in the "
                          "model, nothing changed", stacklevel=2)
        if cfg.model.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
            if hasattr(self.policy, "enable_input_require_grads"):
                self.policy.enable_input_require_grads()
        self.policy.train()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer_name = pick_optimizer(cfg.train.optimizer, params)
        if self.optimizer_name == "adamw_sr":
            self.optimizer = StochasticRoundingAdamW(params, lr=cfg.train.lr,
                                                     weight_decay=cfg.train.weight_decay,
                                                     seed=cfg.train.seed)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr,
                                               weight_decay=cfg.train.weight_decay,
                                               fused=self.device.type in ("cuda", "cpu"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_schedule(cfg.train.warmup_steps, cfg.train.steps))
        self.evaluator = self._make_evaluator()

    def _packing_keeps_rows_apart(self) -> bool:
        """Probe the models that run on packed rows (see packing.py); warn and say False when
        one of them lets a packed row see another."""
        from .packing import probe_packing, sliding_window_limit

        rows = self.rows_by_kind
        tokens = [rows[KIND_FORGET][0].input_ids[:12], rows[KIND_NORMAL][0].input_ids[:9],
                  rows[KIND_NORMAL][-1].input_ids[:7]]
        for model in (self.policy, self.reference):
            why = None if model is None else \
                sliding_window_limit(model, self.cfg.data.max_length) or \
                probe_packing(model, tokens, self.tokenizer.pad_token_id)
            if why is not None:
                self.packing_off_reason = f"{type(model).__name__}: {why}"
                warnings.warn(f"train.packing=true: packed rows are not kept apart "
                              f"({self.packing_off_reason}); packing off", stacklevel=3)
                return False
        return True

    def _route_cpu_linears(self) -> None:
        """fp32 on CPU: the nn.Linear GEMMs of both models through oneDNN when that is faster
        (see cpu_linear.py; about 2x on AMD processors). ``auto`` skips it quietly if the C++
        extension cannot be built; ``onednn`` fails then."""
        from .cpu_linear import try_onednn_linears, use_onednn_linears
        from .losses._build import ExtensionBuildError

        mode = self.cfg.train.cpu_linear
        if self.device.type != "cpu" or self.compute_dtype != torch.float32 or mode == "torch":
            return
        for model in (self.policy, self.reference):
            if model is None:
                continue
            if mode == "auto":
                try_onednn_linears(model)
                continue
            try:
                use_onednn_linears(model, mode)
            except ExtensionBuildError as exc:
                raise ConfigError(f"train.cpu_linear=onednn needs the C++ extension: "
                                  f"{str(exc).splitlines()[0]}") from exc

    def _build_reference_cache(self, ref_dtype):
        """Reference hidden states of every normal row, loaded from or written to the cache dir."""
        from .reference_cache import load_or_build_cache

        ref = self.reference if self.reference is not None else \
            (None if self.cfg.model.lora else self.policy)
        builder = ReferenceRunner(self.policy, ref)
        # Inside the run's working folder (renamed to the output at the end), never the
        # output folder itself: that must not exist before the run has finished.
        run_dir = self.work_dir or self.out_dir
        cache_dir = self.cfg.model.reference_cache_dir or \
            (run_dir / "refcache" if run_dir else None)
        return load_or_build_cache(builder, self.rows_by_kind[KIND_NORMAL], cache_dir,
                                   device=self.device, compute_dtype=self.compute_dtype,
                                   storage_dtype=ref_dtype, pad_id=self.tokenizer.pad_token_id)

    def _load_reference(self, ref_dtype):
        name = self.cfg.model.reference_name
        if not name:
            return frozen_copy(self.policy, ref_dtype)
        ref, _ = load_model_and_tokenizer(name, dtype=self.cfg.model.dtype, device=self.device,
                                          attn_implementation=self.cfg.model.attn_implementation)
        v_ref = ref.get_output_embeddings().weight.shape[0]
        v_pol = self.policy.get_output_embeddings().weight.shape[0]
        if v_ref != v_pol:
            raise ModelError(f"reference model {name} has vocabulary {v_ref}, the policy has "
                             f"{v_pol}: they must match")
        check_head(ref, self.rows_by_kind[KIND_FORGET][0].input_ids[:16])
        h_ref, h_pol = head_of(ref), head_of(self.policy)
        if (h_ref.logit_scale, h_ref.softcap) != (h_pol.logit_scale, h_pol.softcap):
            raise ModelError(f"reference model {name} scales or caps its logits differently "
                             "from the policy; the fused loss needs one head form for both")
        return frozen_copy(ref, ref_dtype)

    def _wrap_lora(self, model):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("model.lora=true needs the peft package: pip install peft") from None
        m = self.cfg.model
        lcfg = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                          target_modules=list(m.lora_targets), task_type="CAUSAL_LM")
        return get_peft_model(model, lcfg)

    def _make_evaluator(self):
        named_ref, self._eval_reference = getattr(self, "_eval_reference", None), None
        if not self.cfg.eval.enabled:
            return None
        from .eval import EvalConfig, Evaluator

        e = self.cfg.eval
        ecfg = EvalConfig(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                          n_harmful=e.n_harmful, n_normal=e.n_normal, n_xstest=e.n_xstest,
                          judge=e.judge, judge_harmful_labels=list(e.judge_harmful_labels),
                          samples=e.samples, generate=e.generate,
                          max_length=self.cfg.data.max_length)
        # A cached reference has no model left: the evaluator then runs without one.
        reference = self.reference if self.reference is not None else \
            (AdapterDisabled(self.policy) if self.cfg.model.lora else None)
        if named_ref is not None:  # a cached named reference: snapshot it, then let it go
            ev = Evaluator(self.tokenizer, self.recipe, ecfg, reference_model=named_ref,
                           progress=self.progress)
            ev.snapshot_reference()
            return ev
        return Evaluator(self.tokenizer, self.recipe, ecfg, reference_model=reference,
                         progress=self.progress)

    # ------------------------------------------------------------ train step
    def train_step(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        batches = [self.batcher.next() for _ in range(cfg.train.grad_accum)]
        totals = [sum(c) for c in zip(*(kind_counts(b) for b in batches))]
        # eps / total tokens of the kind over the accumulated step: exact accumulation.
        weights = LossWeights(cfg.loss.eps_forget / max(totals[KIND_FORGET], 1),
                              cfg.loss.eps_mismatch / max(totals[KIND_MISMATCH], 1),
                              cfg.loss.eps_normal / max(totals[KIND_NORMAL], 1))
        sums = torch.zeros(4)
        for batch in batches:
            out = micro_batch_loss(self.policy, self.ref_runner, batch, weights,
                                   device=self.device, compute_dtype=self.compute_dtype,
                                   backend=self.backend, chunk_rows=cfg.loss.chunk_rows,
                                   reduction="sum")
            out.loss.backward()
            sums += torch.stack([out.loss.detach().float().cpu(),
                                 out.forget_nll.detach().float().cpu(),
                                 out.mismatch_nll.detach().float().cpu(),
                                 out.normal_kl.detach().float().cpu()])
        grad_norm = None
        if cfg.train.max_grad_norm:
            params = [p for p in self.policy.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        real = sum(b.real_tokens for b in batches)
        padded = sum(b.padded_tokens for b in batches)
        self.step += 1
        self.train_seconds += seconds
        self.train_tokens += real
        every = cfg.train.check_finite_every
        if every and self.step % every == 0:
            self.check_parameters_finite(f"after step {self.step}")
        row = {
            "step": self.step,
            "loss": float(sums[0]),
            "forget_nll": float(sums[1]) / max(totals[KIND_FORGET], 1),
            "mismatch_nll": float(sums[2]) / max(totals[KIND_MISMATCH], 1),
            "normal_kl": float(sums[3]) / max(totals[KIND_NORMAL], 1),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": real,
            "real_token_fraction": real / max(padded, 1),
            "step_seconds": seconds,
            "tokens_per_s": real / seconds,
        }
        terms = ("loss", "forget_nll", "mismatch_nll", "normal_kl")
        bad = [f"{k}={row[k]}" for k in terms if not math.isfinite(row[k])]
        if bad:
            raise FloatingPointError(f"non-finite loss at step {self.step} ({', '.join(bad)}): "
                                     "lower train.lr, or look for NaN / inf in the inputs")
        # Divergence guard: the descent terms blow up when the ascent runs away.
        for key, bound in (("normal_kl", cfg.train.max_normal_kl),
                           ("mismatch_nll", cfg.train.max_mismatch_nll)):
            if bound is not None and row[key] > bound:
                raise FloatingPointError(f"training diverged at step {self.step}: {key} "
                                         f"{row[key]:.4g} > train.max_{key} = {bound:g}; lower "
                                         "train.lr or the loss coefficients")
        self.metrics_rows.append(row)
        return row

    # --------------------------------------------------------------- evaluate
    def evaluate(self) -> dict | None:
        if self.evaluator is None:
            return None
        # Before the first step the policy is its own reference (unless another model is).
        same = self.step == 0 and not self.cfg.model.reference_name
        metrics = self.evaluator.run(self.policy, self.step, model_is_reference=same)
        self.evals.append({"step": self.step, **metrics})
        self.policy.train()
        return metrics

    # ------------------------------------------------------------------ save
    def save(self, out_dir: Path) -> None:
        self.check_model_finite()  # never save a broken model
        save_model(self.policy, self.tokenizer, out_dir / "model",
                   merge_lora=self.cfg.model.lora_merge_on_save)

    def check_parameters_finite(self, when: str) -> None:
        """FloatingPointError naming the first trainable parameter that holds NaN or inf."""
        named = [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
        if not named:
            return
        with torch.no_grad():
            # A sum is NaN / inf when any element is (and overflows only for weights near the
            # float limit, broken anyway); several times faster than isfinite or max-abs.
            sums = torch.stack([p.sum(dtype=torch.float32) for _, p in named])
            if bool(torch.isfinite(sums.sum())):  # one sync when all is well
                return
            name = next((n for n, p in named if not bool(torch.isfinite(p).all())), None)
        what = f"parameter {name} is not finite" if name else "parameters overflow"
        raise FloatingPointError(f"{what} {when} (step {self.step}): training diverged; lower "
                                 "train.lr (nothing was saved)")

    def check_model_finite(self) -> None:
        """Finite parameters, and finite logits on a training prompt: weights that are finite
        but huge (train.lr=1e10) still give NaN logits."""
        from .step import eval_mode

        self.check_parameters_finite("before saving")
        ids = torch.tensor([self.rows_by_kind[KIND_FORGET][0].input_ids[:32]], device=self.device)
        with torch.no_grad(), eval_mode(self.policy):
            logits = self.policy(input_ids=ids, use_cache=False).logits
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError(f"the model's logits are not finite after step {self.step}: "
                                     "training diverged; lower train.lr (nothing was saved)")

    def on_interrupt(self) -> None:
        """Called when Ctrl-C or SIGTERM (signals.py) stops a run, before its unfinished output
        is removed: the place to write a final checkpoint. Nothing by default."""

    # ------------------------------------------------------------------- run
    def run(self, work_dir: Path | None = None) -> dict:
        """Train and evaluate; write metrics, model and report into ``work_dir``, which must be
        new or empty (an earlier run there is never written over)."""
        from .outputs import check_fresh_dir

        work_dir = check_fresh_dir(Path(work_dir or self.out_dir))
        try:
            return self._run(work_dir)
        except KeyboardInterrupt:
            self.on_interrupt()
            raise

    def _run(self, work_dir: Path) -> dict:
        cfg = self.cfg
        wall = time.perf_counter()
        self.work_dir = work_dir
        self.setup()
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        write_heldout(work_dir, self.recipe, cfg.data)  # what `fastunlearn eval --run` uses
        before = self.evaluate()
        stop_at = None
        bar = tqdm(total=cfg.train.steps, desc="unlearning", disable=not self.progress,
                   dynamic_ncols=True)
        with open(work_dir / "metrics.jsonl", "w") as log:
            while self.step < cfg.train.steps:
                row = self.train_step()
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", forget=f"{row['forget_nll']:.2f}",
                                mismatch=f"{row['mismatch_nll']:.2f}",
                                kl=f"{row['normal_kl']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                if cfg.eval.every and self.step % cfg.eval.every == 0 \
                        and self.step < cfg.train.steps:
                    self.evaluate()
                threshold = cfg.train.stop_forget_nll
                if threshold is not None and stop_at is None and row["forget_nll"] >= threshold:
                    stop_at = self.step + cfg.train.stop_extra_steps
                if stop_at is not None and self.step >= stop_at:
                    self.stop_reason = (f"forget NLL passed {threshold} at step "
                                        f"{stop_at - cfg.train.stop_extra_steps}; stopped "
                                        f"{cfg.train.stop_extra_steps} steps later")
                    break
        bar.close()
        after = self.evaluate()
        if cfg.save_model:
            self.save(work_dir)
        summary = {
            "steps": self.step,
            "wall_seconds": time.perf_counter() - wall,
            "train_seconds": self.train_seconds,
            "backend": self.backend,
            "optimizer": self.optimizer_name,
            "device": str(self.device),
            "tokens_per_second": self.train_tokens / max(self.train_seconds, 1e-9),
            "stopped_early": self.stop_reason or False,
            "model": cfg.model.name,
            "recipe": getattr(self.recipe, "name", cfg.data.recipe),
            "rows": {"forget": len(self.rows_by_kind[KIND_FORGET]),
                     "mismatch": len(self.rows_by_kind[KIND_MISMATCH]),
                     "normal": len(self.rows_by_kind[KIND_NORMAL])},
            "config": cfg.to_dict(),
            "before": before or {},
            "after": after or {},
            "evals": self.evals,
        }
        from .report import write_report
        write_report(work_dir, summary, self.metrics_rows)
        return summary


class AdapterDisabled(torch.nn.Module):
    """A LoRA policy seen with its adapters off: the original model, without a second copy."""

    def __init__(self, peft_model):
        super().__init__()
        self.inner = peft_model

    def forward(self, *args, **kwargs):
        with torch.no_grad(), self.inner.disable_adapter():
            return self.inner(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        with self.inner.disable_adapter():
            return self.inner.generate(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

