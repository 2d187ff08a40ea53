"""Benchmark of the fused unlearning loss: forward + backward, one third of rows per kind.

Providers: naive (logits materialised, torch ops), compile (naive under torch.compile), liger
(Liger-Kernel fused linear CE twice + fused linear JSD with beta 0; optional), the registered
backends chunked / triton / cuda / cpp (via ``unlearn_loss(..., backend=name)``), floor (the
matrix products alone on whole batches: policy logits, dX and dW on all rows, reference logits on
the normal rows), chunked_floor (the chunk driver with the same chunk plan and a row pass that
does nothing: GEMMs, gathers and glue only) and rows (the Triton row kernel alone over the
driver's chunks). JSON rows go to benchmarks/results/bench_loss_<device>.json and to $OUT.

Each backend row also records: the chunk plan, peak memory in the forward, memory held between
forward and backward, peak in the backward (CUDA), the number of tensors of V x H elements or
more allocated in the backward, and on CUDA the driver's per-phase times (logits, ref_logits,
row_pass, dx, dw, glue). Repetitions scale with the time of one call, so p20 / p50 / p80 come
from at least ten samples (five with --quick).

    python benchmarks/bench_loss.py                      # the four reference shapes (GPU)
    python benchmarks/bench_loss.py --quick              # fewer repetitions; one tiny shape on CPU
    python benchmarks/bench_loss.py --device cpu --quick
    python benchmarks/bench_loss.py --shapes 4096x2048x128256 --providers triton,floor
On CPU it runs tiny shapes (a smoke test); set TRITON_INTERPRET=1 to include triton.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    device_name,
    device_slug,
    git_commit,
    peak_gib_above,
    print_table,
    time_fn,
    versions,
    write_json,
)

from fastunlearn.losses import unlearn_loss  # noqa: E402
from fastunlearn.losses.driver import plan_chunks, run_chunks  # noqa: E402
from fastunlearn.losses.options import LossOptions  # noqa: E402
from fastunlearn.losses.probe import AllocationRecorder, record_phases  # noqa: E402
from fastunlearn.losses.registry import get_backend  # noqa: E402

GPU_SHAPES = ["8192x576x49152", "8192x2048x128256", "8192x4096x128256", "32768x4096x128256"]
CPU_SHAPES = ["96x32x500", "192x64x1000"]
ALL_PROVIDERS = ["naive", "compile", "liger", "chunked", "triton", "cuda", "cpp", "floor",
                 "chunked_floor", "rows"]
BACKENDS = ("chunked", "triton", "cuda", "cpp")
MIN_SAMPLES = 10
EPS = dict(eps_forget=0.5, eps_mismatch=1.0, eps_normal=1.0)


def make_inputs(bt, h, v, dtype, device, seed=0):
    """Random head inputs generated on the device (large heads: no host round trip)."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, generator=g)
    hidden = torch.randn(bt, h, **kw).to(dtype)
    weight = (torch.randn(v, h, **kw) / h**0.5).to(dtype)
    ref_hidden = (hidden.float() + 0.1 * torch.randn(bt, h, **kw)).to(dtype)
    ref_weight = (weight.float() + (0.01 / h**0.5) * torch.randn(v, h, **kw)).to(dtype)
    labels = torch.randint(0, v, (bt,), **kw)
    kind = torch.randperm(bt, **kw) % 3  # one third of each kind
    return hidden, weight, labels, kind, ref_hidden, ref_weight


def naive_loss(hidden, weight, labels, kind, ref_hidden, ref_weight):
    """Logits materialised in the input dtype, softmax in fp32, plain torch ops."""
    logp = F.log_softmax((hidden @ weight.T).float(), dim=-1)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)
    with torch.no_grad():
        logq = F.log_softmax((ref_hidden @ ref_weight.T).float(), dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)  # KL on every row, masked below (naive)
    f, m, n = (kind == 0).float(), (kind == 1).float(), (kind == 2).float()
    return (-EPS["eps_forget"] * (nll * f).sum() / f.sum().clamp(min=1)
            + EPS["eps_mismatch"] * (nll * m).sum() / m.sum().clamp(min=1)
            + EPS["eps_normal"] * (kl * n).sum() / n.sum().clamp(min=1))


def liger_fn():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

    ce = LigerFusedLinearCrossEntropyLoss(reduction="mean")
    jsd = LigerFusedLinearJSD(jsd_beta=0.0)

    def run(hidden, weight, labels, kind, ref_hidden, ref_weight, idx):
        fi, mi, ni = idx
        return (-EPS["eps_forget"] * ce(weight, hidden[fi], labels[fi])
                + EPS["eps_mismatch"] * ce(weight, hidden[mi], labels[mi])
                + EPS["eps_normal"] * jsd(hidden[ni], weight, ref_hidden[ni], ref_weight,
                                               labels[ni]))

    return run


