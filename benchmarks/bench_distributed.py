"""Sharded unlearning step (FSDP2): step time, tokens / s and peak memory per rank.

    python benchmarks/bench_distributed.py --worlds 1,2            # CPU: gloo, 2 threads/rank
    python benchmarks/bench_distributed.py --worlds 1,2,4,8 --device cuda --hidden 2048 \\
        --layers 16 --vocab 128256 --batch 4 --seq 512             # one node, NCCL

Each world size is launched the way users launch runs: ``torchrun --standalone
--nproc_per_node=W`` re-running this file as a worker; world size 1 is the same code without a
process group (the plain single-process step). One step = ``batch`` rows of each kind (forget,
mismatch, normal) of ``seq`` random tokens, the first quarter of each row prompt, split over the
ranks (the global batch does not change with W), a frozen copy as reference, AdamW. Every rank
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
import time
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
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastunlearn import distributed as fdist
    from fastunlearn.batching import UnlearnBatcher
    from fastunlearn.models import frozen_copy
    from fastunlearn.unlearn_step import UnlearnStep, accumulate, clip_grad_norm, prepare, shard

    torch.set_num_threads(args.threads)
    device = fdist.init_from_env(args.device)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 64) if args.hidden >= 64 else 2,
                      max_position_embeddings=4 * args.seq, tie_word_embeddings=False,
                      pad_token_id=1)
    policy = LlamaForCausalLM(cfg).to(device)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    step = UnlearnStep(policy, frozen_copy(policy), backend=args.backend, compute_dtype=compute)
    if fdist.world_size() > 1:
        shard(step)
    step.train()
    params = [p for p in step.policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    data = fdist.RankBatcher(UnlearnBatcher(synthetic_rows(args), args.batch, 1, seed=0,
                                            bucket=False))
    times, tokens = [], 0
    for i in range(args.steps + 1):
        batch = data.next()
        fdist.barrier()
        start = time.perf_counter()
        accumulate(step, [prepare(batch, device, step.policy)], (0.5, 1.0, 1.0))
        clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        fdist.barrier()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
            tokens += batch.real_tokens
    global_tokens = int(fdist.all_reduce_sum(torch.tensor([float(tokens)]))[0])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    med = statistics.median(times)
    print(json.dumps({"world": fdist.world_size(), "rank": fdist.rank(), "device": str(device),
                      "step_s": round(med, 5),
                      "tokens_per_s": round(global_tokens / sum(times), 1),
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
