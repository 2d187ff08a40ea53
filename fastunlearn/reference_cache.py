"""Cached reference: what the frozen reference contributes to the loss, computed once.

The KL term needs, for each valid normal token, the reference's last hidden state (H floats)
and the reference head (V, H). When the normal set is fixed, both are known before training
starts, so they are computed once, written to disk and reused; the reference model can then be
freed (no second copy of the weights during training) and the reference trunk pass disappears
from every step.

Storage, per cache file (``refcache-<key16>.pt``, loaded memory-mapped):
  * ``hidden``  (N, H) in ``storage_dtype``: the hidden state of every *valid* position of every
    normal row (position t of a row is valid when its shifted label ``labels[t + 1]`` is not
    ignored), rows concatenated in row order, positions in increasing order inside a row;
  * ``offsets`` (R + 1,) int64: row r owns ``hidden[offsets[r]:offsets[r + 1]]``;
  * ``head_weight`` (V, H) and optionally ``head_bias`` (V,) in ``storage_dtype``;
  * ``logprobs`` (methods that compare with the reference on other rows: npo on the forget
    rows, idk_dpo on the forget and preferred rows): per row kind, ``values`` (N_k,) float32, the
    reference's log-probability of each valid position's label, and ``offsets`` like above. A
    log-probability is all such a method reads of the reference, so a forget row costs 4 bytes a
    token and no reference GEMM during training;
  * ``meta``: key, dtypes, softcap, logit scale, shapes.

Size: N * H * bytes. E.g. 1000 normal rows with 100 answer tokens at H = 2048 in bf16 is
0.4 GB, against 2.5 GB for a bf16 copy of Llama-3.2-1B (5 GB in fp32).

Exactness: the live path casts the reference hidden states to the compute dtype before the
loss; the cache stores ``hidden.to(compute_dtype).to(storage_dtype)``. With the default
``storage_dtype = compute_dtype`` the cached values are the live ones, up to the last-bit
differences of running a row in a different batch (padding, batch shape). Storing bf16 while
computing in fp32 rounds the reference hidden states and head to 8 mantissa bits (relative error
about 4e-3 per element); the KL then measures against that rounded reference.

The key is a hash of the reference weights (see :func:`model_fingerprint`), the tokenised normal
rows (and the rows of every log-probability kind), the compute dtype and the storage dtype: a
different model, data, method or precision builds a new file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .log import get_logger
from .losses.types import IGNORE_INDEX

log = get_logger(__name__)

CACHE_VERSION = 2
_SAMPLES_PER_TENSOR = 4096


def model_fingerprint(model: nn.Module, skip: str | None = "lora_") -> str:
    """A hash of a model's weights and config (hex string).

    Per parameter / buffer (sorted by name): name, shape, dtype, float64 sum and sum of squares,
    and the bytes of up to 4096 evenly strided elements. This reads every weight once on its own
    device (two reductions) without copying the whole model to the host. ``skip``: names
    containing it are ignored (LoRA adapters: the reference is the model with them disabled).
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in sorted(named, key=lambda kv: kv[0]):
        if skip and skip in name:
            continue
        flat = t.detach().reshape(-1)
        stride = max(1, math.ceil(flat.numel() / _SAMPLES_PER_TENSOR))
        sample = flat[::stride].float().cpu()
        if flat.is_floating_point():  # reductions in float64 without a float64 copy
            stats = torch.stack([flat.sum(dtype=torch.float64),
                                 torch.linalg.vector_norm(flat, dtype=torch.float64)]).cpu()
        else:
            stats = flat.sum().reshape(1).cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(stats.numpy().tobytes())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def rows_fingerprint(rows) -> str:
    """A hash of tokenised rows (objects with ``input_ids`` and ``labels`` lists)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(torch.tensor(r.input_ids, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
        h.update(torch.tensor(r.labels, dtype=torch.int64).numpy().tobytes())
        h.update(b"#")
    return h.hexdigest()


def cache_key(model_fp: str, rows_fp: str, compute_dtype: torch.dtype,
              storage_dtype: torch.dtype, logprob_fps: dict[int, str] | None = None) -> str:
    parts = [CACHE_VERSION, model_fp, rows_fp, str(compute_dtype), str(storage_dtype)]
    if logprob_fps:  # absent for the normal rows alone: those caches keep their keys
        parts.append(sorted(logprob_fps.items()))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def valid_columns(labels) -> torch.Tensor:
    """Hidden positions t of one row whose shifted label ``labels[t + 1]`` is used (int64)."""
    lab = torch.as_tensor(labels, dtype=torch.long)
    return (lab[1:] != IGNORE_INDEX).nonzero().squeeze(1)


def _offsets(lengths: list[int]) -> torch.Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    return offsets


def gather_rows(values: torch.Tensor, offsets: torch.Tensor, row_index: torch.Tensor
                ) -> torch.Tensor:
    """``values`` of rows ``row_index`` (1-D int64), concatenated in that order; row r owns
    ``values[offsets[r]:offsets[r + 1]]``."""
    n_rows = offsets.numel() - 1
    idx = [int(i) for i in row_index.reshape(-1).tolist()]
    if any(i < 0 or i >= n_rows for i in idx):
        raise ValueError(f"row index out of range for a reference cache of {n_rows} rows")
    if not idx:
        return values[:0]
    bounds = offsets.tolist()
    return torch.cat([values[bounds[i]:bounds[i + 1]] for i in idx])


@dataclass
class CachedHead:
    """Same fields as ``models.Head``: what ``micro_batch_loss`` reads of a reference head."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,)
    softcap: float | None
    logit_scale: float = 1.0


