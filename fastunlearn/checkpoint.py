"""Checkpoints that survive a crash and resume on any number of processes; the final HF save.

Layout under a checkpoint root (``train.save_every=K`` writes one every K steps)::

    root/step-00000300/            one finished checkpoint
        *.distcp, .metadata        torch.distributed.checkpoint: model and optimiser, resharded
                                   on load to however many processes load it
        rank-0.pt, rank-1.pt ...   each rank's RNG states (torch, CUDA, Python, optimiser)
        meta.json                  step, scheduler, data-stream position, fingerprint, world size
        MANIFEST.json              written last: every file with its size
    root/.tmp-step-00000400/       a checkpoint being written (never loaded)

Atomicity: everything is written into a temporary folder, then rank 0 writes the manifest,
syncs, and renames the folder (one ``os.replace``). A crash at any point leaves the previous
checkpoint untouched, and a folder that lacks its manifest or whose files do not match it is
never loaded. Older checkpoints are removed only after the new one is in place.

One process uses the same code: torch.distributed.checkpoint runs without a process group.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .distributed import barrier, is_main, rank, world_size

MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# Config keys that may change between a run and its resumption.
RESUMABLE_KEYS = ("out", "train.steps", "train.save_every", "train.keep_checkpoints",
                  "train.checkpoint_dir", "train.threads", "train.device",
                  "train.keep_freed_memory", "eval")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (one-line message)."""


@dataclass
class TrainState:
    """What a checkpoint holds: the policy, its optimiser and scheduler, the data stream
    (an object with state_dict / load_state_dict: ``distributed.RankBatcher``) and the step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    data: object
    step: int


def config_fingerprint(config: dict, model_id: str = "", ignore=RESUMABLE_KEYS) -> str:
    """A hash of the run's config (less the keys a resumed run may change) and model."""
    def strip(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if key in ignore:
                continue
            out[k] = strip(v, key + ".") if isinstance(v, dict) else v
        return out
    text = json.dumps({"config": strip(config), "model": model_id}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_fingerprint(cfg) -> str:
    """The fingerprint of a run's config (a ``config.RunConfig``) and model."""
    return config_fingerprint(cfg.to_dict(), cfg.model.name)


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


# ----------------------------------------------------------------------------- validity
def _manifest_of(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"version": FORMAT_VERSION,
            "files": {str(p.relative_to(folder)): p.stat().st_size for p in files}}


def check_complete(folder: str | Path) -> dict:
    """The manifest of a finished checkpoint; CheckpointError if it is missing or cut."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a finished checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
        listed = manifest["files"]
    except (ValueError, KeyError):
        raise CheckpointError(f"{folder}: unreadable {MANIFEST}") from None
    for name, size in listed.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(f"{folder} is incomplete or damaged ({name} missing or cut)")
    return manifest


def latest(root: str | Path) -> Path | None:
    """The newest finished checkpoint under ``root`` (damaged ones are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)),
                   reverse=True)
    for p in steps:
        try:
            check_complete(p)
            return p
        except CheckpointError:
            continue
    return None


def resolve(path: str | Path) -> Path:
    """``--resume DIR``: a checkpoint folder, or a root whose newest finished one is used."""
    path = Path(path)
    if (path / MANIFEST).exists() or _STEP_DIR.match(path.name):
        check_complete(path)
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(f"no finished checkpoint in {path}")
    return found


# ------------------------------------------------------------------------------- state
def _rng_state(optimizer) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    # StochasticRoundingAdamW draws its rounding seeds from generators of its own.
    if hasattr(optimizer, "rng_state"):
        state["optimizer"] = optimizer.rng_state()
    return state


def _set_rng_state(state: dict, optimizer) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "optimizer" in state and hasattr(optimizer, "load_rng_state"):
        optimizer.load_rng_state(state["optimizer"])


def _dcp_state(state: TrainState) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(state.model, state.optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _fsync_tree(folder: Path) -> None:
    for p in [*folder.rglob("*"), folder]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _single_process_quiet():
    """One process is a supported mode, not a fallback: no warning about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(root: str | Path, state: TrainState, *, fingerprint: str, keep: int = 1,
         extra: dict | None = None) -> Path:
    """Write a checkpoint of ``state`` (collective: every rank calls it). Returns its folder.
    ``extra``: JSON data kept with it (rank 0's; see :func:`read_meta`)."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final, tmp = step_dir(root, state.step), root / f".tmp-step-{state.step:08d}"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir(parents=True)
    barrier()
    with _single_process_quiet():
        dcp.save(_dcp_state(state), checkpoint_id=str(tmp))
    torch.save(_rng_state(state.optimizer), tmp / f"rank-{rank()}.pt")
    barrier()
    if is_main():
        meta = {"version": FORMAT_VERSION, "step": state.step, "fingerprint": fingerprint,
                "world_size": world_size(), "scheduler": state.scheduler.state_dict(),
                "data": state.data.state_dict(), "extra": extra or {}}
        (tmp / "meta.json").write_text(json.dumps(meta))
        (tmp / MANIFEST).write_text(json.dumps(_manifest_of(tmp)))
        _fsync_tree(tmp)
        if final.exists():  # the same step written again (a resumed run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_tree(root)
        older = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and p != final)
        for p in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return final


def read_meta(path: str | Path) -> dict:
    """The ``meta.json`` of a finished checkpoint (``--resume DIR`` as for :func:`load`)."""
    return json.loads((resolve(path) / "meta.json").read_text())


def check_resumable(path: str | Path, fingerprint: str) -> dict:
    """The meta data of the checkpoint ``path`` names (see :func:`resolve`); CheckpointError
    when it is unfinished, of another format, or written by another config or model. Cheap:
    ``--resume DIR`` is checked before any model is loaded."""
    folder = resolve(path)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{folder}: unreadable meta.json") from None
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format {meta.get('version')}, "
                              f"this version reads {FORMAT_VERSION}")
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{folder} was written by another config or model "
                              f"(fingerprint {meta.get('fingerprint')}, this run {fingerprint})")
    return meta


