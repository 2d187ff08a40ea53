"""One code path for 1 and N processes: launch detection, rank helpers, reductions, row shares.

Distributed mode turns on when the launcher sets ``WORLD_SIZE > 1`` (``torchrun``, or
``accelerate launch`` used as a plain launcher): NCCL on CUDA, gloo on CPU. With one process
nothing is initialised and every helper here degrades to the local value, so the trainer calls
the same functions either way.

Rows: every rank draws the *same* global batch from identically seeded samplers and keeps its
own share of each kind (:func:`share`). The global stream, its position and the loss do not
depend on the number of processes, so a run resumed on another number of processes continues
the same data stream, and no row is duplicated or dropped.
"""
from __future__ import annotations

import datetime
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

# Accelerate's plugin settings that this path would silently ignore (it shards with FSDP2 itself).
_ACCELERATE_PLUGIN_VARS = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED",
                           "ACCELERATE_USE_MEGATRON_LM")
_ACCELERATE_PLUGIN_PREFIXES = ("FSDP_", "ACCELERATE_DEEPSPEED_", "ACCELERATE_FSDP_")


class DistributedError(ValueError):
    """A launch or layout the distributed path cannot run (one-line message)."""


def check_launcher_env(env: dict | None = None) -> None:
    """Refuse accelerate's FSDP / DeepSpeed plugin settings: this path would ignore them."""
    env = os.environ if env is None else env
    found = [k for k in _ACCELERATE_PLUGIN_VARS if env.get(k, "").lower() in ("1", "true", "yes")]
    found += sorted(k for k in env if k.startswith(_ACCELERATE_PLUGIN_PREFIXES))
    if found:
        raise DistributedError(
            f"accelerate plugin settings found ({', '.join(found[:3])}): fastunlearn shards "
            f"with FSDP2 itself; launch with a plain `accelerate launch` config (no FSDP / "
            f"DeepSpeed) or with torchrun")


def env_world_size(env: dict | None = None) -> int:
    env = os.environ if env is None else env
    try:
        return int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={env['WORLD_SIZE']!r} is not an integer") from None


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(device_type: str = "auto", timeout_s: float = 1800.0) -> torch.device:
    """Join the process group the launcher describes and return this rank's device.

    One process (``WORLD_SIZE`` unset or 1): nothing is initialised; the device is ``cuda`` if
    available (or as asked), else ``cpu``. Several: each rank takes ``cuda:LOCAL_RANK`` on CUDA.
    """
    check_launcher_env()
    cuda = torch.cuda.is_available() if device_type == "auto" else device_type.startswith("cuda")
    if env_world_size() <= 1 or is_distributed():
        if is_distributed() and cuda:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cuda" if cuda else "cpu")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend_for(device),
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if cuda else None)
    return device


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def main_print(*args, **kwargs) -> None:
    """print on rank 0 only (progress lines, summaries)."""
    if is_main():
        print(*args, **kwargs)
        sys.stdout.flush()


def progress_enabled(wanted: bool = True) -> bool:
    """Progress bars and ``metrics.jsonl`` are written by rank 0 only."""
    return wanted and is_main()


@contextmanager
def main_first():
    """Rank 0 runs the body first (downloads, cache builds), the others after a barrier."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def _comm_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (float64 on the wire; ints survive up to 2^53)."""
    if not is_distributed():
        return values
    buf = values.detach().to(_comm_device(), torch.float64)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(values.device, values.dtype)


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; ``[obj]`` unsharded)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def global_kind_counts(local_counts) -> list[int]:
    """Valid-token counts per kind (forget, mismatch, normal) over every rank's rows: the loss
    normalisers, so N ranks compute exactly what one process computes on the whole batch."""
    return [int(c) for c in all_reduce_sum(torch.tensor(local_counts, dtype=torch.float64))]


def reduce_metric_sums(sums: dict[str, float]) -> dict[str, float]:
    """Sum per-rank metric sums (losses summed over tokens, token counts) over every rank."""
    keys = sorted(sums)
    total = all_reduce_sum(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, total.tolist()))


def share(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous share of ``n`` items: sizes differ by at most one, every item is in
    exactly one share, and the shares concatenate, in rank order, to the whole list."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def check_rows_per_rank(batch_size: int, world: int | None = None) -> None:
    """Every rank needs at least one row of each kind in every batch (each rank must run the
    forward: the sharded layers gather their weights collectively)."""
    w = world_size() if world is None else world
    if batch_size < w:
        raise DistributedError(f"train.batch_size={batch_size} rows per kind cannot be split "
                               f"over {w} processes: use batch_size >= {w} or fewer processes")


class RankBatcher:
    """This rank's share of the global batch of an ``UnlearnBatcher``.

    Every rank advances the same seeded samplers (so the global stream and its position are the
    same on all ranks and for any number of ranks) and collates only its share of each kind's
    rows, kinds kept in [forget; mismatch; normal] order. With one process the share is the
    whole batch: ``next()`` equals ``UnlearnBatcher.next()``.
    """

    def __init__(self, batcher, rank_: int | None = None, world: int | None = None):
        self.batcher = batcher
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        check_rows_per_rank(min(s.batch_size for s in batcher.samplers), self.world)

    def next(self):
        """This rank's share of each kind of the next global batch (every rank draws it whole:
        the same samplers and the same generators for drawn rows), collated."""
        draws = self.batcher.draw()
        return self.batcher.collate([d.part(share(len(d.picked), self.rank, self.world))
                                     for d in draws])

    @property
    def pack(self) -> bool:
        return self.batcher.pack

    # The position of the global stream: the same on every rank.
    def state_dict(self) -> dict:
        return {"draws": self.batcher.draws,
                "samplers": [{"rng": _jsonable(s.rng.getstate()), "queue": s.queue}
                             for s in self.batcher.samplers]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["samplers"]
        if len(saved) != len(self.batcher.samplers):
            raise DistributedError("checkpoint sampler state does not match this data")
        self.batcher.draws = state["draws"]
        for s, st in zip(self.batcher.samplers, saved):
            s.rng.setstate(_tupled(st["rng"]))
            s.queue = [list(g) for g in st["queue"]]


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x
