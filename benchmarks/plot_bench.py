"""Plot a bench_loss JSON: milliseconds (p50, p20-p80 bars) and memory per provider (peak of
the call; for the backends also forward peak, held between passes, backward peak).

    python benchmarks/plot_bench.py benchmarks/results/bench_loss_nvidia_h200.json [out.png]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MEMORY_KEYS = ("peak_gib", "fwd_peak_gib", "saved_gib", "bwd_peak_gib")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: plot_bench.py BENCH_JSON [OUT_PNG]")
    src = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else src.with_suffix(".png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in json.loads(src.read_text()) if r.get("ms_p50") is not None]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(4 * len(shapes), 6), squeeze=False)
    for j, shape in enumerate(shapes):
        by = {r["provider"]: r for r in rows if r["shape"] == shape}
        names = [p for p in providers if p in by]
        ms = [by[p]["ms_p50"] for p in names]
        err = [[by[p]["ms_p50"] - by[p]["ms_p20"] for p in names],
               [by[p]["ms_p80"] - by[p]["ms_p50"] for p in names]]
        axes[0][j].bar(names, ms, yerr=err)
        axes[0][j].set_title(shape)
        axes[0][j].set_ylabel("ms (fwd+bwd)")
        # peak of the whole call, and where the backends' memory goes (forward peak, held
        # between forward and backward, backward peak), side by side where recorded
        keys = [k for k in MEMORY_KEYS if any(by[p].get(k) for p in names)]
        width = 0.8 / max(len(keys), 1)
        for i, key in enumerate(keys):
            xs = [n + (i - (len(keys) - 1) / 2) * width for n in range(len(names))]
            axes[1][j].bar(xs, [by[p].get(key) or 0 for p in names], width, label=key)
        axes[1][j].set_xticks(range(len(names)), names)
        axes[1][j].set_ylabel("GiB above inputs")
        if keys:
            axes[1][j].legend(fontsize=7)
        for ax in (axes[0][j], axes[1][j]):
            ax.tick_params(axis="x", rotation=45)
    device = rows[0].get("device", "") if rows else ""
    fig.suptitle(f"fused unlearning loss, {device}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print("wrote", out)


if __name__ == "__main__":
    main()