def floor_fn(hidden, weight, ref_hidden, ref_weight, n_normal):
    """The matrix products of the fused loss alone (gradients in the forward)."""

    def run():
        with torch.no_grad():
            z = hidden @ weight.T
            hidden_n = ref_hidden[:n_normal]
            _zr = hidden_n @ ref_weight.T
            _dx = z @ weight
            _dw = z.T @ hidden
    return run


def _no_row_pass(z, zr, labels, scale, ref_start, hc, w, bias, ref_bias, softcap):
    return torch.zeros(z.shape[0], device=z.device)


def chunked_floor_fn(hidden, weight, labels, kind, ref_hidden, ref_weight):
    """The chunk driver with a row pass that does nothing: the same plan's GEMMs and glue."""
    opts = LossOptions(**EPS)

    def run():
        with torch.no_grad():
            run_chunks(hidden, weight, labels, kind, ref_hidden, ref_weight, None, None, opts,
                       _no_row_pass)
    return run


def rows_fn(hidden, weight, labels, kind, ref_hidden):
    """The Triton row kernel alone over the driver's chunks (logits already in the workspace):
    the part of the triton provider's time that is not GEMM."""
    from fastunlearn.losses.triton_backend import triton_row_pass

    dev = hidden.device
    n, vocab = hidden.shape[0], weight.shape[0]
    n_ref = int((kind == 2).sum())
    plan = plan_chunks(n, n_ref, vocab, weight.element_size(), dev.type)
    ws = torch.randn(plan.rows, vocab, device=dev).to(weight.dtype)
    wsr = torch.randn(plan.ref_rows, vocab, device=dev).to(weight.dtype)
    y = labels.clamp(0, vocab - 1)
    coef = torch.full((n,), 1.0 / n, device=dev)
    hc = hidden.detach()[:plan.rows].contiguous()

    def run():
        for s in range(0, n, plan.rows):
            r = min(plan.rows, n - s)
            n_r = max(0, s + r - max(s, n - n_ref))
            triton_row_pass(ws[:r], wsr[:n_r] if n_r else None, y[s:s + r], coef[s:s + r],
                            r - n_r, hc[:r], weight.detach(), None, None, None)
    return run


def provider_available(name, device):
    if name in ("naive", "floor", "chunked_floor"):
        return True, ""
    if name == "rows":
        return get_backend("triton") is not None and get_backend("triton").available(
            device.type)[0], "needs the triton backend"
    if name == "compile":
        return device.type == "cuda", "cuda only (inductor compile time on cpu)"
    if name == "liger":
        try:
            import liger_kernel  # noqa: F401
        except Exception:
            return False, "liger_kernel not installed"
        return device.type == "cuda", "cuda only"
    be = get_backend(name)
    if be is None:
        return False, "backend not registered"
    return be.available(device.type)


