"""Recipe "harmful": forget harmful answers, keep TruthfulQA behaviour (the paper's setting)."""
from __future__ import annotations

from ..data_files import DataError, load_pairs
from . import RecipeData
from ._common import (
    SOURCES,
    cap,
    data_file,
    dedupe,
    harmbench_val_prompts,
    split_heldout,
    truthfulqa_pairs,
    xstest_safe_prompts,
)

# forget_source -> bundled (prompt, answer) file
FORGET_FILES = {
    "self": "harmful_smollm2_answers.jsonl",  # the default model's own answers (default)
    "jbb": "jbb_jailbroken.jsonl.gz",  # JailbreakBench jailbroken responses
    "hh": "hh_rlhf_rejected_single_turn.jsonl.gz",  # hh-rlhf rejected replies
}


# The default model refuses a few prompts; a refusal is not a harmful answer to forget.
REFUSAL_STARTS = ("i'm sorry", "i am sorry", "i cannot", "i can't", "i can not", "as an ai")


def is_refusal(answer: str) -> bool:
    """True when an answer opens like a refusal (checked on the lower-cased, unquoted text)."""
    return answer.strip().strip('"').lower().startswith(REFUSAL_STARTS)


def build(*, seed: int, n_forget: int | None, n_normal: int | None, n_heldout: int,
          source: str = "self") -> RecipeData:
    """Forget: harmful prompts with harmful answers from ``source``; normal: TruthfulQA.

    Answers that open like a refusal are dropped. Held-out harmful prompts (same kind of
    answers) and held-out TruthfulQA questions are split off first. ``extra`` holds XSTest
    safe prompts (``xstest_safe``) and HarmBench validation behaviours
    (``harmful_eval_prompts``) for evaluation.
    """
    if source not in FORGET_FILES:
        raise DataError(f"unknown harmful forget source {source!r}; known: "
                        f"{', '.join(FORGET_FILES)}")
    fname = FORGET_FILES[source]
    harmful = [p for p in dedupe(load_pairs(data_file(fname))) if not is_refusal(p.answer)]
    held_f, forget = split_heldout(harmful, n_heldout, seed, f"harmful-{source}")
    held_n, normal = split_heldout(truthfulqa_pairs(), n_heldout, seed, "truthfulqa")
    return RecipeData(
        name="harmful" if source == "self" else f"harmful:{source}",
        forget=cap(forget, n_forget), normal=cap(normal, n_normal),
        heldout_forget=held_f, heldout_normal=held_n,
        extra={"xstest_safe": xstest_safe_prompts(),
               "harmful_eval_prompts": harmbench_val_prompts(),
               "forget_source": source},
        sources=[SOURCES[fname], SOURCES["truthfulqa_best.csv"], SOURCES["xstest_prompts.csv"],
                 SOURCES["harmbench_behaviors_text_val.csv"]])
