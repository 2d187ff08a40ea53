"""Unlearning with ``transformers.Trainer``: :class:`UnlearnTrainer` and :class:`UnlearnCollator`.

    from fastunlearn.integrations.hf import UnlearnCollator, UnlearnTrainer

    collator = UnlearnCollator(tokenizer, forget_ds, normal_ds, max_length=256)
    trainer = UnlearnTrainer(model=model, args=TrainingArguments(...),
                             train_dataset=collator.dataset, data_collator=collator,
                             processing_class=tokenizer, eps=(0.5, 1.0, 1.0))
    trainer.train()

The Trainer's model is a :class:`TrainerStep` (fastunlearn's :class:`UnlearnStep`: policy
trunk, reference and loss in one module), so DDP and FSDP2 (through ``accelerate launch``) wrap
the module whose forward reads the head weight: the weight is whole inside that forward, never
read as a shard; under DeepSpeed ZeRO-3 the head is registered with that forward. The
reference is the policy with its LoRA adapters off (a peft model), a frozen copy of the
policy, a model passed as ``reference``, or none (no KL term).

Gradient accumulation is exact: :meth:`UnlearnTrainer.get_batch_samples` counts the valid
tokens of each kind over all micro-batches of the optimiser step and all processes (the
Trainer's ``num_items_in_batch``, one count per kind), and every micro-batch's loss is its
summed terms divided by those counts. So N processes x M micro-batches give the loss and
gradients of one process on the whole batch.
"""
from __future__ import annotations

import os

import torch
from transformers import Trainer

from ..models import frozen_copy, head_of
from ..provenance import provenance, write_model_files
from ..unlearn_step import UnlearnStep, coefficients, prepare
from .hf_data import UnlearnCollator, dict_batch

__all__ = ["TrainerStep", "UnlearnCollator", "UnlearnTrainer"]

STEP_INPUTS = "unlearn_inputs"  # the key of the prepared StepInputs in a micro-batch dict
TERMS = ("forget_nll", "mismatch_nll", "normal_kl")


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class TrainerStep(UnlearnStep):
    """:class:`UnlearnStep` as a Trainer's model.

    Its forward runs outside any autocast the Trainer / accelerate put around it: the step's
    own ``compute_dtype`` decides (bf16 autocast for the trunks, the loss from bf16 hidden
    states and head), exactly as in fastunlearn's own trainer. ``_no_split_modules`` (the
    policy's decoder layer classes) tells accelerate's FSDP2 what to shard one by one.
    """

    @property
    def _no_split_modules(self):
        return getattr(_inner(self.policy), "_no_split_modules", None)

    def forward(self, inputs, coef):
        with torch.autocast(inputs.flat.device.type, enabled=False):
            return super().forward(inputs, coef)

    def activation_checkpointing_enable(self, **kwargs):
        _inner(self.policy).activation_checkpointing_enable(**kwargs)


def build_step(model: torch.nn.Module, reference="auto", *, backend: str = "auto",
               chunk_rows: int | None = None,
               compute_dtype: torch.dtype = torch.float32) -> TrainerStep:
    """The step of ``model``: ``reference`` is ``auto`` (adapters off for a peft model, else a
    frozen copy), ``copy``, ``adapters``, ``none`` or a model of its own."""
    if isinstance(reference, torch.nn.Module):
        ref, mode = reference, "copy"
    elif reference in ("auto", "copy", "adapters", "none"):
        peft = hasattr(model, "disable_adapter")
        mode = ("adapters" if peft else "copy") if reference == "auto" else reference
        ref = frozen_copy(model) if mode == "copy" else None
    else:
        raise ValueError(f"reference must be auto, copy, adapters, none or a model, got "
                         f"{reference!r}")
    return TrainerStep(model, ref, mode=mode, backend=backend, chunk_rows=chunk_rows,
                       compute_dtype=compute_dtype)


