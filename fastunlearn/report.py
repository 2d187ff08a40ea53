"""Run report: ``summary.json``, ``summary.md`` and PNG plots (matplotlib, Agg canvas).

``write_report(out_dir, summary, metrics_rows)`` writes

* ``summary.json``: ``summary`` as is (indent 2; non-finite floats become null so any JSON
  parser reads it; non-JSON objects such as paths become strings);
* ``summary.md``: run facts, a before / after table of every numeric metric with its delta,
  the evaluations during training, sample generations side by side, links to the plots;
* ``plots/losses.png`` (each loss term per training step), ``plots/harm_utility.png``
  (harmful / refusal rate and normal similarity against steps), ``plots/kl.png`` (KL against
  steps), ``plots/degeneration.png``; a plot whose data is absent is skipped.

It never needs a display: figures are drawn on an Agg canvas, without touching pyplot's
global backend.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

LOSS_TERMS = ("loss", "forget_nll", "mismatch_nll", "normal_kl")
HARM_KEYS = ("harmful_rate", "harmful_rate_forget", "refusal_rate", "refusal_rate_forget",
             "xstest_over_refusal")
UTILITY_KEYS = ("normal_similarity_cosine", "normal_rouge_l")
DEGEN_KEYS = ("degenerate_rate_harmful", "degenerate_rate_normal", "distinct_2_harmful",
              "distinct_2_normal")
_SKIP = {"step", "samples"}


def _clean(x):
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, unknown objects -> str."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    try:  # numpy / torch scalars
        v = x.item()
        return _clean(v)
    except (AttributeError, ValueError, TypeError):
        return str(x)


def _num(x) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(x) -> str:
    v = _num(x)
    if v is None:
        return "-" if x is None else str(x)
    if v == int(v) and abs(v) < 1e12:
        return str(int(v))
    return f"{v:.4g}"


def _cell(text: str, limit: int = 280) -> str:
    """Markdown table cell: one line, pipes escaped, clipped; empty / blank text is named."""
    raw = str(text)
    if raw and not raw.strip():  # the collapse mode of gradient ascent: make it visible
        return f"*(whitespace only, {len(raw)} chars)*"
    s = " ".join(raw.split())
    if len(s) > limit:
        s = s[:limit - 1] + "…"
    s = s.replace("|", "\\|").replace("<", "&lt;")
    return s if s else "*(empty)*"


def _evals(summary: dict) -> list[dict]:
    evals = [e for e in summary.get("evals") or [] if isinstance(e, dict)]
    if evals:
        return sorted(evals, key=lambda e: _num(e.get("step")) or 0.0)
    out = []  # no evals list: fall back to before / after
    if isinstance(summary.get("before"), dict):
        out.append({"step": 0, **summary["before"]})
    if isinstance(summary.get("after"), dict):
        out.append({"step": summary.get("steps") or 0, **summary["after"]})
    return out


# --------------------------------------------------------------------------- markdown
def _metric_table(before: dict, after: dict) -> list[str]:
    keys = []
    for d in (before, after):
        for k, v in d.items():
            if k not in _SKIP and k not in keys and not isinstance(v, (dict, list)):
                keys.append(k)
    if not keys:
        return ["*(no metrics)*", ""]
    lines = ["| metric | before | after | delta |", "|---|---:|---:|---:|"]
    for k in keys:
        b, a = before.get(k), after.get(k)
        nb, na = _num(b), _num(a)
        delta = f"{na - nb:+.4g}" if nb is not None and na is not None else "-"
        lines.append(f"| {k} | {_fmt(b)} | {_fmt(a)} | {delta} |")
    return lines + [""]


def _samples_section(before: dict, after: dict) -> list[str]:
    sb = [s for s in before.get("samples") or [] if isinstance(s, dict)]
    sa = [s for s in after.get("samples") or [] if isinstance(s, dict)]
    if not sb and not sa:
        return []
    after_by = {(s.get("kind"), s.get("prompt")): s.get("answer", "") for s in sa}
    before_by = {(s.get("kind"), s.get("prompt")): s.get("answer", "") for s in sb}
    order = list(dict.fromkeys([(s.get("kind"), s.get("prompt")) for s in sb + sa]))
    lines = ["## Sample generations", "", "| kind | prompt | before | after |",
             "|---|---|---|---|"]
    for kind, prompt in order:
        b = before_by.get((kind, prompt))
        a = after_by.get((kind, prompt))
        lines.append(f"| {_cell(kind or '', 20)} | {_cell(prompt or '', 160)} | "
                     f"{'-' if b is None else _cell(b)} | {'-' if a is None else _cell(a)} |")
    return lines + [""]


def _eval_data_section(before: dict, after: dict) -> list[str]:
    """Which prompt / pair sets the metrics were measured on (``Evaluator.describe``)."""
    data = after.get("eval_data") or before.get("eval_data")
    if not isinstance(data, dict) or not data:
        return []
    lines = ["## Evaluation data", "", "Held-out data only (never trained on).", "",
             "| metric | measured on (count) |", "|---|---|"]
    lines += [f"| {_cell(str(k), 40)} | {_cell(str(v), 120)} |" for k, v in data.items()]
    return lines + [""]


def _during_section(evals: list[dict]) -> list[str]:
    if len(evals) < 3:
        return []
    cols = [k for k in ("forget_nll", "normal_kl") + HARM_KEYS + UTILITY_KEYS
            + ("degenerate_rate_harmful", "degenerate_rate_normal")
            if any(_num(e.get(k)) is not None for e in evals)]
    lines = ["## Evaluations during training", "",
             "| step | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    for e in evals:
        lines.append(f"| {_fmt(e.get('step'))} | " + " | ".join(_fmt(e.get(k)) for k in cols)
                     + " |")
    return lines + [""]


def _markdown(summary: dict, plots: list[str]) -> str:
    before = summary.get("before") if isinstance(summary.get("before"), dict) else {}
    after = summary.get("after") if isinstance(summary.get("after"), dict) else {}
    facts = [("model", summary.get("model")), ("recipe", summary.get("recipe")),
             ("backend", summary.get("backend")), ("optimizer", summary.get("optimizer")),
             ("steps", summary.get("steps")),
             ("wall seconds", summary.get("wall_seconds")),
             ("tokens / s", summary.get("tokens_per_second")),
             ("stopped early", summary.get("stopped_early"))]
    if summary.get("heldout_source"):
        facts.append(("held-out data", summary.get("heldout_source")))
    lines = [f"# fastunlearn report: {summary.get('recipe') or 'run'}", ""]
    lines += [f"- **{k}**: {_fmt(v) if _num(v) is not None else (v if v is not None else '-')}"
              for k, v in facts]
    lines += ["", "## Before / after", ""]
    lines += _metric_table(before, after)
    lines += _eval_data_section(before, after)
    lines += _during_section(_evals(summary))
    lines += _samples_section(before, after)
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    cfg = summary.get("config")
    if cfg:
        lines += ["## Config", "", "```json", json.dumps(_clean(cfg), indent=2), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        x, y = _num(r.get("step")), _num(r.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def _save_panels(path: Path, title: str, panels: list[tuple[str, list]]) -> bool:
    """panels: [(ylabel, [(label, xs, ys), ...])]; empty series are dropped. False: nothing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(yl, [s for s in series if s[1]]) for yl, series in panels]
    panels = [(yl, series) for yl, series in panels if series]
    if not panels:
        return False
    fig = Figure(figsize=(6.4, 2.6 * len(panels)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, series) in zip(axes, panels):
        for label, xs, ys in series:
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1 or series[0][0] != ylabel:
            ax.legend(fontsize=8)
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png")
    return True


def _plots(out_dir: Path, summary: dict, rows: list[dict]) -> list[str]:
    pdir = out_dir / "plots"
    evals = _evals(summary)
    made = []
    losses = [(k, [(k, *_series(rows, k))]) for k in LOSS_TERMS]
    if _save_panels(pdir / "losses.png", "loss terms per step", losses):
        made.append("plots/losses.png")
    harm = [("rate", [(k, *_series(evals, k)) for k in HARM_KEYS]),
            ("normal similarity", [(k, *_series(evals, k)) for k in UTILITY_KEYS])]
    if _save_panels(pdir / "harm_utility.png", "harmfulness and utility vs step", harm):
        made.append("plots/harm_utility.png")
    kl = [("KL(ref || cur)", [("train batch", *_series(rows, "normal_kl")),
                              ("held-out eval", *_series(evals, "normal_kl"))])]
    if _save_panels(pdir / "kl.png", "normal KL vs step", kl):
        made.append("plots/kl.png")
    degen = [("degeneration", [(k, *_series(evals, k)) for k in DEGEN_KEYS])]
    if _save_panels(pdir / "degeneration.png", "degenerate outputs / distinct-2 vs step", degen):
        made.append("plots/degeneration.png")
    return made


def write_report(out_dir: Path, summary: dict, metrics_rows: list[dict]) -> None:
    """Write summary.json, summary.md and plots/*.png into ``out_dir`` (created if needed).

    ``summary``: steps, wall_seconds, backend, tokens_per_second, config, model, recipe,
    before / after (``Evaluator.run`` dicts), evals (list of {"step", **metrics}),
    stopped_early; any may be missing. ``metrics_rows``: per-step training rows (step, loss,
    forget_nll, mismatch_nll, normal_kl, lr, grad_norm, tokens_per_s); may be empty.
    """
    if not isinstance(summary, dict):
        raise ValueError(f"write_report: summary must be a dict, got {type(summary).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in (metrics_rows or []) if isinstance(r, dict)]
    (out_dir / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n")
    plots = _plots(out_dir, summary, rows)
    (out_dir / "summary.md").write_text(_markdown(summary, plots))
