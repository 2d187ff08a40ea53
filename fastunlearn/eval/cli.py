"""``fastunlearn eval``: evaluate a model against its original and write a report.

    fastunlearn eval --run runs/x --reference smollm2 --out runs/x-eval
    fastunlearn eval --model smollm2 --recipe harmful --seed 0 --n-heldout 16

Held-out data only. Given a run (``--run <dir>``, or ``--model <dir>/model`` of a run folder),
it evaluates on the rows that run held out (its ``heldout.json``: exact rows, whatever its
recipe, seed or data files) with the run's ``max_length``. Without a run, it splits
``--recipe`` as a run with ``data.seed=--seed`` and ``data.n_heldout=--n-heldout`` does (see
``eval/heldout.py``); the ``--n-*`` counts only cap how many held-out rows are used.

With ``--reference`` (default: none, i.e. the model is its own original) the reference is
evaluated as "before" and the model as "after"; normal_kl and normal similarity compare the
model with the reference. Writes ``summary.json``, ``summary.md`` and ``plots/`` to ``--out``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fastunlearn.config import DataSection

from . import EvalConfig, Evaluator
from .heldout import HeldoutError, read_heldout, recipe_heldout, run_dir_of
from .judge import JudgeError

_DEFAULT_N_HELDOUT = DataSection().n_heldout


def build_parser() -> argparse.ArgumentParser:
    from fastunlearn.cli import OneLineParser

    d = EvalConfig()
    p = OneLineParser(prog="fastunlearn eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help='model dir, .gguf file or "smollm2" (default with --run: <run>/model)')
    p.add_argument("--run", default=None,
                   help="run folder of fastunlearn run: evaluate on its held-out rows")
    p.add_argument("--reference", default=None,
                   help="original model spec (default: the model itself, no comparison)")
    p.add_argument("--recipe", default=None,
                   help="without a run: harmful (default) | copyright | hallucination")
    p.add_argument("--out", default=None, help="output directory (default: runs/eval-<time>)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default)")
    p.add_argument("--seed", type=int, default=None,
                   help="without a run: the data.seed of the split (default 0)")
    p.add_argument("--n-heldout", type=int, default=None,
                   help="without a run: the data.n_heldout of the split (default "
                        f"{_DEFAULT_N_HELDOUT}, as a default run)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--n-harmful", type=int, default=d.n_harmful)
    p.add_argument("--n-normal", type=int, default=d.n_normal)
    p.add_argument("--n-xstest", type=int, default=d.n_xstest)
    p.add_argument("--n-likelihood", type=int, default=d.n_likelihood)
    p.add_argument("--max-length", type=int, default=None,
                   help=f"tokens per likelihood row (default: the run's, else {d.max_length})")
    p.add_argument("--judge", default=d.judge,
                   help='"builtin", "none" or an HF sequence-classification model directory')
    p.add_argument("--judge-harmful-labels", default="",
                   help="comma-separated label names (or ids) of a user judge meaning harmful")
    p.add_argument("--samples", type=int, default=d.samples)
    p.add_argument("--no-generate", action="store_true", help="likelihood metrics only")
    p.add_argument("--no-progress", action="store_true")
    return p


def _config(args, max_length: int | None) -> EvalConfig:
    labels = [s.strip() for s in args.judge_harmful_labels.split(",") if s.strip()]
    length = {"max_length": max_length} if max_length is not None else {}
    return EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      n_harmful=args.n_harmful, n_normal=args.n_normal, n_xstest=args.n_xstest,
                      judge=args.judge, judge_harmful_labels=labels, samples=args.samples,
                      generate=not args.no_generate, n_likelihood=args.n_likelihood, **length)


def _run_dir(args) -> Path | None:
    """The run folder whose held-out rows to use: ``--run``, or the parent of a run's model."""
    if args.run is not None:
        run = Path(args.run)
        if not run.is_dir():
            raise HeldoutError(f"--run {run}: no such run folder")
        return run
    return run_dir_of(args.model)


def _load_data(args, run: Path | None):
    """(RecipeData whose held-out sets are evaluated, settings with max_length and source)."""
    if run is not None:
        given = [f"--{n.replace('_', '-')}" for n in ("recipe", "seed", "n_heldout")
                 if getattr(args, n) is not None]
        if given:
            raise HeldoutError(f"{', '.join(given)} cannot be combined with a run: its own "
                               "held-out rows are used")
        return read_heldout(run)
    n = _DEFAULT_N_HELDOUT if args.n_heldout is None else args.n_heldout
    return recipe_heldout(args.recipe or "harmful", 0 if args.seed is None else args.seed, n)


def _output_dir(args) -> Path:
    """Where the report goes (the one place that chooses the output folder)."""
    return Path(args.out) if args.out else Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(spec: str, device: str):
    """(model, tokenizer) through the package loader (patched in tests)."""
    from fastunlearn.cpu_linear import try_onednn_linears
    from fastunlearn.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(spec, dtype="float32", device=device)
    if device == "cpu":
        try_onednn_linears(model)  # faster generation on CPUs where oneDNN beats MKL
    return model, tokenizer


def eval_main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    from fastunlearn.report import write_report

    t0 = time.perf_counter()
    from fastunlearn.outputs import atomic_dir, check_target_dir

    try:
        out = check_target_dir(_output_dir(args))  # refused before any model loads
        run = _run_dir(args)
        if args.model is None and run is None:
            raise HeldoutError("give --model or --run")
        model_spec = args.model or str(run / "model")
        data, held = _load_data(args, run)
        cfg = _config(args, args.max_length if args.max_length is not None
                      else held.get("max_length"))
        device = _device(args.device)
        model, tok = _load(model_spec, device)
        ref = None
        if args.reference and args.reference != model_spec:
            ref, _ = _load(args.reference, device)
    except (ValueError, OSError) as e:  # DataError / ModelError are ValueErrors
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    ev = Evaluator(tok, data, cfg, reference_model=ref, progress=not args.no_progress)
    evals = []
    before = None
    try:
        if ref is not None:
            before = ev.run(ref, 0)
            evals.append({"step": 0, **before})
        after = ev.run(model, 1 if ref is not None else 0)
    except JudgeError as e:  # a user judge whose files do not load
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    evals.append({"step": after["step"], **after})
    summary = {
        "steps": None, "wall_seconds": time.perf_counter() - t0, "backend": None,
        "tokens_per_second": None, "config": {**vars(args), "eval": vars(cfg)},
        "model": model_spec, "reference": args.reference, "recipe": data.name,
        "heldout_source": held["source"], "run": str(run) if run is not None else None,
        "before": before, "after": after, "evals": evals, "stopped_early": False,
    }
    with atomic_dir(out) as work:  # a new or empty folder, written whole (never over a run)
        write_report(work, summary, [])
    keys = ("harmful_rate", "harmful_rate_forget", "refusal_rate", "forget_nll", "normal_kl",
            "normal_rouge_l", "xstest_over_refusal", "degenerate_rate_harmful", "eval_seconds")
    print(" ".join(f"{k}={after[k]:.4g}" for k in keys if isinstance(after.get(k), float)))
    if run is None:
        print(f"held-out data: {held['source']} (never trained on by a run with the same recipe "
              f"and seed and data.n_heldout >= that; pass --run for another run)")
    print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(eval_main())