def load(path: str | Path, state: TrainState, *, fingerprint: str) -> int:
    """Restore ``state`` in place from a finished checkpoint (collective); returns its step.

    Works with any number of processes: the model and optimiser are resharded by
    torch.distributed.checkpoint, the data stream is global. Each rank restores the RNG states
    of the rank with its number when the world size is unchanged, else those of rank 0.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    folder = resolve(path)
    meta = check_resumable(folder, fingerprint)
    target = _dcp_state(state)
    with _single_process_quiet():
        dcp.load(target, checkpoint_id=str(folder))
    set_state_dict(state.model, state.optimizer, model_state_dict=target["model"],
                   optim_state_dict=target["optim"])
    state.scheduler.load_state_dict(meta["scheduler"])
    state.data.load_state_dict(meta["data"])
    own = rank() if meta["world_size"] == world_size() else 0
    _set_rng_state(torch.load(folder / f"rank-{own}.pt", weights_only=False), state.optimizer)
    state.step = meta["step"]
    return state.step


# ------------------------------------------------------------------------ final model
def full_state_dict(model: nn.Module) -> dict | None:
    """The whole model's weights on rank 0's host (None on other ranks); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))
    return sd if is_main() else None


# Above this many bytes of weights the final model is written by every rank and consolidated
# into safetensors files, instead of gathered on rank 0's host (about a 13B model in bf16).
GATHER_LIMIT_BYTES = 26 * 2**30
FILE_BYTES = 5 * 2**30  # safetensors file size of a consolidated save


def _tied_head_keys(model: nn.Module) -> list[str]:
    """State-dict names of an output head tied to the input embedding (saved once, by HF
    convention under the embedding's name)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out_emb, in_emb = inner.get_output_embeddings(), inner.get_input_embeddings()
    if out_emb is None or out_emb.weight is not in_emb.weight:
        return []
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if p is out_emb.weight and n.endswith("lm_head.weight")]


def save_hf(model: nn.Module, tokenizer, out_dir: str | Path, *,
            gather_limit_bytes: int = GATHER_LIMIT_BYTES) -> None:
    """A Hugging Face directory of the (possibly sharded) model; collective.

    Up to ``gather_limit_bytes`` of weights, the full state dict is gathered to rank 0's host
    and written with ``save_pretrained``; above, every rank writes its shards and they are
    consolidated into safetensors files with an index (no host holds the whole model). Tied
    input / output embeddings are saved once, as the model itself would save them.
    """
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if total > gather_limit_bytes:
        _save_hf_consolidated(model, out_dir)
    else:
        sd = full_state_dict(model)
        if is_main():
            for name in _tied_head_keys(model):
                sd.pop(name, None)
            model.save_pretrained(Path(out_dir), state_dict=sd, safe_serialization=True)
    if is_main() and tokenizer is not None:
        tokenizer.save_pretrained(Path(out_dir))
    barrier()


def _save_hf_consolidated(model: nn.Module, out_dir: str | Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if hasattr(model, "get_base_model"):
        raise CheckpointError("a LoRA model above the gather limit cannot be saved consolidated: "
                              "merge the adapters first")
    out_dir = Path(out_dir)
    sd = get_model_state_dict(model)
    for name in _tied_head_keys(model):
        sd.pop(name, None)
    files, size, mapping = 1, 0, {}
    for name in sorted(sd):  # files of at most FILE_BYTES (one tensor may exceed it)
        nbytes = sd[name].numel() * sd[name].element_size()
        if size and size + nbytes > FILE_BYTES:
            files, size = files + 1, 0
        mapping[name] = files
        size += nbytes
    writer = HuggingFaceStorageWriter(str(out_dir), fqn_to_index_mapping=mapping,
                                      save_distributed=True, enable_consolidation=True)
    with _single_process_quiet():
        dcp.save(sd, storage_writer=writer)
    barrier()
    if is_main():
        shutil.rmtree(out_dir / "sharded", ignore_errors=True)  # the per-rank pieces
        model.config.save_pretrained(out_dir)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out_dir)
