"""SIGTERM (schedulers, ``docker stop``) handled like Ctrl-C: it raises :class:`Terminated`, a
``KeyboardInterrupt``, so every cleanup path that runs for Ctrl-C runs for SIGTERM too (the
hidden working folder of a run is removed, see outputs.py).

``Trainer.on_interrupt`` is called before that cleanup: with checkpoints on, a SIGTERM writes a
final checkpoint there (the trainer lets the current step finish first).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise_terminated(signum, frame):
    raise Terminated("terminated (SIGTERM)")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