class ReferenceCache:
    """Reference hidden states of the normal rows, indexed by ``Batch.row_index``.

    Example:
        >>> cache = load_or_build_cache(runner, normal_rows, "runs/x/refcache",
        ...                             compute_dtype=torch.float32)
        >>> h = cache.gather(torch.tensor([3, 0]))  # (n_valid(3) + n_valid(0), H)
    """

    def __init__(self, hidden: torch.Tensor, offsets: torch.Tensor, head_weight: torch.Tensor,
                 head_bias: torch.Tensor | None, meta: dict,
                 logprobs: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        if hidden.dim() != 2 or offsets.dim() != 1 or int(offsets[-1]) != hidden.shape[0]:
            raise ValueError("corrupt reference cache: offsets do not match the hidden states")
        if head_weight.dim() != 2 or head_weight.shape[1] != hidden.shape[1]:
            raise ValueError("corrupt reference cache: head weight does not match hidden size")
        self.logprobs = {int(k): v for k, v in (logprobs or {}).items()}
        for values, kind_offsets in self.logprobs.values():
            if values.dim() != 1 or int(kind_offsets[-1]) != values.numel():
                raise ValueError("corrupt reference cache: offsets do not match the "
                                 "log-probabilities")
        self.hidden, self.offsets = hidden, offsets
        self.head_weight, self.head_bias = head_weight, head_bias
        self.meta = meta
        self.path: Path | None = None
        self._device_head: dict = {}

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def n_rows(self) -> int:
        return self.offsets.numel() - 1

    @property
    def nbytes(self) -> int:
        n = self.hidden.numel() * self.hidden.element_size()
        n += self.head_weight.numel() * self.head_weight.element_size()
        return n

    def gather(self, row_index: torch.Tensor) -> torch.Tensor:
        """Concatenated cached hidden states of rows ``row_index`` (1-D int64), in that order.

        Returns (sum of the rows' valid counts, H) in the storage dtype, on the CPU.
        """
        return gather_rows(self.hidden, self.offsets, row_index)

    def gather_logprobs(self, kind: int, row_index: torch.Tensor) -> torch.Tensor:
        """The reference's log-probabilities (float32, CPU) of the valid positions of rows
        ``row_index`` of ``kind``'s row list, concatenated in that order."""
        if kind not in self.logprobs:
            raise ValueError(f"the reference cache holds no log-probabilities of kind-{kind} "
                             "rows (built for another method): delete it to rebuild")
        return gather_rows(*self.logprobs[kind], row_index)

    def head(self, device: torch.device | str) -> CachedHead:
        """The reference head on ``device`` (copied once, kept)."""
        device = torch.device(device)
        if device not in self._device_head:
            b = None if self.head_bias is None else self.head_bias.to(device)
            self._device_head[device] = CachedHead(self.head_weight.to(device), b,
                                                   self.meta.get("softcap"),
                                                   self.meta.get("logit_scale", 1.0))
        return self._device_head[device]

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save({"hidden": self.hidden.contiguous(), "offsets": self.offsets,
                    "head_weight": self.head_weight.contiguous(), "head_bias": self.head_bias,
                    "logprobs": {str(k): list(v) for k, v in self.logprobs.items()},
                    "meta": self.meta}, tmp)
        os.replace(tmp, path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> ReferenceCache:
        """Load a cache file; with ``mmap`` the hidden states stay on disk until read."""
        try:
            data = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except (OSError, RuntimeError, EOFError) as exc:
            raise ValueError(f"cannot read reference cache {path}: "
                             f"{str(exc).splitlines()[0]}") from None
        except torch.serialization.pickle.UnpicklingError:  # objects a cache never holds
            raise ValueError(f"reference cache {path} is not a fastunlearn reference cache "
                             "(it holds other objects, not loaded): delete it") from None
        if not isinstance(data, dict) or data.get("meta", {}).get("version") != CACHE_VERSION:
            raise ValueError(f"reference cache {path} has an unknown format version")
        logprobs = {int(k): tuple(v) for k, v in data.get("logprobs", {}).items()}
        cache = cls(data["hidden"], data["offsets"], data["head_weight"], data["head_bias"],
                    data["meta"], logprobs)
        cache.path = Path(path)
        return cache


def _autocast(device: torch.device, compute_dtype: torch.dtype):
    if compute_dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=compute_dtype)


def _valid_states(runner, rows, *, device: torch.device, compute_dtype: torch.dtype,
                  pad_id: int, batch_rows: int):
    """Yields (i, states): the reference trunk's last hidden states of row ``rows[i]``'s valid
    positions, in the compute dtype (what the live path feeds the loss), on ``device``. Rows go
    through the trunk ``batch_rows`` at a time, sorted by length to limit padding."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    autocast = _autocast(device, compute_dtype)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    for s in range(0, len(order), batch_rows):
        group = order[s:s + batch_rows]
        t = max(len(rows[i].input_ids) for i in group)
        ids = torch.full((len(group), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), t), dtype=torch.long)
        for j, i in enumerate(group):
            n = len(rows[i].input_ids)
            ids[j, :n] = torch.tensor(rows[i].input_ids)
            mask[j, :n] = 1
        hidden = runner.hidden({"input_ids": ids.to(device), "attention_mask": mask.to(device),
                                "use_cache": False}, autocast)
        hidden = hidden.to(compute_dtype)
        for j, i in enumerate(group):
            yield i, hidden[j, valid_columns(rows[i].labels).to(device)]


def _ragged(per_row: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat(per_row), _offsets([p.shape[0] for p in per_row])


@torch.no_grad()
def reference_states(runner, rows, *, device: torch.device | str, compute_dtype: torch.dtype,
                     storage_dtype: torch.dtype | None = None, pad_id: int = 0,
                     batch_rows: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, offsets): the reference's hidden states of every valid position of ``rows``,
    in ``storage_dtype`` on the CPU, rows concatenated in order."""
    device = torch.device(device)
    storage_dtype = storage_dtype or compute_dtype
    per_row: list = [None] * len(rows)
    for i, states in _valid_states(runner, rows, device=device, compute_dtype=compute_dtype,
                                   pad_id=pad_id, batch_rows=batch_rows):
        per_row[i] = states.to(storage_dtype).cpu()
    return _ragged(per_row)


@torch.no_grad()
def reference_logprobs(runner, rows, *, device: torch.device | str, compute_dtype: torch.dtype,
                       pad_id: int = 0, batch_rows: int = 16,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(values, offsets): the reference's log-probability of the label of every valid position
    of ``rows`` (float32, CPU, rows concatenated in order), from its hidden states and head in
    the compute dtype through the fused ``token_stats``, as the live path computes it."""
    from .losses import token_stats

    device = torch.device(device)
    head = runner.head()
    weight = head.weight.detach().to(device, compute_dtype)
    bias = None if head.bias is None else head.bias.detach().to(device, compute_dtype)
    per_row: list = [None] * len(rows)
    for i, states in _valid_states(runner, rows, device=device, compute_dtype=compute_dtype,
                                   pad_id=pad_id, batch_rows=batch_rows):
        labels = torch.as_tensor(rows[i].labels, dtype=torch.long)[1:]
        labels = labels[labels != IGNORE_INDEX].to(device)
        logp, _, _ = token_stats(states, weight, labels, bias=bias, softcap=head.softcap,
                                 logit_scale=head.logit_scale, backend=backend, with_kl=False)
        per_row[i] = logp.float().cpu()
    return _ragged(per_row)


def build_reference_cache(runner, rows, *, device: torch.device | str,
                          compute_dtype: torch.dtype, storage_dtype: torch.dtype | None = None,
                          pad_id: int = 0, batch_rows: int = 16, key: str = "",
                          logprob_rows: dict | None = None, over_rows=None) -> ReferenceCache:
    """Run the reference trunk once over ``rows`` and keep the valid positions' hidden states.

    Args:
        runner: a ``step.ReferenceRunner`` (its ``hidden(inputs, autocast)`` and
            ``head()``), i.e. a frozen copy or a LoRA policy with adapters disabled.
        rows: the normal rows (``input_ids`` / ``labels`` lists), in ``row_index`` order.
        compute_dtype: the training compute dtype (bf16 autocast when not fp32).
        storage_dtype: dtype on disk; default ``compute_dtype`` (then cached == live).
        batch_rows: rows per reference forward (rows are sorted by length to limit padding).
        logprob_rows: {kind: rows} whose per-token reference log-probabilities the cache keeps
            too (:func:`reference_logprobs`), e.g. the forget rows for npo.
        over_rows: ``over_rows(rows, compute) -> (values, offsets)`` runs ``compute`` on a row
            list; default ``compute(rows)`` (several processes: each on its share).
    """
    device = torch.device(device)
    storage_dtype = storage_dtype or compute_dtype
    if not rows:
        raise ValueError("cannot build a reference cache for an empty normal set")
    over_rows = over_rows or (lambda row_list, compute: compute(row_list))
    kw = dict(device=device, compute_dtype=compute_dtype, pad_id=pad_id, batch_rows=batch_rows)
    hidden, offsets = over_rows(rows, lambda part: reference_states(
        runner, part, storage_dtype=storage_dtype, **kw))
    logprobs = {kind: over_rows(kind_rows, lambda part: reference_logprobs(runner, part, **kw))
                for kind, kind_rows in (logprob_rows or {}).items()}
    head = runner.head()
    # clone: on the CPU in the same dtype .to() aliases the live head, which training changes
    weight = head.weight.detach().to(compute_dtype).to(storage_dtype).cpu().clone()
    bias = None if head.bias is None else \
        head.bias.detach().to(compute_dtype).to(storage_dtype).cpu().clone()
    meta = {"version": CACHE_VERSION, "key": key, "compute_dtype": str(compute_dtype),
            "storage_dtype": str(storage_dtype), "softcap": head.softcap,
            "logit_scale": head.logit_scale, "rows": len(rows), "tokens": hidden.shape[0],
            "hidden_size": weight.shape[1], "vocab": weight.shape[0]}
    return ReferenceCache(hidden, offsets, weight, bias, meta, logprobs)


def load_or_build_cache(runner, rows, cache_dir: str | Path | None, *, device, compute_dtype,
                        storage_dtype: torch.dtype | None = None, pad_id: int = 0,
                        batch_rows: int = 16, model: nn.Module | None = None,
                        logprob_rows: dict | None = None) -> ReferenceCache:
    """Reuse ``cache_dir/refcache-<key>.pt`` when it matches, else build (and save) it.

    ``model``: the module whose weights define the reference (for the key); default the
    runner's model. ``cache_dir=None`` builds in memory without writing anything.
    ``logprob_rows``: as in :func:`build_reference_cache` (part of the key).
    """
    storage_dtype = storage_dtype or compute_dtype
    model = model if model is not None else runner.model()
    logprob_rows = logprob_rows or {}
    key = cache_key(model_fingerprint(model), rows_fingerprint(rows), compute_dtype,
                    storage_dtype, {k: rows_fingerprint(r) for k, r in logprob_rows.items()})
    path = Path(cache_dir) / f"refcache-{key[:16]}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        cache = ReferenceCache.load(path)
        if cache.key == key and cache.n_rows == len(rows) and \
                set(cache.logprobs) == set(logprob_rows):
            log.info(f"reference cache: reusing {path} ({len(rows)} normal rows)")
            return cache
    extra = "".join(f" and {len(r)} kind-{k} rows" for k, r in logprob_rows.items())
    log.info(f"reference cache: computing the reference on {len(rows)} normal rows{extra} once"
             + (f", saved as {path.name}" if path is not None else " (kept in memory)"))
    cache = build_reference_cache(runner, rows, device=device, compute_dtype=compute_dtype,
                                  storage_dtype=storage_dtype, pad_id=pad_id,
                                  batch_rows=batch_rows, key=key, logprob_rows=logprob_rows)
    if path is not None:
        cache.save(path)
    return cache
