"""Run a function on N gloo ranks forked from the test process (about a second per case).

``torchrun`` starts a fresh interpreter per rank (about 30 s of imports here); forking after
the imports and meeting at a file rendezvous skips that. Each rank runs ``fn(*args)`` inside an
initialised process group and sends back its return value (through ``torch.save``); a failing
rank's traceback is raised in the parent.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def _child(fn, args, rank: int, world: int, rendezvous: str, out: str) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                                world_size=world)
        result = fn(*args)
        dist.barrier()
        torch.save({"ok": result}, out)
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        torch.save({"error": traceback.format_exc()}, out)
        code = 1
    finally:
        os._exit(code)  # no atexit / pytest teardown in the child


def run_ranks(fn, *args, world: int = 2, timeout: float = 120.0) -> list:
    """``[fn(*args) on rank 0, ..., on rank world-1]``, each inside a gloo process group."""
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="fu-dist-") as tmp:
        rendezvous = str(Path(tmp) / "rendezvous")
        outs = [str(Path(tmp) / f"rank{r}.pt") for r in range(world)]
        procs = [ctx.Process(target=_child, args=(fn, args, r, world, rendezvous, outs[r]))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r, (p, out) in enumerate(zip(procs, outs)):
            if not os.path.exists(out):
                raise RuntimeError(f"rank {r} died without a result (exit code {p.exitcode})")
            got = torch.load(out, weights_only=False)
            if "error" in got:
                raise RuntimeError(f"rank {r} failed:\n{got['error']}")
            results.append(got["ok"])
        return results


def run_killed(fn, *args, timeout: float = 120.0) -> int:
    """Run ``fn(*args)`` in one forked process (no process group) that may kill itself with
    SIGKILL; returns its exit code (``-9`` after kill -9)."""
    ctx = mp.get_context("fork")

    def body():
        torch.set_num_threads(1)
        fn(*args)
        os._exit(0)

    p = ctx.Process(target=body)
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
    return p.exitcode
