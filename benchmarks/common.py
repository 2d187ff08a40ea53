"""Timing harness shared by the benchmarks: medians and percentiles, peak memory, metadata."""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The processor for rows measured on a CPU: /proc/cpuinfo's model name, family, model and
    stepping, and the vector extensions that decide GEMM speed (virtual machines often report
    only "AMD EPYC"), e.g. "AMD EPYC (family 25 model 17 stepping 1; avx512f avx512_bf16)"."""
    fields, flags = {}, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if not key:
                    break  # the first processor is enough
                fields.setdefault(key, value)
                if key == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    if "model name" not in fields:
        import platform

        return platform.processor() or platform.machine()
    ident = " ".join(f"{k.split()[-1]} {fields[k]}" for k in ("cpu family", "model", "stepping")
                     if k in fields)
    isa = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    detail = "; ".join(x for x in (ident, isa) if x)
    return f"{fields['model name']} ({detail})" if detail else fields["model name"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()})"


def device_slug(device: torch.device) -> str:
    name = device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = None
    return {"torch": torch.__version__, "triton": tv}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def time_fn(fn, device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
            grad_to_none=None) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of fn(). CUDA: triton.testing.do_bench (CUDA events, L2
    flushed between runs); CPU: perf_counter over a few runs."""
    if device.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                     quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    fn()  # warm-up
    times = []
    t_end = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    qs = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return statistics.median(times), qs[1], qs[7]


def peak_gib_above(fn, device: torch.device) -> float | None:
    """Peak memory allocated while fn() runs, above what was allocated before (GiB)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def write_json(rows: list[dict], name: str) -> list[Path]:
    """Write rows to benchmarks/results/<name> and to $OUT/<name> when $OUT is set."""
    paths = [RESULTS_DIR / name]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / name)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(rows, indent=1))
    return paths


def print_table(rows: list[dict], cols: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c)
              for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)))
