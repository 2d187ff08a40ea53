"""Keeping freed host memory in the process during CPU training.

Why: glibc serves every allocation above its mmap threshold (32 MB at most) with a fresh
``mmap`` and returns it to the kernel on free. A CPU training step allocates and frees the same
large buffers every time (the head's (V, H) gradient and its fp32 copies: 113 MB each for
SmolLM2-135M), so every step touches them anew: about 10^5 page faults a step (4 KB each, zeroed
by the kernel) on that model, several percent of the step, more when the host reclaims memory
in the background. Told to serve large blocks from its heap and to keep freed memory
(``mallopt``), glibc reuses the same pages from the second step on: a few thousand faults a step,
the same peak resident memory.

Process-wide and permanent, so only the trainer calls it (``train.keep_freed_memory``), never the
loss functions a host program imports. Other C libraries (musl, macOS) are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

from .log import get_logger

log = get_logger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h parameter numbers
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1 << 30  # freed memory at the top of the heap kept up to 1 GiB


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no ``mmap`` for large blocks, trimming only above
    1 GiB of free heap). Returns whether it applied; False (nothing changed) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if applied:
        log.debug("glibc keeps freed memory for reuse (no mmap for large blocks)")
    return applied
