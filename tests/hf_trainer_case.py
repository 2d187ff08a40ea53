"""One UnlearnTrainer run on the tiny model, and its replay through fastunlearn's own step loop.

Used in-process by tests/test_hf_trainer.py and, as a script, under ``accelerate launch``:

    accelerate launch --multi_gpu --num_processes 2 tests/hf_trainer_case.py OUT GRAD_ACCUM
    accelerate launch --use_fsdp --fsdp_version 2 ... tests/hf_trainer_case.py OUT GRAD_ACCUM fsdp
    torchrun --nproc_per_node 2 tests/hf_trainer_case.py OUT GRAD_ACCUM zero3   # DeepSpeed

(without a GPU: torchrun processes on the CPU with gloo)

Each process writes the micro-batches it trained on (``batches_<rank>.pt``) and rank 0 the
trained policy's weights (``weights.pt``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

if __name__ == "__main__":  # a script under accelerate launch: the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastunlearn.integrations.hf_data import UnlearnCollator, dict_batch  # noqa: E402
from fastunlearn.models import frozen_copy  # noqa: E402
from fastunlearn.unlearn_step import UnlearnStep, accumulate, prepare  # noqa: E402
from tests.tiny_model import tiny_llama, tiny_tokenizer  # noqa: E402

EPS = (0.5, 1.0, 1.0)
LR = 1e-2
STEPS = 3
MAX_GRAD_NORM = 1.0


def records():
    """Forget rows with prompt / answer columns, normal rows as chat messages (datasets)."""
    import datasets

    forget = datasets.Dataset.from_list(
        [{"prompt": f"how to do bad thing {i}?", "answer": f"step {i}: do it " * (1 + i % 3)}
         for i in range(8)])
    normal = datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": f"capital of place {i}?"},
                       {"role": "assistant", "content": f"the capital is city {i}" + "!" * i}]}
         for i in range(6)])
    return forget, normal


def collator(tokenizer, **kw) -> UnlearnCollator:
    forget, normal = records()
    return UnlearnCollator(tokenizer, forget, normal, max_length=64, **kw)


class Recording:
    """The collator, keeping a copy of every batch it returns."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, features):
        out = self.inner(features)
        self.batches.append({k: v.clone() for k, v in out.items()})
        return out


def train(out_dir, grad_accum: int, *, model=None, reference="auto", bf16: bool = False,
          batch_size: int = 2, mismatch_per_prompt: int = 1, resume=None, **args_kw):
    """(trainer, recorded batches) after STEPS optimiser steps."""
    from transformers import TrainingArguments

    from fastunlearn.integrations.hf import UnlearnTrainer

    tok = tiny_tokenizer()
    data = collator(tok, mismatch_per_prompt=mismatch_per_prompt)
    rec = Recording(data)
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, max_steps=STEPS, learning_rate=LR,
        lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM, report_to=[], logging_steps=1,
        seed=0, bf16=bf16, disable_tqdm=True,
        **{"use_cpu": True, "save_strategy": "no", **args_kw})
    trainer = UnlearnTrainer(model=model if model is not None else tiny_llama(), args=args,
                             train_dataset=data.dataset, data_collator=rec,
                             processing_class=tok, reference=reference, eps=EPS,
                             backend="chunked")
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec.batches


def replay(steps: list[list[dict]], *, model=None, reference="copy",
           compute_dtype=torch.float32) -> torch.nn.Module:
    """fastunlearn's own loop on the same micro-batches: UnlearnStep, prepare, accumulate
    (global per-kind counts), clipping and torch's AdamW. ``steps[s]`` holds every
    micro-batch of optimiser step s (of every process). Returns the trained policy."""
    policy = model if model is not None else tiny_llama()
    if reference == "copy":
        ref, mode = frozen_copy(policy), "copy"
    elif isinstance(reference, torch.nn.Module):
        ref, mode = reference, "copy"
    else:
        ref, mode = None, reference
    step = UnlearnStep(policy, ref, mode=mode, backend="chunked", compute_dtype=compute_dtype)
    params = [p for p in step.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    step.train()
    for micro in steps:
        accumulate(step, [prepare(dict_batch(b), torch.device("cpu"), policy) for b in micro],
                   EPS)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad()
    return policy


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


ZERO3 = {  # every parameter partitioned (no small ones kept whole), gathered for saving
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto",
                                              "betas": "auto", "eps": "auto",
                                              "torch_adam": True}},
}


def _main(out: str, grad_accum: int, engine: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    out_dir = Path(out)
    # DDP on the CPU needs use_cpu (accelerate's MULTI_CPU state); FSDP and DeepSpeed need it
    # off (MULTI_CPU never shards), the launcher then hides any GPU (CUDA_VISIBLE_DEVICES).
    kw = {"deepspeed": ZERO3} if engine == "zero3" else {}
    trainer, batches = train(out_dir / "run", grad_accum, batch_size=1,
                             use_cpu=engine == "ddp", **kw)
    rank = dist.get_rank()
    torch.save(batches, out_dir / f"batches_{rank}.pt")
    model = trainer.model
    head = model.policy.get_output_embeddings().weight
    info = {"wrapper": type(trainer.model_wrapped).__name__,
            "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
            "world": dist.get_world_size(), "data_processes": trainer.accelerator.num_processes,
            "head_elements_outside_forward": head.numel()}
    (out_dir / f"engine_{rank}.json").write_text(json.dumps(info))
    if engine == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(model.policy, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    elif engine == "zero3":
        full = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective
        full = full and {k[len("policy."):]: v for k, v in full.items()
                         if k.startswith("policy.")}
    else:
        full = {k: v.detach().clone() for k, v in model.policy.state_dict().items()}
    if rank == 0:
        torch.save(full, out_dir / "weights.pt")


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "ddp")
