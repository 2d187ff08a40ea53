"""Plot a bench_loss JSON: milliseconds (p50, p20-p80 bars) and peak memory per provider.

    python benchmarks/plot_bench.py benchmarks/results/bench_loss_nvidia_h200.json [out.png]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


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
        mem = [by[p]["peak_gib"] or 0 for p in names]
        axes[1][j].bar(names, mem, color="tab:orange")
        axes[1][j].set_ylabel("peak GiB above inputs")
        for ax in (axes[0][j], axes[1][j]):
            ax.tick_params(axis="x", rotation=45)
    device = rows[0].get("device", "") if rows else ""
    fig.suptitle(f"fused unlearning loss, {device}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print("wrote", out)


if __name__ == "__main__":
    main()
