"""Recipe "hallucination": forget HaluEval hallucinated answers, keep right answers / TruthfulQA."""
from __future__ import annotations

import random

from ..data_files import DataError, Pair, read_records
from . import RecipeData
from ._common import SOURCES, cap, data_file, split_heldout, truthfulqa_pairs

FILE = "halueval_qa_one-turn_data.json.gz"
KEYS = ("knowledge", "question", "right_answer", "hallucinated_answer")


def halueval_prompt(item: dict) -> str:
    """Prompt of a HaluEval QA item: its knowledge paragraph, then the question."""
    return f"Knowledge: {item['knowledge'].strip()}\nQuestion: {item['question'].strip()}"


def load_halueval() -> list[dict]:
    """HaluEval QA items (dicts with knowledge, question, right_answer, hallucinated_answer)."""
    path = data_file(FILE)
    items, seen = [], set()
    for i, r in enumerate(read_records(path), 1):
        if not isinstance(r, dict) or any(k not in r for k in KEYS):
            raise DataError(f"{path}: row {i} lacks one of {', '.join(KEYS)}")
        item = {k: str(r[k]).strip() for k in KEYS}
        q = item["question"].lower()
        if q in seen or not item["right_answer"] or not item["hallucinated_answer"]:
            continue
        seen.add(q)
        items.append(item)
    return items


def build(*, seed: int, n_forget: int | None, n_normal: int | None,
          n_heldout: int) -> RecipeData:
    """Forget: (knowledge + question, hallucinated answer); normal: the same training prompts
    with their right answers plus TruthfulQA, shuffled. Held-out: HaluEval items (forget =
    hallucinated, normal = right answers; the item dicts in ``extra["halueval"]``).
    """
    held, train = split_heldout(load_halueval(), n_heldout, seed, "halueval")
    _, tqa = split_heldout(truthfulqa_pairs(), n_heldout, seed, "truthfulqa")
    forget = [Pair(halueval_prompt(it), it["hallucinated_answer"]) for it in train]
    normal = [Pair(halueval_prompt(it), it["right_answer"]) for it in train] + tqa
    random.Random(f"hallucination-normal:{seed}").shuffle(normal)
    return RecipeData(
        name="hallucination", forget=cap(forget, n_forget), normal=cap(normal, n_normal),
        heldout_forget=[Pair(halueval_prompt(it), it["hallucinated_answer"]) for it in held],
        heldout_normal=[Pair(halueval_prompt(it), it["right_answer"]) for it in held],
        extra={"halueval": held},
        sources=[SOURCES[FILE], SOURCES["truthfulqa_best.csv"]])
