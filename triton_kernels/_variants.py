"""Load a kernel module in a given Triton mode, whatever TRITON_INTERPRET says right now.

Triton decides at decoration time whether ``@triton.jit`` builds a compiled kernel or an
interpreted one. CI runs CPU tensors through the interpreter while the GPU tests of the same
pytest process need compiled kernels, so each kernel file is loaded twice under private module
names: once with TRITON_INTERPRET=1 (for CPU tensors) and once with it unset (for CUDA).
The environment variable is toggled only while the copy is executed (import time, once).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
from types import ModuleType

_LOCK = threading.Lock()


def load_variant(path: str, interpret: bool) -> ModuleType:
    """The module at ``path`` executed with TRITON_INTERPRET = 1 / 0 (cached)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"fastunlearn.triton_kernels._{stem}_{'interp' if interpret else 'jit'}"
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    with _LOCK:
        mod = sys.modules.get(name)
        if mod is not None:
            return mod
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            sys.modules[name] = mod
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old
    return mod
