"""Where the CPU unlearning step spends its time: torch.profiler over the benchmark's own step.

    python benchmarks/profile_cpu_step.py                       # ours and paper, SmolLM2-135M 2x128
    python benchmarks/profile_cpu_step.py --impls ours+cached+lean --top 40

Each impl is built exactly as ``bench_train_step.py`` builds it (same model, rows, trainer setup,
paper step), run for ``--warmup`` steps, then profiled for ``--steps`` steps. The top operators
by self CPU time are printed and written to ``benchmarks/results/profile_cpu_step.json`` / ``.txt``
(``--out`` changes the stem). Self time is per operator excluding its children, so the rows add up
to the step; ``aten::mm`` / ``aten::addmm`` rows are also broken down by input shape.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as bench  # noqa: E402
from common import cpu_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")


def _row(e, total_us: float) -> dict:
    return {"name": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
            "self_pct": round(100 * e.self_cpu_time_total / total_us, 1),
            "cpu_total_ms": round(e.cpu_time_total / 1e3, 2),
            **({"input_shapes": str(e.input_shapes)} if e.input_shapes else {})}


def profile_impl(model_name: str, b: int, t: int, impl: str, warmup: int, steps: int,
                 top: int) -> dict:
    _row_fields, step = bench.build_config(model_name, b, t, impl, "cpu")
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            w0, c0 = time.perf_counter(), time.process_time()
            with record_function("step"):
                step()
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    events = [e for e in prof.key_averages() if e.key != "step"]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    gemm = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in GEMM_OPS]
    gemm.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"impl": impl, "model": model_name, "B": b, "T": t, "steps": steps,
            "wall_s_per_step": [round(x, 3) for x in wall],
            "cpu_s_per_step": [round(x, 3) for x in cpu],
            "profiled_self_cpu_s_per_step": round(total / 1e6 / steps, 3),
            "top_self_cpu": [_row(e, total) for e in ranked[:top]],
            "top_gemm_shapes": [_row(e, total) for e in gemm[:top]],
            "table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(bench.MODELS))
    ap.add_argument("--shape", default="2x128", help="BxT (rows of each kind x tokens)")
    ap.add_argument("--impls", default="ours,paper", help="comma list (bench_train_step's names)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=str(RESULTS / "profile_cpu_step"),
                    help="output stem: writes <stem>.json and <stem>.txt")
    args = ap.parse_args(argv)
    try:
        b, t = (int(x) for x in args.shape.lower().split("x"))
        impls = args.impls.split(",")
        for impl in impls:
            bench.parse_impl(impl)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    torch.set_num_threads(args.threads)
    meta = {"cpu_model": cpu_model(), "threads": args.threads, "torch": torch.__version__,
            "commit": bench.git_commit(), "load_average_before": list(os.getloadavg())}
    runs, text = [], []
    for impl in impls:
        run = profile_impl(args.model, b, t, impl, args.warmup, args.steps, args.top)
        table = run.pop("table")
        runs.append({**run, **meta, "load_average_after": list(os.getloadavg())})
        head = (f"== {impl}: {args.model} {b}x{t}, wall {run['wall_s_per_step']} s, "
                f"CPU {run['cpu_s_per_step']} s per step, {meta['cpu_model']}, "
                f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}")
        gemms = "\n".join(f"  {r['self_cpu_ms']:>9.1f} ms {r['self_pct']:>5.1f}% "
                          f"{r['calls']:>5}x {r['name']} {r.get('input_shapes', '')}"
                          for r in run["top_gemm_shapes"])
        text.append(f"{head}\n{table}\nGEMMs by input shape:\n{gemms}\n")
        print(text[-1], flush=True)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    stem.with_suffix(".txt").write_text("\n".join(text))
    print(f"wrote {stem.with_suffix('.json')} and .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
