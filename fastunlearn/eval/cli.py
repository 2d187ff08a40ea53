"""``fastunlearn eval``: evaluate a model against its original and write a report.

    fastunlearn eval --model runs/x/model --reference smollm2 --recipe harmful --out runs/x/eval

With ``--reference`` (default: none, i.e. the model is its own original) the reference is
evaluated as "before" and the model as "after"; normal_kl and normal similarity compare the
model with the reference. Writes ``summary.json``, ``summary.md`` and ``plots/`` to ``--out``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import EvalConfig, Evaluator


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    p = argparse.ArgumentParser(prog="fastunlearn eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help='model dir, .gguf file or "smollm2"')
    p.add_argument("--reference", default=None,
                   help="original model spec (default: the model itself, no comparison)")
    p.add_argument("--recipe", default="harmful", help="harmful | copyright | hallucination")
    p.add_argument("--out", default=None, help="output directory (default: runs/eval-<time>)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default)")
    p.add_argument("--seed", type=int, default=0, help="held-out split seed of the recipe")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--n-harmful", type=int, default=d.n_harmful)
    p.add_argument("--n-normal", type=int, default=d.n_normal)
    p.add_argument("--n-xstest", type=int, default=d.n_xstest)
    p.add_argument("--n-likelihood", type=int, default=d.n_likelihood)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--judge", default=d.judge,
                   help='"builtin", "none" or an HF sequence-classification model directory')
    p.add_argument("--judge-harmful-labels", default="",
                   help="comma-separated label names (or ids) of a user judge meaning harmful")
    p.add_argument("--samples", type=int, default=d.samples)
    p.add_argument("--no-generate", action="store_true", help="likelihood metrics only")
    p.add_argument("--no-progress", action="store_true")
    return p


def _config(args) -> EvalConfig:
    labels = [s.strip() for s in args.judge_harmful_labels.split(",") if s.strip()]
    return EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      n_harmful=args.n_harmful, n_normal=args.n_normal, n_xstest=args.n_xstest,
                      judge=args.judge, judge_harmful_labels=labels, samples=args.samples,
                      generate=not args.no_generate, max_length=args.max_length,
                      n_likelihood=args.n_likelihood)


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


def _load_data(recipe: str, seed: int, n_heldout: int):
    from fastunlearn.data import load_recipe

    return load_recipe(recipe, seed=seed, n_heldout=n_heldout)


def eval_main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    from fastunlearn.report import write_report

    t0 = time.perf_counter()
    try:
        cfg = _config(args)
        device = _device(args.device)
        data = _load_data(args.recipe, args.seed,
                          max(cfg.n_harmful, cfg.n_normal, cfg.n_likelihood, 1))
        model, tok = _load(args.model, device)
        ref = None
        if args.reference and args.reference != args.model:
            ref, _ = _load(args.reference, device)
    except (ValueError, OSError) as e:  # DataError / ModelError are ValueErrors
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    ev = Evaluator(tok, data, cfg, reference_model=ref, progress=not args.no_progress)
    evals = []
    before = None
    if ref is not None:
        before = ev.run(ref, 0)
        evals.append({"step": 0, **before})
    after = ev.run(model, 1 if ref is not None else 0)
    evals.append({"step": after["step"], **after})
    out = Path(args.out) if args.out else Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    summary = {
        "steps": None, "wall_seconds": time.perf_counter() - t0, "backend": None,
        "tokens_per_second": None, "config": {**vars(args), "eval": vars(cfg)},
        "model": args.model, "reference": args.reference, "recipe": args.recipe,
        "before": before, "after": after, "evals": evals, "stopped_early": False,
    }
    write_report(out, summary, [])
    keys = ("harmful_rate", "refusal_rate", "forget_nll", "normal_kl", "normal_rouge_l",
            "xstest_over_refusal", "degenerate_rate_harmful", "eval_seconds")
    print(" ".join(f"{k}={after[k]:.4g}" for k in keys if isinstance(after.get(k), float)))
    print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(eval_main())