def _one_call_ms(fn, device) -> float:
    """Time of one call (ms): sizes the repetitions so that every quantile has samples."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1000


def _allocated(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return 0


def backend_profile(p, hidden, weight, labels, kind, ref_hidden, ref_weight, device) -> dict:
    """Chunk plan, memory per phase, big allocations in the backward and phase times."""
    vocab, h_dim = weight.shape
    n_ref = int((kind == 2).sum())
    itemsize = 4 if p == "cpp" else weight.element_size()
    plan = plan_chunks(hidden.shape[0], n_ref, vocab, itemsize, device.type)
    out = {"chunk_plan": {"rows": plan.rows, "ref_rows": plan.ref_rows, "chunks": plan.chunks,
                          "workspace_mib": round(plan.workspace_bytes / 2**20, 1)}}
    gib = 2**30
    cuda = device.type == "cuda"
    base = _allocated(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with record_phases() as phases:
        loss = unlearn_loss(hidden, weight, labels, kind, ref_hidden, ref_weight, backend=p,
                            **EPS).loss
    if cuda:
        out["fwd_peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / gib
        out["saved_gib"] = (_allocated(device) - base) / gib
        torch.cuda.reset_peak_memory_stats(device)
        after_fwd = _allocated(device)
    with AllocationRecorder() as rec:
        loss.backward()
    if cuda:
        out["bwd_peak_gib"] = (torch.cuda.max_memory_allocated(device) - after_fwd) / gib
    out["bwd_allocs_ge_vh"] = len(rec.big_allocations(vocab * h_dim))
    totals = phases.totals()
    if cuda and totals:
        out["phase_ms"] = {k: round(v, 3) for k, v in totals.items()}
    return out


def run_shape(shape, providers, dtype, device, args, meta):
    bt, h, v = (int(x) for x in shape.split("x"))
    hidden, weight, labels, kind, ref_hidden, ref_weight = make_inputs(bt, h, v, dtype, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    n_normal = int((kind == 2).sum())
    idx = tuple((kind == k).nonzero().squeeze(1) for k in range(3))
    rows, naive = [], None

    def backward(loss):
        loss.backward()
        return loss.detach()

    def fwd_bwd(p):
        """A closure running forward + backward and returning the detached loss."""
        if p == "naive":
            return lambda: backward(naive_loss(hidden, weight, labels, kind, ref_hidden,
                                               ref_weight))
        if p == "compile":
            c = torch.compile(naive_loss)
            return lambda: backward(c(hidden, weight, labels, kind, ref_hidden, ref_weight))
        if p == "liger":
            fn = liger_fn()
            return lambda: backward(fn(hidden, weight, labels, kind, ref_hidden, ref_weight,
                                       idx))
        if p == "floor":
            return floor_fn(hidden, weight, ref_hidden, ref_weight, n_normal)
        if p == "rows":
            return rows_fn(hidden, weight, labels, kind, ref_hidden)
        if p == "chunked_floor":
            return chunked_floor_fn(hidden, weight, labels, kind, ref_hidden, ref_weight)
        return lambda: backward(unlearn_loss(hidden, weight, labels, kind, ref_hidden,
                                             ref_weight, backend=p, **EPS).loss)

    for p in providers:
        row = {"shape": shape, "provider": p, "dtype": str(dtype).replace("torch.", ""),
               **meta, "ms_p50": None, "ms_p20": None, "ms_p80": None, "peak_gib": None,
               "floor_ms": None, "ratio_to_floor": None, "rel_err_vs_naive": None,
               "backend": p if p in BACKENDS else None, "error": None,
               "chunk_plan": None, "fwd_peak_gib": None, "saved_gib": None,
               "bwd_peak_gib": None, "bwd_allocs_ge_vh": None, "phase_ms": None}
        ok, why = provider_available(p, device)
        if not ok:
            row["error"] = f"skipped: {why}"
            rows.append(row)
            continue
        try:
            fn = fwd_bwd(p)
            hidden.grad = weight.grad = None
            loss = fn()  # first call: compile / autotune, and the outputs for the errors
            if p not in ("floor", "chunked_floor", "rows"):
                got = (loss.float(), hidden.grad.float(), weight.grad.float())
                if p == "naive":
                    naive = got  # kept on the device for the other providers' errors
                if naive is not None:
                    row["rel_err_vs_naive"] = max(
                        float((a - b).norm() / b.norm().clamp(min=1e-30))
                        for a, b in zip(got, naive))
                del got
            hidden.grad = weight.grad = None
            row["peak_gib"] = peak_gib_above(fn, device)
            hidden.grad = weight.grad = None
            if p in BACKENDS:
                row.update(backend_profile(p, hidden, weight, labels, kind, ref_hidden,
                                           ref_weight, device))
                hidden.grad = weight.grad = None
            one_ms = _one_call_ms(fn, device)
            hidden.grad = weight.grad = None
            samples = MIN_SAMPLES // 2 if args.quick else MIN_SAMPLES
            p50, p20, p80 = time_fn(fn, device, warmup_ms=max(args.warmup_ms, one_ms),
                                    rep_ms=max(args.rep_ms, samples * 1.2 * one_ms),
                                    grad_to_none=[hidden, weight])
            row["min_samples"] = samples
            row.update(ms_p50=p50, ms_p20=p20, ms_p80=p80)
        except Exception as exc:  # one provider failing must not stop the others
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            if args.verbose:
                traceback.print_exc()
        hidden.grad = weight.grad = None
        rows.append(row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    floor = next((r["ms_p50"] for r in rows if r["provider"] == "floor"), None)
    for r in rows:
        r["floor_ms"] = floor
        if floor and r["ms_p50"]:
            r["ratio_to_floor"] = r["ms_p50"] / floor
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="comma list of BTxHxV")
    ap.add_argument("--providers", default=",".join(ALL_PROVIDERS))
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--warmup-ms", type=float, default=None)
    ap.add_argument("--rep-ms", type=float, default=None)
    ap.add_argument("--out-name", default="", help="suffix of the JSON file name")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shapes = (args.shapes.split(",") if args.shapes
              else (GPU_SHAPES if device.type == "cuda"
                    else CPU_SHAPES[:1] if args.quick else CPU_SHAPES))
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    args.warmup_ms = args.warmup_ms or (5 if args.quick else 25)
    args.rep_ms = args.rep_ms or (30 if args.quick else 100)
    providers = [p for p in args.providers.split(",") if p]
    meta = {"device": device_name(device), **versions(), "commit": git_commit()}
    suffix = f"_{args.out_name}" if args.out_name else ""
    name = f"bench_loss_{device_slug(device)}{suffix}.json"
    rows = []
    for shape in shapes:
        try:
            rows += run_shape(shape, providers, dtype, device, args, meta)
        except Exception as exc:  # e.g. out of memory building the inputs
            rows.append({"shape": shape, "provider": "all", **meta,
                         "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]})
        paths = write_json(rows, name)  # after every shape: partial results survive timeouts
        print_table([r for r in rows if r["shape"] == shape],
                    ["shape", "provider", "ms_p50", "ms_p20", "ms_p80", "peak_gib",
                     "bwd_allocs_ge_vh", "ratio_to_floor", "rel_err_vs_naive", "error"])
        sys.stdout.flush()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("wrote", ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()
