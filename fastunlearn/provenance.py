"""What produced a saved model: library versions, and a model card other tools can read.

A saved model folder gets ``README.md`` (a Hugging Face model card: YAML metadata, the method,
the loss coefficients, before/after metrics, the config, the versions) and ``fastunlearn.json``
(the same facts as JSON, for programs).
"""
from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path

CARD_FILE = "README.md"
METHOD = ("arXiv:2310.10683: gradient ascent on forget answers, random-mismatch descent, "
          "KL to the reference on normal data")
PROVENANCE_FILE = "fastunlearn.json"
# Distribution names whose versions a result depends on; absent ones are left out.
_PACKAGES = ("torch", "transformers", "triton", "peft")


def versions() -> dict[str, str]:
    """Versions of fastunlearn, torch, and transformers / triton / peft when installed."""
    from . import __version__

    out = {"fastunlearn": __version__}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def provenance(*, config: dict | None = None, before: dict | None = None,
               after: dict | None = None, save_dtype: str | None = None) -> dict:
    """The facts recorded next to saved weights (``fastunlearn.json``)."""
    out = {"versions": versions(), "method": METHOD}
    if save_dtype is not None:
        out["save_dtype"] = save_dtype
    if config is not None:
        out["config"] = config
    if before:
        out["before"] = before
    if after:
        out["after"] = after
    return out


_METHOD = (
    "Unlearning as in Yao, Xu and Liu, *Large Language Model Unlearning* "
    "(arXiv:2310.10683): gradient ascent on the answers of a forget set, gradient descent on "
    "forget prompts paired with unrelated normal answers (random mismatch), and a KL "
    "divergence to the frozen original model on normal data, each term averaged over its own "
    "answer tokens:\n\n"
    "`loss = -eps_forget * NLL(forget) + eps_mismatch * NLL(mismatch) "
    "+ eps_normal * KL(reference || model on normal)`"
)


def model_card(info: dict) -> str:
    """A model card (Markdown with YAML metadata) from :func:`provenance`'s dict."""
    config = info.get("config") or {}
    model = config.get("model") or {}
    loss = config.get("loss") or {}
    meta = ["---", "library_name: transformers", "tags:", "- unlearning", "- fastunlearn"]
    base = model.get("name")
    if isinstance(base, str) and base.count("/") == 1 and not base.startswith((".", "/", "~")):
        meta.append(f"base_model: {base}")  # a hub id; local paths and short names are not
    meta.append("---")
    lines = meta + ["", "# Unlearned model", "", "## Method", "", _METHOD, ""]
    if base:
        lines += [f"Base model: `{base}`.", ""]
    coefs = {k: loss[k] for k in ("eps_forget", "eps_mismatch", "eps_normal") if k in loss}
    if coefs:
        lines += ["Coefficients: " + ", ".join(f"`{k}={v}`" for k, v in coefs.items()) + ".", ""]
    if info.get("save_dtype"):
        lines += [f"Weights saved in `{info['save_dtype']}`.", ""]
    table = _metrics_table(info.get("before") or {}, info.get("after") or {})
    if table:
        lines += ["## Metrics", "", *table, ""]
    lines += ["## Versions", "", "| package | version |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in info["versions"].items()]
    lines += ["", "The saved `config.json` uses the transformers >= 5 format; transformers 4.x "
              "reads some fields (`rope_theta`) wrongly without an error.", ""]
    if config:
        lines += ["## Training config", "", "```json", json.dumps(config, indent=2,
                                                                 default=str), "```", ""]
    return "\n".join(lines)


def _metrics_table(before: dict, after: dict) -> list[str]:
    """Rows ``| metric | before | after |`` for the scalar metrics of either dict."""
    names = [k for k in dict.fromkeys([*before, *after])
             if _is_scalar(before.get(k)) or _is_scalar(after.get(k))]
    if not names:
        return []
    rows = ["| metric | before | after |", "| --- | --- | --- |"]
    return rows + [f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |" for k in names]


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v) -> str:
    if not _is_scalar(v):
        return "-"
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.4g}"
    return str(v)


def write_model_files(out_dir: str | Path, info: dict) -> None:
    """``README.md`` and ``fastunlearn.json`` of :func:`provenance`'s dict in ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / CARD_FILE).write_text(model_card(info), encoding="utf-8")
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n",
                                           encoding="utf-8")
