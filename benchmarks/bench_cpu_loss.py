"""CPU benchmark of the fused unlearning loss: naive (reference) vs chunked vs cpp, fp32 fwd+bwd.

Timing with pytest-benchmark; peak memory in a fresh subprocess per provider (VmHWM, reset just
before the call, minus the RSS once the inputs exist: the memory the loss itself needs,
gradients included).

    # the issue's head shape (BT 1024, H 576, V 49152)
    # -> benchmarks/results/cpu_loss_<date>.json
    python benchmarks/bench_cpu_loss.py
    # plain pytest-benchmark run (timing only)
    pytest benchmarks/bench_cpu_loss.py --benchmark-only

Environment: FASTUNLEARN_BENCH_SHAPE="BT,H,V" overrides the shape; FASTUNLEARN_BENCH_ROUNDS.
Inputs: fp32, kinds forget / mismatch / normal in equal parts, every row valid (no ignored rows),
a separate reference (hidden + noise, head + noise).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# cpp_aten: the cpp backend with its GEMMs forced through at::mm (MKL), the same GEMM engine as
# chunked: isolates what the fused row pass buys from what oneDNN's GEMMs buy.
PROVIDERS = ("naive", "chunked", "cpp", "cpp_aten")
BACKEND_OF = {"naive": "reference", "chunked": "chunked", "cpp": "cpp", "cpp_aten": "cpp"}


def bench_shape() -> tuple[int, int, int]:
    s = os.environ.get("FASTUNLEARN_BENCH_SHAPE", "1024,576,49152")
    bt, h, v = (int(x) for x in s.split(","))
    return bt, h, v


def make_inputs(bt: int, h: int, v: int, seed: int = 0):
    """fp32 inputs created directly in fp32 (no transient fp64 copies that would skew peak RSS)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(bt, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h**0.5
    labels = torch.randint(0, v, (bt,), generator=g)
    kind = torch.arange(bt) % 3
    ref_hidden = hidden + 0.3 * torch.randn(bt, h, generator=g)
    ref_weight = weight + 0.05 * torch.randn(v, h, generator=g)
    return hidden, weight, labels, kind, ref_hidden, ref_weight


def run_once(provider, inputs):
    """One forward + backward; returns the LossOutput (gradients land in .grad of the leaves)."""
    from fastunlearn.losses import unlearn_loss

    hidden, weight, labels, kind, ref_hidden, ref_weight = inputs
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    ext = None
    if provider.startswith("cpp"):
        from fastunlearn.losses import cpp_backend

        ext = cpp_backend.load()
        engine = ext.gemm_engine()
        ext.set_gemm("aten" if provider == "cpp_aten" else engine)
    try:
        out = unlearn_loss(h, w, labels, kind, ref_hidden, ref_weight,
                           backend=BACKEND_OF[provider])
        out.loss.backward()
    finally:
        if ext is not None:
            ext.set_gemm(engine)
    return out, h.grad, w.grad


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(*bench_shape())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_cpu_loss_fwd_bwd(benchmark, provider, inputs):
    rounds = int(os.environ.get("FASTUNLEARN_BENCH_ROUNDS", "3"))
    if provider.startswith("cpp"):
        from fastunlearn.losses import cpp_backend

        benchmark.extra_info["gemm_engine"] = (
            "aten" if provider == "cpp_aten" else cpp_backend.gemm_engine())  # builds untimed
    bt, h, v = bench_shape()
    benchmark.extra_info.update(provider=provider, backend=BACKEND_OF[provider], BT=bt, H=h, V=v,
                                dtype="float32", gemm_gflop=gemm_gflop(bt, h, v))
    out, _, _ = benchmark.pedantic(run_once, args=(provider, inputs), rounds=rounds,
                                   warmup_rounds=1, iterations=1)
    assert out.backend == BACKEND_OF[provider]


def gemm_gflop(bt, h, v):
    """GEMM floor: logits + dX + dW for every row, reference logits for the normal third."""
    n_normal = (bt + 2) // 3
    return (3 * 2 * bt * h * v + 2 * n_normal * h * v) / 1e9


_PEAK_SCRIPT = r"""
import gc, json, sys
import torch
sys.path.insert(0, {root!r})
from benchmarks.bench_cpu_loss import make_inputs, run_once
provider = {provider!r}
if provider.startswith("cpp"):
    from fastunlearn.losses import cpp_backend
    cpp_backend.load()
# warm-up on a tiny problem: lazy imports (every optional backend), thread pools, GEMM kernels
run_once(provider, make_inputs(24, 8, 40))
inputs = make_inputs({bt}, {h}, {v})
gc.collect()
def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
# reset the peak-RSS mark (VmHWM) so that input creation does not count
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
base = status_mb("VmRSS")
out, gh, gw = run_once(provider, inputs)
peak = status_mb("VmHWM")
print(json.dumps(dict(provider=provider, base_rss_mb=base, peak_rss_mb=peak, hwm_reset=reset,
                      loss=float(out.loss.detach()), grad_w_abs_sum=float(gw.abs().sum()),
                      grad_h_abs_sum=float(gh.abs().sum()))))
"""


def peak_memory(provider, bt, h, v) -> dict:
    """Peak RSS (VmHWM, reset before the call) above the RSS with the inputs, fresh interpreter.

    This includes the gradients the call returns (dW (V, H) fp32 and dX) and every temporary.
    """
    code = _PEAK_SCRIPT.format(root=str(ROOT), provider=provider, bt=bt, h=h, v=v)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if not res["hwm_reset"]:
        res["note"] = "could not reset VmHWM: the figure is an upper bound"
    res["peak_above_inputs_mb"] = res["peak_rss_mb"] - res["base_rss_mb"]
    return res


def main() -> int:
    bt, h, v = bench_shape()
    with tempfile.TemporaryDirectory() as tmp:
        bench_json = Path(tmp) / "bench.json"
        rc = pytest.main([str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider",
                          "--benchmark-only", f"--benchmark-json={bench_json}",
                          "--benchmark-columns=min,median,max,rounds"])
        if rc != 0:
            return int(rc)
        bench = json.loads(bench_json.read_text())
    timing = {}
    for b in bench["benchmarks"]:
        p = b["extra_info"]["provider"]
        timing[p] = {k: b["stats"][k] for k in ("min", "median", "max", "mean", "stddev",
                                                  "rounds")}
    memory = {p: peak_memory(p, bt, h, v) for p in PROVIDERS}
    gf = gemm_gflop(bt, h, v)
    for p in PROVIDERS:
        timing[p]["gemm_gflop_per_s"] = gf / timing[p]["median"]
    result = {
        "shape": {"BT": bt, "H": h, "V": v}, "dtype": "float32", "pass": "forward+backward",
        "inputs": "kinds in equal thirds, no ignored rows, separate reference",
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "load_avg_at_end": os.getloadavg()},
        "gemm_floor_gflop": gf,
        "time_s": timing,
        "peak_memory_above_inputs_mb": {p: memory[p]["peak_above_inputs_mb"] for p in PROVIDERS},
        "memory_detail": memory,
        "speedup_cpp_vs_chunked": timing["chunked"]["median"] / timing["cpp"]["median"],
        "speedup_cpp_aten_vs_chunked": (timing["chunked"]["median"]
                                        / timing["cpp_aten"]["median"]),
        "memory_ratio_naive_over_cpp": (memory["naive"]["peak_above_inputs_mb"]
                                        / memory["cpp"]["peak_above_inputs_mb"]),
        "targets": {"speedup_vs_chunked": 1.3, "memory_ratio_vs_naive": 2.0},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "benchmark_machine_info": bench.get("machine_info", {}).get("cpu", {}),
    }
    tag = "" if (bt, h, v) == (1024, 576, 49152) else f"_{bt}x{h}x{v}"
    out = ROOT / "benchmarks" / "results" / f"cpu_loss_{datetime.date.today():%Y%m%d}{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("time_s", "peak_memory_above_inputs_mb",
                                             "speedup_cpp_vs_chunked",
                                             "speedup_cpp_aten_vs_chunked",
                                             "memory_ratio_naive_over_cpp")}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
