"""Compare training curves of finished runs: forget NLL, mismatch NLL and normal KL per step.

    python benchmarks/plot_runs.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Each RUN_DIR is a ``fastunlearn run --out`` folder (its ``metrics.jsonl`` is read). Per-step
values of a training batch are noisy, so each curve is a moving average over 8 steps with the
raw values drawn faintly behind it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TERMS = (("forget_nll", "forget NLL (ascent: up)"), ("mismatch_nll", "mismatch NLL"),
         ("normal_kl", "normal KL to the reference"))
WINDOW = 8


def read_run(spec: str) -> tuple[str, list[dict]]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise ValueError(f"expected LABEL=RUN_DIR, got {spec!r}")
    metrics = Path(path) / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{metrics}: no such file")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{metrics}: no steps recorded")
    return label, rows


def moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1): i + 1]
        out.append(sum(part) / len(part))
    return out


def plot(runs: list[tuple[str, list[dict]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TERMS), figsize=(5 * len(TERMS), 3.6))
    for ax, (key, title) in zip(axes, TERMS):
        for i, (label, rows) in enumerate(runs):
            steps = [r["step"] for r in rows]
            values = [r[key] for r in rows]
            color = f"C{i}"
            ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(steps, moving_average(values, WINDOW), color=color, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: plot_runs.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]", file=sys.stderr)
        return 2
    try:
        runs = [read_run(spec) for spec in argv[1:]]
    except ValueError as exc:
        print(f"plot_runs: {exc}", file=sys.stderr)
        return 2
    plot(runs, Path(argv[0]))
    print(f"wrote {argv[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
