"""Sharded unlearning step (FSDP2): step time, tokens / s and peak memory per rank.

    python benchmarks/bench_distributed.py --worlds 1,2            # CPU: gloo, 2 threads/rank
    python benchmarks/bench_distributed.py --worlds 1,2,4,8 --device cuda --hidden 2048 \\
        --layers 16 --vocab 128256 --batch 4 --seq 512             # one node, NCCL

Each world size is launched the way users launch runs: ``torchrun --standalone
--nproc_per_node=W`` re-running this file as a worker; world size 1 is the same code without a
process group (the plain single-process step). Every worker runs the Trainer (its setup steps,
then ``train_step``). One step = ``batch`` rows of each kind (forget, mismatch, normal) of
``seq`` random tokens, the first quarter of each row prompt, split over the ranks (the global
batch does not change with W), a frozen copy as reference, gradient clipping, AdamW; bf16
compute on CUDA (fp32 master weights), fp32 on CPU. Every rank
prints one JSON line: median step seconds, global tokens / s, peak memory (CUDA: max allocated;
CPU: the process's peak resident set, which includes the Python runtime).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="1,2", help="comma-separated world sizes")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2, help="rows of each kind per global step")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    ap.add_argument("--backend", default="auto", help="loss backend")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def synthetic_rows(args):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    prompt = args.seq // 4
    kinds = []
    for kind in range(3):
        rows = []
        for _ in range(max(args.batch, 4)):
            ids = torch.randint(6, args.vocab, (args.seq,), generator=g).tolist()
            rows.append(SimpleNamespace(input_ids=ids, labels=[-100] * prompt + ids[prompt:],
                                        kind=kind))
        kinds.append(rows)
    return kinds


def worker(args) -> None:
    """One rank: the Trainer, set up by its own setup steps (meta build and rank-0 load,
    sharding, rank shares, optimizer after sharding), timed over ``train_step``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastunlearn import distributed as fdist
    from fastunlearn.config import RunConfig
    from fastunlearn.trainer import Trainer

    torch.set_num_threads(args.threads)
    device = fdist.init_from_env(args.device)
    mcfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=max(1, args.hidden // 64) if args.hidden >= 64 else 2,
                       max_position_embeddings=4 * args.seq, tie_word_embeddings=False,
                       pad_token_id=1)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(mcfg) if fdist.is_main() else None  # rank 0 holds the weights
    cfg = RunConfig()
    t = cfg.train
    t.device, t.batch_size, t.lr, t.max_grad_norm = device.type, args.batch, 1e-5, 1.0
    t.steps, t.bucket_by_length, t.cpu_linear = 10**6, False, "torch"
    t.check_finite_every, t.max_normal_kl, t.max_mismatch_nll = 0, None, None
    cfg.loss.backend = args.backend
    cfg.eval.enabled, cfg.save_model = False, False
    trainer = Trainer(cfg, model=policy, progress=False)
    trainer.setup(rows_by_kind=synthetic_rows(args), pad_id=1)
    times, tokens = [], 0
    for i in range(args.steps + 1):
        fdist.barrier()
        row = trainer.train_step()
        if i:  # the first step warms up
            times.append(row["step_seconds"])
            tokens += row["tokens"]  # all ranks' tokens
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    med = statistics.median(times)
    print(json.dumps({"world": fdist.world_size(), "rank": fdist.rank(), "device": str(device),
                      "backend": trainer.backend, "step_s": round(med, 5),
                      "tokens_per_s": round(tokens / sum(times), 1),
                      "peak_mib": round(peak / 2**20, 1)}), flush=True)
    fdist.shutdown()


def launch(args, world: int) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={world}", __file__, "--worker"] + sys.argv[1:]
    if world == 1:
        cmd = [sys.executable, __file__, "--worker"] + sys.argv[1:]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.call(cmd, env=env)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    for world in (int(w) for w in args.worlds.split(",")):
        code = launch(args, world)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
