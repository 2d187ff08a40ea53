"""From the data section of a config to tokenised rows of the three kinds."""
from __future__ import annotations

import random

from .config import DataSection
from .losses.types import KIND_FORGET, KIND_NORMAL


def _split_heldout(pairs, n_heldout: int, seed: int, what: str):
    from .data import DataError

    if len(pairs) < 2:
        raise DataError(f"the {what} set needs at least 2 pairs (1 is held out), got {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    k = min(n_heldout, len(pairs) // 4) or 1
    held = [pairs[i] for i in order[:k]]
    train = [pairs[i] for i in order[k:]]
    return train, held


def load_training_data(d: DataSection):
    """A RecipeData from a bundled recipe, with user files replacing its forget / normal sets."""
    from .data import RecipeData, load_pairs, load_recipe

    if d.forget_file is None and d.normal_file is None:
        return load_recipe(d.recipe, seed=d.seed, n_forget=d.n_forget, n_normal=d.n_normal,
                           n_heldout=d.n_heldout)
    base = load_recipe(d.recipe, seed=d.seed, n_heldout=d.n_heldout) \
        if (d.forget_file is None or d.normal_file is None) else None
    if d.forget_file is not None:
        pairs = load_pairs(d.forget_file, prompt_col=d.prompt_column, answer_col=d.answer_column)
        forget, held_f = _split_heldout(pairs, d.n_heldout, d.seed, "forget")
    else:
        forget, held_f = base.forget, base.heldout_forget
    if d.normal_file is not None:
        pairs = load_pairs(d.normal_file, prompt_col=d.normal_prompt_column,
                           answer_col=d.normal_answer_column)
        normal, held_n = _split_heldout(pairs, d.n_heldout, d.seed + 1, "normal")
    else:
        normal, held_n = base.normal, base.heldout_normal
    forget = forget[: d.n_forget] if d.n_forget else forget
    normal = normal[: d.n_normal] if d.n_normal else normal
    extra = dict(base.extra) if base is not None else {}
    sources = list(base.sources) if base is not None else []
    sources += [f for f in (d.forget_file, d.normal_file) if f]
    return RecipeData(name="custom", forget=forget, normal=normal, heldout_forget=held_f,
                      heldout_normal=held_n, extra=extra, sources=sources)


def tokenize_all(tokenizer, data, d: DataSection, method: str = "paper") -> list:
    """Rows of each kind: [forget rows, mismatch draws, normal rows], plus idk_dpo's preferred
    rows (``data.preferred_rows``) as a fourth entry for ``method="idk_dpo"``. Mismatch rows
    pair forget prompts with ``d.mismatch_answers`` normal answers drawn afresh for every batch
    (``data.MismatchDraws``; the batcher draws them)."""
    from .data import DataError, MismatchDraws, preferred_rows, tokenize_pairs

    if not data.forget:
        raise DataError("the forget set is empty")
    if not data.normal:
        raise DataError("the normal set is empty")
    kw = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length)
    forget = tokenize_pairs(tokenizer, data.forget, KIND_FORGET, **kw)
    mismatch = MismatchDraws(tokenizer, data.forget, data.normal, k=d.mismatch_answers, **kw)
    normal = tokenize_pairs(tokenizer, data.normal, KIND_NORMAL, **kw)
    if d.kl_tokens == "all":
        # KL on every non-pad token of normal rows: label the prompt tokens too.
        for r in normal:
            r.labels = list(r.input_ids)
    if method == "idk_dpo":
        return [forget, mismatch, normal, preferred_rows(tokenizer, data.forget, **kw)]
    return [forget, mismatch, normal]
