"""The unlearning loop: setup / train_step / evaluate / save, in one explicit class.

    trainer = Trainer(cfg, out_dir)
    summary = trainer.run()      # setup, eval before, steps, eval after, save, report

One code path for one process and for N (``torchrun``, ``WORLD_SIZE > 1``): the loss of every
micro-batch is computed by ``unlearn_step.UnlearnStep`` (sharded with FSDP2 when there are
several processes), each process draws its share of the same global batch
(``distributed.RankBatcher``), and the per-kind token counts that normalise the loss are summed
over processes and micro-batches, so gradient accumulation and sharding are exact.

Setup is a sequence of named steps, also used by the benchmarks: ``setup_runtime`` (device,
processes, backend), ``setup_data`` (pairs), ``setup_policy`` (and the rows, tokenised with its
tokenizer), ``setup_reference`` (and the sharded step module), ``setup_batches``,
``setup_optimizer``, ``setup_evaluation``.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint
from . import distributed as dist
from .batching import UnlearnBatcher
from .config import ConfigError, RunConfig, validate
from .cpu_memory import keep_freed_memory
from .eval.heldout import write_heldout
from .lean_layers import use_lean_layers
from .log import get_logger
from .losses import KIND_FORGET, KIND_MISMATCH, KIND_NORMAL, resolve_backend
from .method_terms import MethodSettings, reference_kinds
from .metrics_log import MetricsLog, summary_writer_class
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
from .provenance import provenance, versions, write_model_files
from .signals import Terminated
from .step import ReferenceRunner, reference_mode
from .unlearn_step import (
    RETAIN_METRICS,
    UnlearnStep,
    accumulate,
    clip_grad_norm,
    measuring,
    prepare,
)


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


def micro_batch_loss(step: UnlearnStep, inputs, coef):
    """The loss of one prepared micro-batch through the (possibly sharded) step module."""
    return step(inputs, coef)


def default_checkpoint_dir(out: Path) -> Path:
    """``<out>.checkpoints``: next to the output, outside its working folder, so checkpoints
    survive a killed run (whose working folder is set aside)."""
    return out.with_name(out.name + ".checkpoints")


class Trainer:
    """Holds the models, data and optimiser of one unlearning run.

    ``resume``: a checkpoint folder (or a root holding several) to continue from; the run
    must use the same config (less the keys in ``checkpoint.RESUMABLE_KEYS``) and model, on any
    number of processes."""

    def __init__(self, cfg: RunConfig, out_dir: Path | None = None, *, model=None, tokenizer=None,
                 recipe=None, progress: bool = True, resume: str | Path | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir else None
        self.progress = progress
        self.resume = resume
        self._model, self._tokenizer, self._recipe = model, tokenizer, recipe
        self.step = 0
        self.metrics_rows: list[dict] = []
        self.evals: list[dict] = []
        self.train_seconds = 0.0
        self.train_tokens = 0
        self.stop_reason: str | None = None
        self.work_dir: Path | None = None
        self.resumed_from: str | None = None
        self.eval_notes: dict[str, str] = {}
        self._saved_step = -1
        self._sigterm = False
        self._lora_host = None

    # ----------------------------------------------------------------- setup
    def setup(self, rows_by_kind: list | None = None, pad_id: int | None = None) -> None:
        """Every setup step in order. ``rows_by_kind`` / ``pad_id``: rows already tokenised
        (benchmarks); the recipe and tokenizer are then not read."""
        self.setup_runtime()
        self.setup_data(rows_by_kind, pad_id)
        self.setup_policy()
        self.setup_reference()
        self.setup_batches()
        self.setup_optimizer()
        self.setup_evaluation()

    def setup_runtime(self) -> None:
        """Config checks, seeds, threads, processes and device, loss backend."""
        cfg = self.cfg
        validate(cfg)  # also for configs built in code, not only loaded ones
        seed_everything(cfg.train.seed)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        world = max(dist.env_world_size(), dist.world_size())
        if world > 1:
            pick_device(cfg.train.device)  # cuda asked for but absent: the config's error
            # Every process needs rows of each kind in every micro-batch: checked before the
            # process group or any model.
            dist.check_rows_per_rank(cfg.train.batch_size, world)
            self.device = dist.init_from_env(cfg.train.device)
        else:
            dist.check_launcher_env()
            self.device = pick_device(cfg.train.device)
        self.world = dist.world_size()
        self.distributed = self.world > 1
        if self.device.type == "cpu" and cfg.train.keep_freed_memory:
            keep_freed_memory()
        if self.resume:  # a checkpoint of another config fails now, not after loading
            checkpoint.check_resumable(self.resume, self.fingerprint())
        # Resolve the backend now so an unavailable explicit choice fails before any work.
        self.backend = resolve_backend(cfg.loss.backend, self.device.type).name
        summary_writer_class(cfg.train.report_to)  # TensorBoard missing: one line, now
        if self.distributed and not cfg.model.lora and cfg.model.save_dtype != "auto":
            raise ConfigError("model.save_dtype: a sharded run saves the weights in their own "
                              "dtype; use model.save_dtype=auto (or model.dtype to choose it)")

    def setup_data(self, rows_by_kind: list | None = None, pad_id: int | None = None) -> None:
        """The training pairs, read before the model (a bad file fails in a second, not a
        minute); they are tokenised with the model's tokenizer in :meth:`setup_policy`. Or
        rows already tokenised, with their pad id (benchmarks)."""
        from .inputs import load_training_data

        self.recipe, self.tokenizer = self._recipe, self._tokenizer
        self.rows_by_kind, self.pad_id = rows_by_kind, pad_id
        if rows_by_kind is None:
            self.recipe = self._recipe or load_training_data(self.cfg.data)

    def _tokenize(self, tokenizer) -> None:
        from .data import ensure_pad_token
        from .inputs import tokenize_all

        ensure_pad_token(tokenizer)
        self.tokenizer, self.pad_id = tokenizer, tokenizer.pad_token_id
        self.rows_by_kind = tokenize_all(tokenizer, self.recipe, self.cfg.data,
                                         self.cfg.loss.method)

    def setup_policy(self) -> None:
        """The policy on its device (one process) or built on the meta device with rank 0
        holding the loaded weights on its host (several); checked against the data and the
        fused loss's head form; LoRA, lean layers, activation checkpointing."""
        from .models import load_tokenizer

        cfg = self.cfg
        source, tokenizer = self._on_main(self._load_policy, share=False) or (None, None)
        if self.rows_by_kind is None:
            self._tokenize(self._tokenizer or tokenizer or load_tokenizer(
                cfg.model.name, trust_remote_code=cfg.model.trust_remote_code))
        self.weights_dtype = dist.all_gather_objects(_head_dtype(source))[0]
        self.compute_dtype = pick_compute_dtype(cfg.train.precision, self.device,
                                                self.weights_dtype)
        self._on_main(lambda: self._check_policy(source))
        if cfg.model.lora:
            source = None if source is None else self._wrap_lora(source)
        if self.distributed:
            self._source = source  # rank 0's host weights, broadcast once the step is sharded
            config = dist.all_gather_objects(None if source is None else _config_of(source))[0]
            self.policy = _meta_model(config, self.weights_dtype,
                                      cfg.model.lora and self._wrap_lora)
        else:
            self.policy = source
        if cfg.model.lean_layers and not use_lean_layers(self.policy):
            if dist.is_main():
                warnings.warn("model.lean_layers=true: no RMSNorm or SwiGLU MLP module found in "
                              "the model, nothing changed", stacklevel=2)
        if cfg.model.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
            if hasattr(self.policy, "enable_input_require_grads"):
                self.policy.enable_input_require_grads()

    def _load_policy(self):
        """(model, tokenizer) on this process's device, or rank 0's host with several."""
        cfg = self.cfg
        host = torch.device("cpu") if self.distributed else self.device
        if self._model is not None:
            return self._model.to(host), self._tokenizer
        return load_model_and_tokenizer(
            cfg.model.name, dtype=cfg.model.dtype, device=host,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code)

    def _check_policy(self, policy) -> None:
        rows = self.rows_by_kind
        vocab = policy.get_output_embeddings().weight.shape[0]
        max_id = max(max(r.input_ids) for k in (KIND_FORGET, KIND_NORMAL) for r in rows[k])
        if max_id >= vocab:
            raise ModelError(f"tokenizer produces id {max_id} but the model's vocabulary "
                             f"is {vocab}")
        # The fused loss computes the logits from the trunk and the head: they must be the
        # model's own logits (logit scale, bias, soft-cap), else training sees another model.
        check_head(policy, rows[KIND_FORGET][0].input_ids[:16])

    def _on_main(self, fn, share: bool = True):
        """``fn()`` on rank 0 (the process holding real weights); its one-line error, if any,
        raised on every process, so no process waits for one that failed. Returns the result
        on every process (``share=False``: on rank 0 only, None elsewhere)."""
        error = None
        if dist.is_main():
            try:
                result = fn()
            except (ValueError, OSError) as exc:
                error, result = exc, None
        else:
            result = None
        if not self.distributed:
            if error is not None:
                raise error
            return result
        shared = dist.all_gather_objects(
            (None if error is None else (type(error), str(error)), result if share else None))[0]
        if shared[0] is not None:
            if error is not None:
                raise error
            kind, message = shared[0]
            raise kind(message)
        return shared[1] if share else result

    def setup_reference(self) -> None:
        """The frozen reference (a copy, the adapters disabled, or cached hidden states) and
        the step module that runs policy, reference and loss; sharded with several processes."""
        cfg = self.cfg
        ref_dtype = None if cfg.model.reference_dtype == "auto" else \
            parse_dtype(cfg.model.reference_dtype)
        cached = cfg.model.reference == "cached"
        if self.distributed and cfg.loss.method == "rmu":
            raise ConfigError("loss.method=rmu runs in one process only (its pass stops inside "
                              "the model, which a sharded model does not support)")
        if self.distributed and cached and cfg.model.reference_name:
            raise ConfigError("model.reference=cached with model.reference_name runs in one "
                              "process only: use reference=copy with several processes")
        # One process: the real models. Several: rank 0's host models are the sources, every
        # process builds the same structure on the meta device.
        main_policy = self._source if self.distributed else self.policy
        # LoRA: the adapters disabled serve as the reference; cached: before step 1 the
        # policy is the reference. Otherwise (or with a named reference) a model is loaded.
        # graddiff holds normal rows by their NLL: it needs no reference at all.
        want_ref = (bool(cfg.model.reference_name) or not (cfg.model.lora or cached)) and \
            cfg.loss.method != "graddiff"
        # Several processes, a copy of the policy: filled from rank 0's policy weights (cast
        # to the reference dtype), no second host copy.
        load_ref = want_ref and (bool(cfg.model.reference_name) or not self.distributed)
        main_ref = self._on_main(lambda: self._load_reference(ref_dtype, main_policy),
                                 share=False) if load_ref else None
        if self.distributed:
            self._ref_source = main_ref
            self.reference = None
            if want_ref:
                like = main_ref if cfg.model.reference_name else main_policy
                config, dtype = dist.all_gather_objects(
                    None if like is None else (_config_of(like), _head_dtype(like)))[0]
                self.reference = frozen_copy(_meta_model(config, dtype), ref_dtype)
        else:
            self.reference = main_ref
        self._route_cpu_linears()
        self._route_cpu_attention()
        self.packing_off_reason = None
        self.packing = cfg.train.packing and self._on_main(
            lambda: self._packing_keeps_rows_apart(main_policy, main_ref))
        self.ref_cache = None
        self.ref_runner = None
        if self.distributed:
            self._build_sharded_step(cached)
        else:
            if cached:
                self.ref_cache = self._build_reference_cache(ref_dtype)
                # Freed: training reads the cache only; evaluation keeps a snapshot of a named
                # one.
                self._eval_reference, self.reference = self.reference, None
            needs_ref = self.reference is not None or self.ref_cache is not None or \
                cfg.model.lora
            self.ref_runner = ReferenceRunner(self.policy, self.reference, cache=self.ref_cache) \
                if needs_ref else None
            mode = reference_mode(self.ref_runner) if needs_ref else "none"
            ref_head = self.ref_cache.head(self.device) if self.ref_cache is not None else None
            self.unlearn_step = UnlearnStep(
                self.policy, self.reference if mode == "copy" else None, mode=mode,
                ref_head=None if ref_head is None else ref_head.weight,
                ref_bias=None if ref_head is None else ref_head.bias, backend=self.backend,
                chunk_rows=cfg.loss.chunk_rows, compute_dtype=self.compute_dtype,
                method=self.method_settings())

    def method_settings(self) -> MethodSettings:
        lo = self.cfg.loss
        return MethodSettings(lo.method, lo.beta, lo.gamma, lo.rmu_layer, lo.rmu_steer,
                              self.cfg.train.seed)

    def _build_sharded_step(self, cached: bool) -> None:
        """FSDP2 over the meta-built models, filled from rank 0; a cached reference built by
        every process for its share of the normal rows."""
        from .unlearn_step import (
            bf16_policy,
            build_cache_sharded,
            materialize_from_rank0,
            shard,
        )

        cfg = self.cfg
        mode = "cached" if cached else ("copy" if self.reference is not None else
                                        "adapters" if cfg.model.lora else "none")
        placeholder = torch.zeros(1, 1) if cached else None
        step = UnlearnStep(self.policy, self.reference, mode=mode, ref_head=placeholder,
                           backend=self.backend, chunk_rows=cfg.loss.chunk_rows,
                           compute_dtype=self.compute_dtype, method=self.method_settings())
        # fp32 master weights with bf16 compute: FSDP gathers them in bf16 (MixedPrecision).
        mixed = self.weights_dtype == torch.float32 and self.compute_dtype == torch.bfloat16
        shard(step, mp_policy=bf16_policy() if mixed else None)
        materialize_from_rank0(step, self._source, self.device, self._ref_source)
        # The host copy is no longer needed, except for LoRA: rank 0 merges the adapters into
        # it when saving (the base weights are frozen, so they are still the host's).
        self._lora_host = self._source if cfg.model.lora else None
        self._source = self._ref_source = None
        if cached:
            ref_dtype = None if cfg.model.reference_dtype == "auto" else \
                parse_dtype(cfg.model.reference_dtype)
            self.ref_cache = build_cache_sharded(
                step, self.rows_by_kind[KIND_NORMAL], device=self.device,
                compute_dtype=self.compute_dtype, storage_dtype=ref_dtype, pad_id=self.pad_id,
                logprob_rows=self._logprob_rows())
            head = self.ref_cache.head(self.device)
            step.ref_head, step.ref_bias = head.weight, head.bias
        self.unlearn_step = step
        self.policy = step.policy

    def _packing_keeps_rows_apart(self, policy, reference) -> bool:
        """Probe the models that run on packed rows (see packing.py); warn and say False when
        one of them lets a packed row see another."""
        from .packing import probe_packing, sliding_window_limit

        rows = self.rows_by_kind
        tokens = [rows[KIND_FORGET][0].input_ids[:12], rows[KIND_NORMAL][0].input_ids[:9],
                  rows[KIND_NORMAL][-1].input_ids[:7]]
        for model in (policy, reference):
            why = None if model is None else \
                sliding_window_limit(model, self.cfg.data.max_length) or \
                probe_packing(model, tokens, self.pad_id)
            if why is not None:
                self.packing_off_reason = f"{type(model).__name__}: {why}"
                warnings.warn(f"train.packing=true: packed rows are not kept apart "
                              f"({self.packing_off_reason}); packing off", stacklevel=3)
                return False
        return True

    def _route_cpu_linears(self) -> None:
        """fp32 on CPU: the nn.Linear GEMMs of both models through oneDNN when that is faster
        (see cpu_linear.py; about 2x on AMD processors). ``auto`` skips it quietly if the C++
        extension cannot be built; ``onednn`` fails then. One process only (sharded weights
        stay torch's)."""
        from .cpu_linear import try_onednn_linears, use_onednn_linears
        from .losses._build import ExtensionBuildError

        mode = self.cfg.train.cpu_linear
        if self.device.type != "cpu" or self.compute_dtype != torch.float32 or mode == "torch" \
                or self.distributed:
            return
        # Timed at the rows a step really runs: the policy sees every kind, the reference the
        # normal rows only.
        tokens = self.cfg.train.batch_size * self.cfg.data.max_length
        for model, rows in ((self.policy, 3 * tokens), (self.reference, tokens)):
            if model is None:
                continue
            if mode == "auto":
                try_onednn_linears(model, rows)
                continue
            try:
                use_onednn_linears(model, mode, rows)
            except ExtensionBuildError as exc:
                raise ConfigError(f"train.cpu_linear=onednn needs the C++ extension: "
                                  f"{str(exc).splitlines()[0]}") from exc

    def _route_cpu_attention(self) -> None:
        """bf16 / fp16 on CPU: sdpa attention on fp32 copies of its inputs for the shapes where
        that is faster (see cpu_attention.py), in both models, so that they compute alike."""
        if self.device.type != "cpu" or self.compute_dtype == torch.float32 \
                or self.cfg.train.cpu_attention != "auto":
            return
        from .cpu_attention import use_fp32_attention_where_faster

        for model in (self.policy, self.reference):
            if model is not None:
                use_fp32_attention_where_faster(model)

    def _logprob_rows(self) -> dict:
        """{kind: rows} whose reference log-probabilities the cached reference keeps: the
        kinds besides the normal rows that the method compares with the reference."""
        kinds = reference_kinds(self.cfg.loss.method)
        return {k: self.rows_by_kind[k] for k in kinds if k != KIND_NORMAL}

    def _build_reference_cache(self, ref_dtype):
        """The cached reference (normal rows' hidden states, and the log-probabilities of
        :meth:`_logprob_rows`), loaded from or written to the cache dir."""
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
                                   storage_dtype=ref_dtype, pad_id=self.pad_id,
                                   logprob_rows=self._logprob_rows())

    def _load_reference(self, ref_dtype, policy=None):
        name = self.cfg.model.reference_name
        if not name:
            return frozen_copy(policy, ref_dtype)
        host = torch.device("cpu") if self.distributed else self.device
        ref, _ = load_model_and_tokenizer(name, dtype=self.cfg.model.dtype, device=host,
                                          attn_implementation=self.cfg.model.attn_implementation,
                                          trust_remote_code=self.cfg.model.trust_remote_code)
        pol = policy if policy is not None else (self._source if self.distributed
                                                 else self.policy)
        v_ref = ref.get_output_embeddings().weight.shape[0]
        v_pol = pol.get_output_embeddings().weight.shape[0]
        if v_ref != v_pol:
            raise ModelError(f"reference model {name} has vocabulary {v_ref}, the policy has "
                             f"{v_pol}: they must match")
        check_head(ref, self.rows_by_kind[KIND_FORGET][0].input_ids[:16])
        h_ref, h_pol = head_of(ref), head_of(pol)
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

    def setup_batches(self) -> None:
        """This process's share of every global batch (the whole batch with one process)."""
        cfg = self.cfg
        # packed sequences the reference runs on hold only rows it needs
        separate = frozenset(reference_kinds(cfg.loss.method)) | {KIND_NORMAL}
        rows = list(self.rows_by_kind)
        if cfg.loss.eps_mismatch == 0:  # a term with weight 0: its rows are not drawn
            rows[KIND_MISMATCH] = None
        batcher = UnlearnBatcher(rows, cfg.train.batch_size, self.pad_id,
                                 cfg.train.seed, bucket=cfg.train.bucket_by_length,
                                 pack=self.packing, separate=separate)
        self.batcher = dist.RankBatcher(batcher)

    def setup_optimizer(self) -> None:
        """AdamW (or the stochastic-rounding one) over the trainable, possibly sharded,
        parameters; the linear schedule."""
        cfg = self.cfg
        self.unlearn_step.train()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer_name = pick_optimizer(cfg.train.optimizer, params)
        if self.optimizer_name == "adamw_sr":
            self.optimizer = StochasticRoundingAdamW(params, lr=cfg.train.lr,
                                                     weight_decay=cfg.train.weight_decay,
                                                     seed=cfg.train.seed)
        else:
            fused = self.device.type in ("cuda", "cpu") and not self.distributed
            self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr,
                                               weight_decay=cfg.train.weight_decay, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_schedule(cfg.train.warmup_steps, cfg.train.steps))

    def setup_evaluation(self) -> None:
        """The evaluator (one process); with several, likelihood metrics run through the
        sharded step and generation metrics on rank 0 from the saved model, after training."""
        named_ref, self._eval_reference = getattr(self, "_eval_reference", None), None
        self.evaluator = None
        self.heldout_inputs = None
        if not self.cfg.eval.enabled:
            return
        if self.distributed:
            self.heldout_inputs = self._heldout_inputs()
            return
        from .eval import Evaluator

        ecfg = self._eval_config()
        # A cached reference has no model left: the evaluator then runs without one.
        reference = self.reference if self.reference is not None else \
            (AdapterDisabled(self.policy) if self.cfg.model.lora else None)
        if named_ref is not None:  # a cached named reference: snapshot it, then let it go
            ev = Evaluator(self.tokenizer, self.recipe, ecfg, reference_model=named_ref,
                           progress=self.progress)
            ev.snapshot_reference()
            self.evaluator = ev
            return
        self.evaluator = Evaluator(self.tokenizer, self.recipe, ecfg, reference_model=reference,
                                   progress=self.progress)

    def _heldout_inputs(self):
        """This process's share of the held-out forget and normal rows, prepared for the step
        (None, with a note, when they cannot be split over the processes)."""
        from .batching import collate_rows
        from .data import tokenize_pairs

        kw = dict(max_length=self.cfg.data.max_length,
                  max_prompt_length=self.cfg.data.max_prompt_length)
        forget = tokenize_pairs(self.tokenizer, self.recipe.heldout_forget, KIND_FORGET, **kw)
        normal = tokenize_pairs(self.tokenizer, self.recipe.heldout_normal, KIND_NORMAL, **kw)
        if self.cfg.model.reference == "cached":
            self.eval_notes["likelihood"] = (
                "forget NLL only: the cached reference holds the training rows, not the "
                "held-out ones (normal KL not measured)")
            normal = []
        if len(forget) < self.world or (normal and len(normal) < self.world):
            self.eval_notes["likelihood"] = (
                f"skipped: fewer held-out rows than the {self.world} processes")
            return None
        rows = forget[dist.share(len(forget))] + normal[dist.share(len(normal))]
        return [prepare(collate_rows(rows, self.pad_id), self.device, self.policy)]

    # ------------------------------------------------------------ train step
    def train_step(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        batches = [self.batcher.next() for _ in range(cfg.train.grad_accum)]
        micro = [prepare(b, self.device, self.policy, self.ref_cache, cfg.loss.method)
                 for b in batches]
        eps = (cfg.loss.eps_forget, cfg.loss.eps_mismatch, cfg.loss.eps_normal)
        sums = accumulate(self.unlearn_step, micro, eps,
                          forward=lambda inputs, coef: micro_batch_loss(self.unlearn_step,
                                                                        inputs, coef))
        grad_norm = None
        if cfg.train.max_grad_norm:
            params = [p for p in self.policy.parameters() if p.requires_grad]
            grad_norm = clip_grad_norm(params, cfg.train.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = dist.reduce_metric_sums({"real": sum(b.real_tokens for b in batches),
                                          "padded": sum(b.padded_tokens for b in batches)})
        real = int(tokens["real"])
        self.step += 1
        self.train_seconds += seconds
        self.train_tokens += real
        every = cfg.train.check_finite_every
        if every and self.step % every == 0:
            self.check_parameters_finite(f"after step {self.step}")
        row = {
            "step": self.step,
            "loss": sums["loss"],
            "forget_nll": sums["forget_nll"],
            "mismatch_nll": sums["mismatch_nll"],
            "normal_kl": sums["normal_kl"],
            **{k: sums[k] for k in ("forget_term", "normal_nll", "normal_distance") if k in sums},
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": real,
            "real_token_fraction": real / max(tokens["padded"], 1),
            "step_seconds": seconds,
            "tokens_per_s": real / seconds,
        }
        terms = ("loss", "forget_nll", "mismatch_nll", "normal_kl", "forget_term", "normal_nll",
                 "normal_distance")
        bad = [f"{k}={row[k]}" for k in terms if row.get(k) is not None
               and not math.isfinite(row[k])]
        if bad:
            raise FloatingPointError(f"non-finite loss at step {self.step} ({', '.join(bad)}): "
                                     "lower train.lr, or look for NaN / inf in the inputs")
        # Divergence guard: the descent terms blow up when the ascent runs away.
        for key, bound in (("normal_kl", cfg.train.max_normal_kl),
                           ("mismatch_nll", cfg.train.max_mismatch_nll)):
            if bound is not None and row[key] is not None and row[key] > bound:
                raise FloatingPointError(f"training diverged at step {self.step}: {key} "
                                         f"{row[key]:.4g} > train.max_{key} = {bound:g}; lower "
                                         "train.lr or the loss coefficients")
        self.metrics_rows.append(row)
        return row

    # --------------------------------------------------------------- evaluate
    def evaluate(self) -> dict | None:
        if self.distributed:
            return self._evaluate_sharded()
        if self.evaluator is None:
            return None
        # Before the first step the policy is its own reference (unless another model is).
        same = self.step == 0 and not self.cfg.model.reference_name
        metrics = self.evaluator.run(self.policy, self.step, model_is_reference=same)
        self.evals.append({"step": self.step, **metrics})
        self.policy.train()
        return metrics

    def _evaluate_sharded(self) -> dict | None:
        """Likelihood metrics of the held-out rows through the sharded forward (collective)."""
        from .unlearn_step import likelihood_metrics

        if self.heldout_inputs is None:
            return None
        got = likelihood_metrics(self.unlearn_step, self.heldout_inputs)
        metrics = {"step": self.step, "forget_nll": got["forget_nll"],
                   "forget_ppl": math.exp(min(got["forget_nll"], 700.0))}
        if self.cfg.model.reference != "cached":
            metrics["normal_kl"] = got["normal_kl"]
        self.evals.append(dict(metrics))
        return metrics

    def _generation_metrics_on_main(self, model_dir: Path) -> dict:
        """Rank 0, after training: every metric of the evaluator on the saved model, loaded
        whole on rank 0's device, the original model as reference."""
        from .eval import Evaluator

        ecfg = self._eval_config()
        kw = dict(dtype=self.cfg.model.dtype, device=self.device,
                  attn_implementation=self.cfg.model.attn_implementation,
                  trust_remote_code=self.cfg.model.trust_remote_code)
        model, _ = load_model_and_tokenizer(str(model_dir), **kw)
        reference, _ = load_model_and_tokenizer(
            self.cfg.model.reference_name or self.cfg.model.name, **kw)
        ev = Evaluator(self.tokenizer, self.recipe, ecfg, reference_model=reference,
                       progress=self.progress)
        metrics = ev.run(model, self.step)
        del model, reference
        return metrics

    # ------------------------------------------------------------------ save
    def save(self, out_dir: Path, before: dict | None = None, after: dict | None = None) -> None:
        """``out_dir/model``: the trained model with a model card and ``fastunlearn.json``."""
        self.check_model_finite()  # never save a broken model
        card = {"config": self.cfg.to_dict(), "before": before, "after": after}
        dtype = {"save_dtype": self.cfg.model.save_dtype, "training_dtype": self.compute_dtype}
        merge = self.cfg.model.lora_merge_on_save
        if self.distributed and self._lora_host is None:
            checkpoint.save_hf(self.policy, self.tokenizer, out_dir / "model")
            if dist.is_main():
                # the sharded writer keeps the weights' own dtype
                write_model_files(out_dir / "model", provenance(**card))
            return
        if self.distributed:  # LoRA: rank 0 saves its host model with the trained adapters
            weights = checkpoint.full_state_dict(self.policy)
            if dist.is_main():
                self._lora_host.load_state_dict(weights)
                save_model(self._lora_host, self.tokenizer, out_dir / "model", merge_lora=merge,
                           **card, **dtype)
            dist.barrier()
            return
        save_model(self.policy, self.tokenizer, out_dir / "model", merge_lora=merge, **card,
                   **dtype)

    def check_parameters_finite(self, when: str) -> None:
        """FloatingPointError naming the first trainable parameter that holds NaN or inf
        (each process checks its own shards; collective with several)."""
        named = [(n, _local(p)) for n, p in self.policy.named_parameters() if p.requires_grad]
        if not named:
            return
        several = dist.world_size() > 1
        with torch.no_grad():
            # A sum is NaN / inf when any element is (and overflows only for weights near the
            # float limit, broken anyway); several times faster than isfinite or max-abs.
            total = torch.stack([p.sum(dtype=torch.float32) for _, p in named]).sum()
            if several:
                total = dist.all_reduce_sum(total.double().cpu())
            if bool(torch.isfinite(total)):  # one sync when all is well
                return
            name = next((n for n, p in named if not bool(torch.isfinite(p).all())), None)
        if several:
            name = next((n for n in dist.all_gather_objects(name) if n), None)
        what = f"parameter {name} is not finite" if name else "parameters overflow"
        raise FloatingPointError(f"{what} {when} (step {self.step}): training diverged; lower "
                                 "train.lr (nothing was saved)")

    def check_model_finite(self) -> None:
        """Finite parameters, and finite logits on a training prompt: weights that are finite
        but huge (train.lr=1e10) still give NaN logits. Several processes: the forget NLL of
        that prompt through the sharded step (NaN or inf logits make it non-finite)."""
        from .models import eval_mode

        self.check_parameters_finite("before saving")
        ids = self.rows_by_kind[KIND_FORGET][0].input_ids[:32]
        if self.distributed:
            finite = self._prompt_nll_finite(ids)
        else:
            with torch.no_grad(), eval_mode(self.policy):
                logits = self.policy(input_ids=torch.tensor([ids], device=self.device),
                                     use_cache=False).logits
            finite = bool(torch.isfinite(logits).all())
        if not finite:
            raise FloatingPointError(f"the model's logits are not finite after step {self.step}: "
                                     "training diverged; lower train.lr (nothing was saved)")

    def _prompt_nll_finite(self, ids: list[int]) -> bool:
        from .batching import collate_rows
        from .models import eval_mode

        batch = collate_rows([_Row(list(ids), list(ids), KIND_FORGET)], self.pad_id)
        with torch.no_grad(), eval_mode(self.unlearn_step), measuring(self.unlearn_step):
            out = self.unlearn_step(prepare(batch, self.device, self.policy), (1.0, 0.0, 0.0))
        return bool(torch.isfinite(dist.all_reduce_sum(out.forget_nll.detach().double().cpu())))

    # ------------------------------------------------------------ checkpoints
    def fingerprint(self) -> str:
        return checkpoint.run_fingerprint(self.cfg)

    def checkpoint_dir(self) -> Path | None:
        if not self.cfg.train.save_every:
            return None
        if self.cfg.train.checkpoint_dir:
            return Path(self.cfg.train.checkpoint_dir)
        return default_checkpoint_dir(self.out_dir or self.work_dir)

    def _train_state(self) -> checkpoint.TrainState:
        return checkpoint.TrainState(self.policy, self.optimizer, self.scheduler, self.batcher,
                                     self.step)

    def save_checkpoint(self) -> Path | None:
        """A checkpoint of this step (collective), unless checkpoints are off or it exists."""
        folder = self.checkpoint_dir()
        if folder is None or self._saved_step == self.step:
            return None
        # A broken state is never checkpointed: the last good checkpoint stays the newest.
        self.check_parameters_finite(f"before the checkpoint of step {self.step}")
        extra = {"metrics_rows": self.metrics_rows, "evals": self.evals,
                 "train_seconds": self.train_seconds, "train_tokens": self.train_tokens}
        path = checkpoint.save(folder, self._train_state(), fingerprint=self.fingerprint(),
                               keep=self.cfg.train.keep_checkpoints, extra=extra)
        self._saved_step = self.step
        return path

    def load_checkpoint(self, path) -> None:
        """Continue from a checkpoint: weights, optimiser, schedule, data stream, RNG states,
        and the run's metrics so far."""
        self.step = checkpoint.load(path, self._train_state(), fingerprint=self.fingerprint())
        extra = checkpoint.read_meta(path).get("extra") or {}
        self.metrics_rows = list(extra.get("metrics_rows", []))
        self.evals = list(extra.get("evals", []))
        self.train_seconds = float(extra.get("train_seconds", 0.0))
        self.train_tokens = int(extra.get("train_tokens", 0))
        self._saved_step = self.step
        self.resumed_from = str(checkpoint.resolve(path))

    def _snapshot_original_for_evaluation(self) -> None:
        """Resuming with a cached reference of the policy itself: evaluation measures the
        normal KL (and answer similarity) against the policy before step 1, which a straight
        run snapshots at its first evaluation. Take that snapshot now, before the checkpoint's
        weights replace the original ones."""
        m = self.cfg.model
        # no reference model: a cache of the policy itself, or graddiff (which needs none)
        own = (m.reference == "cached" or self.cfg.loss.method == "graddiff") and \
            not m.reference_name
        if self.evaluator is not None and own and not m.lora:
            self.evaluator.ref = self.policy
            self.evaluator.snapshot_reference()

    def on_interrupt(self) -> None:
        """Called when Ctrl-C or SIGTERM (signals.py) stops a run, before its unfinished output
        is removed: a SIGTERM between steps writes a final checkpoint (checkpoints on)."""
        if self._sigterm and self.checkpoint_dir() is not None and self.step > 0:
            path = self.save_checkpoint()
            if path is not None:
                get_logger(__name__).info(f"checkpoint of step {self.step} written to {path}")

    @contextlib.contextmanager
    def _sigterm_between_steps(self):
        """With checkpoints on, SIGTERM stops the run at the end of the current step (so the
        final checkpoint is consistent) instead of inside it."""
        if self.checkpoint_dir() is None or \
                threading.current_thread() is not threading.main_thread():
            yield
            return

        def defer(signum, frame):
            self._sigterm = True
        previous = signal.signal(signal.SIGTERM, defer)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    # ------------------------------------------------------------------- run
    def run(self, work_dir: Path | None = None) -> dict:
        """Train and evaluate; write metrics, model and report into ``work_dir``, which must be
        new or empty (an earlier run there is never written over). With several processes
        every process calls it with the same folder; rank 0 writes it."""
        from .outputs import check_fresh_dir

        work_dir = Path(work_dir or self.out_dir)
        if dist.is_main():
            check_fresh_dir(work_dir)
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
        if self.resume:
            self._snapshot_original_for_evaluation()
            self.load_checkpoint(self.resume)
        main = dist.is_main()
        if main:
            work_dir.mkdir(parents=True, exist_ok=True)
            (work_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            write_heldout(work_dir, self.recipe, cfg.data)  # what `fastunlearn eval --run` uses
        before = self.evaluate() if self.step == 0 else \
            next((e for e in self.evals if e.get("step") == 0), None)
        stop_at = None
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="unlearning",
                   disable=not dist.progress_enabled(self.progress), dynamic_ncols=True)
        metrics = MetricsLog(work_dir, cfg.train.report_to, enabled=main)
        try:
            for row in self.metrics_rows if main else []:  # a resumed run's earlier steps
                metrics.step(row)
            with self._sigterm_between_steps():
                while self.step < cfg.train.steps:
                    row = self.train_step()
                    metrics.step(row)
                    bar.update(1)
                    forget = row["forget_nll"] if row["forget_nll"] is not None else \
                        row["forget_term"]
                    normal = next(row[k] for k in RETAIN_METRICS.values()
                                  if row.get(k) is not None)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", forget=f"{forget:.2f}",
                                    mismatch=f"{row['mismatch_nll']:.2f}",
                                    normal=f"{normal:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                    if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                        self.save_checkpoint()
                    if self._sigterm:
                        raise Terminated("terminated (SIGTERM)")
                    if cfg.eval.every and self.step % cfg.eval.every == 0 \
                            and self.step < cfg.train.steps:
                        self.evaluate()
                    threshold = cfg.train.stop_forget_nll
                    if threshold is not None and stop_at is None and \
                            row["forget_nll"] >= threshold:
                        stop_at = self.step + cfg.train.stop_extra_steps
                    if stop_at is not None and self.step >= stop_at:
                        self.stop_reason = (f"forget NLL passed {threshold} at step "
                                            f"{stop_at - cfg.train.stop_extra_steps}; stopped "
                                            f"{cfg.train.stop_extra_steps} steps later")
                        break
            bar.close()
            after = self.evaluate()
            for evaluation in self.evals:  # TensorBoard only; summary.json has them
                metrics.evaluation(evaluation)
        finally:
            metrics.close()
        if cfg.save_model:
            self.save(work_dir, before, after)
        if self.distributed:
            after = self._after_on_main(work_dir, after)
        summary = {
            "steps": self.step,
            "wall_seconds": time.perf_counter() - wall,
            "train_seconds": self.train_seconds,
            "backend": self.backend,
            "optimizer": self.optimizer_name,
            "device": str(self.device),
            "processes": self.world,
            "tokens_per_second": self.train_tokens / max(self.train_seconds, 1e-9),
            "stopped_early": self.stop_reason or False,
            "resumed_from": self.resumed_from,
            "versions": versions(),
            "model": cfg.model.name,
            "recipe": getattr(self.recipe, "name", cfg.data.recipe),
            "rows": {"forget": len(self.rows_by_kind[KIND_FORGET]),
                     "mismatch": len(self.rows_by_kind[KIND_MISMATCH]),
                     "normal": len(self.rows_by_kind[KIND_NORMAL])},
            "evaluation": self._evaluation_places(),
            "config": cfg.to_dict(),
            "before": before or {},
            "after": after or {},
            "evals": self.evals,
        }
        if main:
            from .report import write_report
            write_report(work_dir, summary, self.metrics_rows)
        return summary

    def _eval_config(self):
        """The evaluator's settings from the run's eval section."""
        from .eval import EvalConfig

        e = self.cfg.eval
        return EvalConfig(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                          n_harmful=e.n_harmful, n_normal=e.n_normal, n_xstest=e.n_xstest,
                          judge=e.judge, judge_harmful_labels=list(e.judge_harmful_labels),
                          samples=e.samples, generate=e.generate,
                          max_length=self.cfg.data.max_length)

    def _after_on_main(self, work_dir: Path, after: dict | None) -> dict | None:
        """Several processes, after the sharded save: the other processes are done; rank 0
        evaluates the saved model with generation (when asked and possible)."""
        e = self.cfg.eval
        if not e.enabled or not e.generate:
            return after
        if not self.cfg.save_model:
            self.eval_notes["generation"] = "skipped: save_model=false (it runs on the saved " \
                                            "model)"
            return after
        weights = sum(_local(p).numel() * p.element_size() for p in self.policy.parameters())
        weights = dist.all_reduce_sum(torch.tensor(float(weights)))
        if float(weights) > checkpoint.GATHER_LIMIT_BYTES:
            self.eval_notes["generation"] = (
                "skipped: the model is above the size one process loads whole; run "
                "`fastunlearn eval` on the saved model")
            return after
        self.eval_notes["generation"] = "rank 0, on the saved model, after training"
        if not dist.is_main():
            return after
        try:
            full = self._generation_metrics_on_main(work_dir / "model")
        except (ValueError, OSError, RuntimeError) as exc:  # OOM included: keep the run
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.eval_notes["generation"] = f"failed on rank 0 ({why}); the model is saved"
            warnings.warn(f"generation metrics on rank 0 failed: {why}", stacklevel=2)
            return after
        self.evals.append({"step": self.step, **full})
        return {**full, **(after or {})}

    def _evaluation_places(self) -> dict:
        """Which metrics ran where (for the report)."""
        if not self.cfg.eval.enabled:
            return {"likelihood": "off", "generation": "off"}
        if not self.distributed:
            gen = "this process, during the run" if self.cfg.eval.generate else "off"
            return {"likelihood": "this process, during the run", "generation": gen}
        places = {"likelihood": f"sharded forward over {self.world} processes, during the run",
                  "generation": "off" if not self.cfg.eval.generate else ""}
        places.update(self.eval_notes)
        return places


class _Row:
    def __init__(self, input_ids, labels, kind):
        self.input_ids, self.labels, self.kind = input_ids, labels, kind


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's shard of a (possibly sharded) parameter."""
    return p.to_local() if hasattr(p, "to_local") else p


def _head_dtype(model) -> torch.dtype | None:
    return None if model is None else model.get_output_embeddings().weight.dtype


def _config_of(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.config


def _meta_model(config, dtype: torch.dtype, wrap=None):
    """The same architecture on the meta device (no memory) in ``dtype``; ``wrap`` applied
    (LoRA), so its structure matches rank 0's loaded model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if wrap:
            model = wrap(model)
    return model.eval()


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
