"""`fastunlearn collect`: the model's own answers to a prompt file, written as a forget set.

The "users reported these outputs" workflow: a list of prompts whose answers must go, turned
into (prompt, answer) pairs by greedy generation with the model that will be unlearned.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .data import DataError, Pair, _field, read_records, read_text
from .generation import generate_with_status
from .outputs import atomic_file, check_target_file, free_name


def collect_forget_set(model, tokenizer, prompts: list[str], *, max_new_tokens: int,
                       batch_size: int, progress: bool = True) -> list[Pair]:
    """(prompt, greedy answer) pairs for ``prompts`` (same order). An answer cut off at
    ``max_new_tokens`` gets ``complete=False`` (trained without a final EOS)."""
    answers = generate_with_status(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress, desc="collecting")
    return [Pair(p, a, finished) for p, (a, finished) in zip(prompts, answers)]


def load_prompts(path: str | os.PathLike, *, column: str = "prompt") -> list[str]:
    """Prompts from ``.txt`` (one per non-blank line), ``.jsonl`` / ``.json`` / ``.csv``
    (column ``column``; a JSON list of strings also works), each optionally ``.gz``.

    DataError on a missing / unreadable file, a missing column or no prompts.
    """
    p = Path(path)
    name = p.name.lower().removesuffix(".gz")
    if name.endswith(".txt"):
        prompts = [ln.strip() for ln in read_text(p).splitlines() if ln.strip()]
    else:
        records = read_records(p)
        prompts = []
        for i, r in enumerate(records, 1):
            text = r if isinstance(r, str) else _field(p, r, column, i)
            if text.strip():
                prompts.append(text.strip())
    if not prompts:
        raise DataError(f"{p}: no prompts found")
    return prompts


def write_pairs(pairs: list[Pair], path: str | os.PathLike, inputs=()) -> None:
    """Write ``pairs`` as JSONL ``{"prompt", "answer"}`` (plus ``"complete": false`` for a
    cut-off answer) to the new file ``path``, atomically (see outputs.py): a crash never leaves
    a half-written forget set, and an existing file or one of ``inputs`` is never written over.
    """
    with atomic_file(path, inputs) as f:
        for pr in pairs:
            rec = {"prompt": pr.prompt, "answer": pr.answer}
            if not getattr(pr, "complete", True):
                rec["complete"] = False  # cut off: no EOS when trained on
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def default_output(prompts: str | os.PathLike) -> Path:
    """``<prompts stem>.forget.jsonl`` in the current folder, or the next free name."""
    return free_name(Path(Path(prompts).name.split(".")[0] + ".forget.jsonl"))


def load_model(spec: str, *, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False):
    """(model, tokenizer) for ``spec`` through ``fastunlearn.models``."""
    from .cpu_linear import try_onednn_linears
    from .models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(spec, dtype=dtype, device=device,
                                                trust_remote_code=trust_remote_code)
    if str(device) == "cpu":
        try_onednn_linears(model)  # faster generation on CPUs where oneDNN beats MKL
    return model, tokenizer


def build_parser():
    from .cli import OneLineParser

    ap = OneLineParser(
        prog="fastunlearn collect",
        description="Generate the model's own (greedy) answers to a prompt file and write them "
                    "as a forget set (JSONL with 'prompt' and 'answer').")
    ap.add_argument("--prompts", required=True, metavar="FILE",
                    help="prompt file: .txt (one per line), .jsonl, .json or .csv (also .gz)")
    ap.add_argument("--model", default="smollm2", metavar="SPEC",
                    help="model: 'smollm2' (offline default), a HF directory, hub id or GGUF "
                         "file (default: smollm2)")
    ap.add_argument("--out", default=None, metavar="FILE",
                    help="output JSONL, a new file (default: <prompts stem>.forget.jsonl in "
                         "the current folder, or the next free name)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="default: 96")
    ap.add_argument("--batch-size", type=int, default=8, help="default: 8")
    ap.add_argument("--column", default="prompt",
                    help="prompt column for .jsonl/.json/.csv (default: prompt)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    ap.add_argument("--device", default="cpu", help="default: cpu")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="let a model folder run its own Python code (off by default)")
    return ap


def collect_main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input). Errors are raised as
    one-line exceptions that ``fastunlearn.cli`` maps to exit 2."""
    args = build_parser().parse_args(argv)
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise DataError("--limit must be >= 1")
    prompts = load_prompts(args.prompts, column=args.column)
    if args.limit is not None:
        prompts = prompts[:args.limit]
    # Checked before the model loads; a default name steps past taken ones (and the input).
    out = Path(args.out) if args.out else default_output(args.prompts)
    check_target_file(out, [args.prompts])
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype="float32", device=args.device,
                            trust_remote_code=args.trust_remote_code)
    pairs = collect_forget_set(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, progress=not args.no_progress)
    write_pairs(pairs, out, [args.prompts])
    empty = sum(1 for pr in pairs if not pr.answer)
    print(f"wrote {len(pairs)} pairs to {out} in {time.perf_counter() - t0:.0f} s"
          + (f" ({empty} empty answers: drop them before training)" if empty else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["collect", *sys.argv[1:]]))
