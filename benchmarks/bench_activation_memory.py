"""Activation memory of one trunk forward: bytes saved for backward per token and layer.

    python benchmarks/bench_activation_memory.py            # CPU, a few seconds
    python benchmarks/bench_activation_memory.py --device cuda

Counts every tensor autograd saves during a forward of the decoder stack (each storage once,
parameters and their autocast copies excluded by differencing two sequence lengths) for the
stock transformers modules and for ``model.lean_layers`` (fastunlearn/lean_layers.py), with fp32
weights (bf16 autocast or fp32) and with bf16 weights (``model.dtype=bfloat16``), on
2-layer versions of the SmolLM2-135M and Llama-3.2-1B architectures (per-layer figures do not
depend on the depth). ``projected_gib`` multiplies by the full depth and the 3 x 8 x 1024 tokens
of the GPU step that bench_train_step.py measures: an estimate of the activation part of that
step's peak memory, not a measurement of it. On CPU, SDPA's saved tensors may differ slightly
from a GPU kernel's.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train_step import MODELS, git_commit  # noqa: E402

STEP_TOKENS = 3 * 8 * 1024


def bytes_per_token_layer(model, device, autocast_dtype, layers: int) -> float:
    from fastunlearn.lean_layers import activation_bytes_per_token

    g = torch.Generator().manual_seed(0)
    totals = []
    for t in (128, 256):
        ids = torch.randint(3, 1000, (2, t), generator=g).to(device)
        totals.append(activation_bytes_per_token(model, ids, autocast_dtype, model.model)
                      * ids.numel())
    return (totals[1] - totals[0]) / (2 * 128) / layers


def main(argv=None) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastunlearn.lean_layers import use_lean_layers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="JSON path (default "
                    "benchmarks/results/activation_memory_<device>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for name in ("smollm2-135m", "llama-3.2-1b"):
        cfg = dict(MODELS[name])
        depth, cfg["num_hidden_layers"] = cfg["num_hidden_layers"], 2
        torch.manual_seed(0)
        stock = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).to(device)
        stock_bf16 = copy.deepcopy(stock).to(torch.bfloat16)  # model.dtype=bfloat16
        models = {"stock": {"fp32": stock, "bf16": stock_bf16}, "lean": {}}
        for weights, model in models["stock"].items():
            models["lean"][weights] = copy.deepcopy(model)
            use_lean_layers(models["lean"][weights])
        for precision, dtype, weights in (("bf16 autocast", torch.bfloat16, "fp32"),
                                          ("fp32", None, "fp32"),
                                          ("bf16 weights", torch.bfloat16, "bf16")):
            for impl in ("stock", "lean"):
                b = bytes_per_token_layer(models[impl][weights], device, dtype, 2)
                rows.append({"model": name, "precision": precision, "impl": impl,
                             "bytes_per_token_layer": round(b),
                             "projected_gib": round(b * depth * STEP_TOKENS / 2**30, 2),
                             "device": args.device, "torch": torch.__version__,
                             "commit": git_commit()})
                print(f"{name:14s} {precision:14s} {impl:6s} {b:9.0f} B/token/layer  "
                      f"projected {rows[-1]['projected_gib']:6.2f} GiB at 3x8x1024 tokens")
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"activation_memory_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], out.name).write_text(out.read_text())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
