"""Which data evaluation uses: a run's own held-out rows, or a recipe's held-out split.

``fastunlearn run`` writes ``heldout.json`` into the run folder (next to ``config.json``): the
exact held-out forget / normal pairs of the run's data (bundled recipe or user files, its seed
and ``n_heldout``), the recipe's evaluation material (``extra``: XSTest safe prompts, HarmBench
behaviours, held-out book passages, HaluEval items) and the run's tokenisation settings.
``fastunlearn eval --run <dir>`` (or ``--model <dir>/model``) evaluates on exactly those rows,
none of which was trained on.

Without a run, :func:`recipe_heldout` splits a bundled recipe the way a run does. The split
is a seeded shuffle whose first ``n_heldout`` items are held out; the requested evaluation
counts never change it. So the rows are disjoint from what any run with the same recipe, seed
and ``data.n_heldout >= n_heldout`` trains on (16 = the default run's ``n_heldout``).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

HELDOUT_FILE = "heldout.json"
FORMAT = 1


class HeldoutError(ValueError):
    """A run folder's held-out data is missing or unreadable (one-line message)."""


def _pairs_json(pairs) -> list[dict]:
    from fastunlearn.data_files import pair_record

    return [pair_record(p) for p in pairs]  # a chat prompt keeps its earlier turns


def write_heldout(folder: Path, data, data_section) -> Path:
    """Write ``folder/heldout.json`` for the RecipeData ``data`` of a run configured by
    ``data_section`` (a ``config.DataSection``); returns its path."""
    payload = {
        "format": FORMAT,
        "recipe": data.name,
        "split": {"seed": data_section.seed, "n_heldout": data_section.n_heldout,
                  "recipe": data_section.recipe, "forget_file": data_section.forget_file,
                  "normal_file": data_section.normal_file},
        "max_length": data_section.max_length,
        "max_prompt_length": data_section.max_prompt_length,
        "heldout_forget": _pairs_json(data.heldout_forget),
        "heldout_normal": _pairs_json(data.heldout_normal),
        "extra": data.extra,
        "sources": list(data.sources),
    }
    path = Path(folder) / HELDOUT_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _pairs(rows, path: Path, key: str) -> list:
    from fastunlearn.data_files import record_pair

    try:
        return [record_pair(r, source=path, where=f"{key} record {i}")
                for i, r in enumerate(rows)]
    except (TypeError, KeyError, AttributeError) as e:
        raise HeldoutError(f"{path}: bad {key} row ({type(e).__name__}: {e})") from None


def read_heldout(run_dir: Path):
    """(RecipeData of the run's held-out rows, settings dict with ``max_length``).

    A run folder from before ``heldout.json`` existed is split again from its ``config.json``
    (the split is deterministic in the run's data settings)."""
    from fastunlearn.data import RecipeData

    run_dir = Path(run_dir)
    path = run_dir / HELDOUT_FILE
    if not path.exists():
        return _rebuild_from_config(run_dir)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeldoutError(f"{path}: cannot read ({type(e).__name__})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise HeldoutError(f"{path}: not a heldout.json of format {FORMAT}")
    data = RecipeData(name=str(d.get("recipe", "run")), forget=[], normal=[],
                      heldout_forget=_pairs(d.get("heldout_forget") or [], path, "forget"),
                      heldout_normal=_pairs(d.get("heldout_normal") or [], path, "normal"),
                      extra=dict(d.get("extra") or {}), sources=list(d.get("sources") or []))
    return data, {"max_length": d.get("max_length"), "source": str(path)}


def _rebuild_from_config(run_dir: Path):
    from fastunlearn.config import DataSection
    from fastunlearn.inputs import load_training_data

    cfg_path = run_dir / "config.json"
    try:
        section = json.loads(cfg_path.read_text(encoding="utf-8"))["data"]
        known = set(asdict(DataSection()))
        ds = DataSection(**{k: v for k, v in section.items() if k in known})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise HeldoutError(f"{run_dir}: not a run folder (no {HELDOUT_FILE}, and config.json "
                           f"unreadable: {type(e).__name__})") from None
    data = load_training_data(ds)
    return data, {"max_length": ds.max_length, "source": f"{cfg_path} (split again)"}


def run_dir_of(model_spec: str | None) -> Path | None:
    """The run folder of a model saved by ``fastunlearn run`` (``<run>/model``), else None."""
    if not model_spec:
        return None
    parent = Path(model_spec).parent
    if Path(model_spec).name == "model" and \
            ((parent / HELDOUT_FILE).exists() or (parent / "config.json").exists()):
        return parent
    return None


def recipe_heldout(recipe: str, seed: int, n_heldout: int):
    """A bundled recipe's held-out split, as a run with ``data.seed=seed`` and
    ``data.n_heldout=n_heldout`` holds it out (see the module docstring)."""
    from fastunlearn.data import load_recipe

    data = load_recipe(recipe, seed=seed, n_heldout=n_heldout)
    return data, {"max_length": None,
                  "source": f"recipe {recipe}, seed {seed}, n_heldout {n_heldout}"}
