"""The bundled recipes and their registry: :func:`load_recipe`, :func:`recipe_names`.

Recipe modules read their files through ``fastunlearn.data_files`` and never import
``fastunlearn.data`` (tokenisation), so the two packages do not import each other.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from ..data_files import DataError, Pair

__all__ = ["RECIPES", "RecipeData", "load_recipe", "recipe_names"]

RECIPES = ("harmful", "copyright", "hallucination")


@dataclass
class RecipeData:
    """A recipe's training sets, held-out sets (never trained on) and evaluation material."""

    name: str
    forget: list[Pair]
    normal: list[Pair]
    heldout_forget: list[Pair]
    heldout_normal: list[Pair]
    extra: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


def recipe_names() -> list[str]:
    """Names accepted by :func:`load_recipe` (the first is the default)."""
    return list(RECIPES)


def load_recipe(name: str = "harmful", *, seed: int = 0, n_forget: int | None = None,
                n_normal: int | None = None, n_heldout: int = 16,
                forget_source: str | None = None) -> RecipeData:
    """A bundled recipe: ``"harmful"`` (default), ``"copyright"`` or ``"hallucination"``.

    Held-out items are split off first with a ``seed``-ed shuffle and never appear in
    ``forget`` / ``normal``. ``n_forget`` / ``n_normal`` cap the training sets (None: all).
    The harmful recipe's forget answers come from ``forget_source`` (``"self"``: the default
    model's own answers, default; ``"jbb"``: JailbreakBench jailbroken responses; ``"hh"``:
    hh-rlhf rejected replies); ``"harmful:jbb"`` selects it through the name as well.
    """
    if not isinstance(name, str):
        raise DataError(f"recipe name must be a string, got {type(name).__name__}")
    base, _, variant = name.partition(":")
    if base not in RECIPES:
        raise DataError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    if variant and forget_source and variant != forget_source:
        raise DataError(f"recipe {name!r} conflicts with forget_source={forget_source!r}")
    source = variant or forget_source
    if source and base != "harmful":
        raise DataError(f"recipe {base!r} has no forget sources (only 'harmful' does)")
    for label, v in (("n_forget", n_forget), ("n_normal", n_normal)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise DataError(f"{label} must be a positive integer or None, got {v!r}")
    if not isinstance(n_heldout, int) or n_heldout < 1:
        raise DataError(f"n_heldout must be a positive integer, got {n_heldout!r}")
    module = importlib.import_module(f"{__name__}.{base}")
    kw = {"source": source or "self"} if base == "harmful" else {}
    return module.build(seed=seed, n_forget=n_forget, n_normal=n_normal, n_heldout=n_heldout,
                        **kw)
