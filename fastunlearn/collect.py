"""`fastunlearn collect`: the model's own answers to a prompt file, written as a forget set.

The "users reported these outputs" workflow: a list of prompts whose answers must go, turned
into (prompt, answer) pairs by greedy generation with the model that will be unlearned.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .data import DataError, Pair, _field, read_records, read_text
from .generation import generate_with_status


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


def write_pairs(pairs: list[Pair], path: str | os.PathLike) -> None:
    """Write ``pairs`` as JSONL ``{"prompt", "answer"}`` (plus ``"complete": false`` for a
    cut-off answer), atomically (temporary file in the
    same folder, then rename), so a crash never leaves a half-written forget set.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for pr in pairs:
                rec = {"prompt": pr.prompt, "answer": pr.answer}
                if not getattr(pr, "complete", True):
                    rec["complete"] = False  # cut off: no EOS when trained on
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        # mkstemp creates 0600; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_model(spec: str, *, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) for ``spec``: through ``fastunlearn.models`` when it exists; else a
    local Hugging Face directory (the fallback keeps ``collect`` usable on its own).
    """
    try:
        from .models import load_model_and_tokenizer
    except ImportError:
        load_model_and_tokenizer = None
    if load_model_and_tokenizer is not None:
        from .cpu_linear import try_onednn_linears

        model, tokenizer = load_model_and_tokenizer(spec, dtype=dtype, device=device)
        if str(device) == "cpu":
            try_onednn_linears(model)  # faster generation on CPUs where oneDNN beats MKL
        return model, tokenizer
    if not Path(spec).is_dir():
        raise DataError(f"model {spec!r}: not a local model directory (fastunlearn.models "
                        "is needed for other specs)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=getattr(torch, dtype)).to(device)
    return model, tok


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fastunlearn collect",
        description="Generate the model's own (greedy) answers to a prompt file and write them "
                    "as a forget set (JSONL with 'prompt' and 'answer').")
    ap.add_argument("--prompts", required=True, metavar="FILE",
                    help="prompt file: .txt (one per line), .jsonl, .json or .csv (also .gz)")
    ap.add_argument("--model", default="smollm2", metavar="SPEC",
                    help="model: 'smollm2' (offline default), a HF directory, hub id or GGUF "
                         "file (default: smollm2)")
    ap.add_argument("--out", default=None, metavar="FILE",
                    help="output JSONL (default: <prompts stem>.forget.jsonl in the current "
                         "folder)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="default: 96")
    ap.add_argument("--batch-size", type=int, default=8, help="default: 8")
    ap.add_argument("--column", default="prompt",
                    help="prompt column for .jsonl/.json/.csv (default: prompt)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    ap.add_argument("--device", default="cpu", help="default: cpu")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def collect_main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        for name in ("max_new_tokens", "batch_size"):
            if getattr(args, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} must be >= 1")
        if args.limit is not None and args.limit < 1:
            raise DataError("--limit must be >= 1")
        prompts = load_prompts(args.prompts, column=args.column)
        if args.limit is not None:
            prompts = prompts[:args.limit]
        out = Path(args.out) if args.out else Path(
            Path(args.prompts).name.split(".")[0] + ".forget.jsonl")
        t0 = time.perf_counter()
        model, tok = load_model(args.model, dtype="float32", device=args.device)
        pairs = collect_forget_set(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size, progress=not args.no_progress)
        write_pairs(pairs, out)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    empty = sum(1 for pr in pairs if not pr.answer)
    print(f"wrote {len(pairs)} pairs to {out} in {time.perf_counter() - t0:.0f} s"
          + (f" ({empty} empty answers: drop them before training)" if empty else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(collect_main())
