"""Make ``fastunlearn.triton_kernels`` importable from a source checkout that is not installed.

Installed (regular or editable), setuptools maps the repository's ``triton_kernels/`` folder to
``fastunlearn.triton_kernels``. Run from a bare checkout (``PYTHONPATH=.``, as on a GPU machine
without pip access) that mapping is missing, so we register the folder under the same name.
It is never installed as a top-level ``triton_kernels``, which would clash with Triton's own.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def map_triton_kernels() -> None:
    name = "fastunlearn.triton_kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "triton_kernels"
    init = folder / "__init__.py"
    if not init.exists():
        return
    spec = importlib.util.spec_from_file_location(name, init,
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