class UnlearnTrainer(Trainer):
    """``transformers.Trainer`` that trains ``model`` with fastunlearn's unlearning loss.

    ``model``: a causal LM or a peft model (or a ready :class:`TrainerStep`).
    ``reference``: see :func:`build_step`. ``eps``: the (forget, mismatch, normal)
    coefficients. ``backend`` / ``chunk_rows``: the fused loss's (see ``unlearn_loss``).
    Batches come from :class:`UnlearnCollator`; ``args.bf16`` trains with bf16 compute
    (``fp16`` is refused). ``trainer.model`` is the step; ``trainer.policy`` the trained model.
    Saved checkpoints hold the policy alone, in its own format, with ``fastunlearn.json``
    and a model card.
    """

    loss_is_scaled_for_ga = True  # each micro-batch's loss is already its share of the step

    def __init__(self, model=None, args=None, *, reference="auto",
                 eps: tuple[float, float, float] = (0.5, 1.0, 1.0), backend: str = "auto",
                 chunk_rows: int | None = None, **kwargs):
        if model is None:
            raise ValueError("UnlearnTrainer needs a model")
        if getattr(args, "fp16", False):
            raise ValueError("the unlearning loss does not run in fp16: use bf16=True")
        if getattr(args, "load_best_model_at_end", False):
            raise ValueError("UnlearnTrainer does not support load_best_model_at_end")
        eps = tuple(float(e) for e in eps)
        if len(eps) != 3 or min(eps) < 0:
            raise ValueError(f"eps must be three coefficients >= 0 (forget, mismatch, normal), "
                             f"got {eps!r}")
        compute = torch.bfloat16 if getattr(args, "bf16", False) else torch.float32
        step = model if isinstance(model, TrainerStep) else \
            build_step(model, reference, backend=backend, chunk_rows=chunk_rows,
                       compute_dtype=compute)
        self.eps = eps
        self.policy = step.policy
        self._term_sums = torch.zeros(3, dtype=torch.float64)
        self._term_counts = torch.zeros(3, dtype=torch.float64)
        super().__init__(model=step, args=args, **kwargs)
        if self.is_deepspeed_enabled:
            _register_head_with_zero3(step, self.accelerator)

    # ------------------------------------------------------------------ data
    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # the collator's items are indices, not model inputs

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator

    def _step_inputs(self, micro: dict) -> dict:
        """The micro-batch with its prepared StepInputs (host work: valid rows, kinds)."""
        if STEP_INPUTS in micro:
            return micro
        return {**micro, STEP_INPUTS: prepare(dict_batch(micro), self.args.device, self.policy)}

    def _global_counts(self, local: list[tuple[int, int, int]]) -> tuple[int, int, int]:
        """Valid tokens per kind summed over ``local`` micro-batches and all processes."""
        t = torch.tensor([sum(c) for c in zip(*local)], dtype=torch.long,
                         device=self.args.device)
        if self.accelerator.num_processes > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return tuple(int(x) for x in t.tolist())

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The optimiser step's micro-batches and, as ``num_items_in_batch``, the valid-token
        count of each kind over all of them and all processes."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = [self._step_inputs(b) for b in batches]
        if not batches:
            return batches, None
        counts = self._global_counts([b[STEP_INPUTS].counts for b in batches])
        self._term_counts += torch.tensor(counts, dtype=torch.float64)
        return batches, counts

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The micro-batch's summed terms over the step's global per-kind counts. DDP, FSDP
        and DeepSpeed average gradients over processes: the loss is multiplied by their
        number, so the result is the sum (the Trainer's own rule for token-averaged losses)."""
        inputs = self._step_inputs(inputs)
        step_inputs = inputs[STEP_INPUTS]
        counts = num_items_in_batch if num_items_in_batch is not None \
            else self._global_counts([step_inputs.counts])
        world = self.accelerator.num_processes
        coef = tuple(c * world for c in coefficients(self.eps, counts))
        out = model(step_inputs, coef)
        if model.training:
            terms = torch.stack([out.forget_nll, out.mismatch_nll, out.normal_kl])
            self._term_sums += terms.detach().double().cpu()
        return (out.loss, {"loss": out.loss}) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the unlearning loss of the batch (normalised by its own per-kind counts
        over all processes); no logits."""
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time=None) -> None:
        """Training logs also get each term's mean over its tokens since the last log."""
        if "loss" in logs and bool(self._term_counts.any()):
            sums = self._term_sums.to(self.args.device)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            means = sums.cpu() / self._term_counts.clamp(min=1)
            logs.update({k: round(float(v), 6) for k, v in zip(TERMS, means)})
            self._term_sums.zero_()
            self._term_counts.zero_()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ save / load
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The policy alone, in its own format (a full model, or a peft model's adapters),
        with the tokenizer, ``fastunlearn.json`` and a model card."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is not None:  # gathered from an engine: the step's names
            state_dict = {k[len("policy."):]: v for k, v in state_dict.items()
                          if k.startswith("policy.")}
        self.policy.save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        config = {"loss": dict(zip(("eps_forget", "eps_mismatch", "eps_normal"), self.eps)),
                  "reference": self.model.mode if hasattr(self.model, "mode") else None,
                  "trainer": "transformers.Trainer"}
        write_model_files(output_dir, provenance(config=config))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The policy's weights from a checkpoint of :meth:`_save` (DeepSpeed resumes through
        its own engine checkpoint and never comes here)."""
        if self.is_fsdp_enabled:
            raise ValueError("resuming an UnlearnTrainer run under FSDP is not supported")
        if hasattr(self.policy, "disable_adapter"):  # peft: the checkpoint holds the adapters
            super()._load_from_checkpoint(resume_from_checkpoint, model=self.policy)
            return
        _load_policy(self.policy, resume_from_checkpoint)


def _load_policy(policy: torch.nn.Module, folder: str) -> None:
    """Every weight of ``policy`` from a save_pretrained folder (one or several safetensors
    files); ValueError unless each parameter is loaded (or tied to one that is)."""
    import json

    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint {folder} has no {name}")
        state.update(load_file(path, device="cpu"))
    result = policy.load_state_dict(state, strict=False)
    loaded = {id(p) for n, p in policy.named_parameters(remove_duplicate=False) if n in state}
    params = dict(policy.named_parameters(remove_duplicate=False))
    missing = [k for k in result.missing_keys if id(params.get(k)) not in loaded]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {folder} does not match the model (missing "
                         f"{missing[:3]}, unexpected {result.unexpected_keys[:3]})")


def _register_head_with_zero3(step: UnlearnStep, accelerator) -> None:
    """DeepSpeed ZeRO-3 gathers a module's parameters around its own forward; the head weight
    is read by the step's forward (the lm_head module never runs), so it is registered as a
    parameter that forward uses (DeepSpeed's documented path for such parameters)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        return
    import deepspeed

    models = [step.policy] + ([step.reference] if step.reference is not None else [])
    for model in models:
        head = head_of(model)
        for p in (head.weight, head.bias):
            if p is not None:
                deepspeed.zero.register_external_parameter(step, p)
