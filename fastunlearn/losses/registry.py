"""Backend registry: which implementation of the fused loss runs, and why.

Each backend module registers itself with :func:`register_backend`. Kernel backends live in
modules listed in ``_OPTIONAL_MODULES`` and are imported lazily, so a missing Triton or an
unbuilt extension never breaks ``import fastunlearn``.

Rules: ``auto`` picks the fastest available backend for the tensors' device, so the default is
the fast path; asking for a backend by name that cannot run here is an error (a silent swap would
hide a broken install); an automatic fallback to a slower backend warns once, and
``FASTUNLEARN_STRICT=1`` turns it into an error (CI and benchmarks must not measure a fallback).
Capabilities are declared fields of :class:`Backend`, not probed.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


@dataclass
class Backend:
    name: str
    # fn(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, options)
    #   -> LossOutput, after the shared input check (checks.check_inputs)
    fn: Callable
    devices: tuple[str, ...]  # device types it runs on: "cpu", "cuda"
    priority: int  # higher wins under "auto"
    # availability(device_type) -> (ok, reason); device_type is "cpu", "cuda" or None (any)
    availability: Callable[[str | None], tuple[bool, str]] = field(
        default=lambda device_type: (True, "always"))
    description: str = ""
    # where ``auto`` may pick it (None: every device in ``devices``); triton runs on CPU only
    # through the interpreter, on request
    auto_devices: tuple[str, ...] | None = None
    # floating dtypes it takes for hidden states and heads
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float64)
    # with options.num_rows given, the forward reads nothing back from the device
    sync_free: bool = False
    # labels and kinds are checked by the backend on the device (folded into its one count,
    # or a deferred flag), so the shared check does not synchronise for them
    checks_rows_on_device: bool = False

    def available(self, device_type: str | None = None) -> tuple[bool, str]:
        if device_type is not None and device_type not in self.devices:
            return False, f"runs on {'/'.join(self.devices)}, not {device_type}"
        try:
            return self.availability(device_type)
        except Exception as exc:  # a probe must never crash the registry
            return False, f"probe failed: {exc}"


_BACKENDS: dict[str, Backend] = {}
# name -> module that registers it when imported
_OPTIONAL_MODULES = {
    "triton": "fastunlearn.losses.triton_backend",
    "cuda": "fastunlearn.losses.cuda_backend",
    "cpp": "fastunlearn.losses.cpp_backend",
}
_import_errors: dict[str, str] = {}
_warned: set[tuple[str, str]] = set()


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def _load_optional() -> None:
    for name, module in _OPTIONAL_MODULES.items():
        if name in _BACKENDS or name in _import_errors:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:
            _import_errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]


def backend_names() -> list[str]:
    _load_optional()
    return ["auto", *sorted(set(_BACKENDS) | set(_OPTIONAL_MODULES))]


def describe_backends() -> list[dict]:
    """One dict per backend: name, devices, available (here), reason."""
    _load_optional()
    rows = []
    for name in sorted(set(_BACKENDS) | set(_OPTIONAL_MODULES)):
        if name in _BACKENDS:
            b = _BACKENDS[name]
            ok, why = b.available()
            rows.append({"name": name, "devices": list(b.devices), "available": ok,
                         "reason": why, "priority": b.priority, "description": b.description,
                         "dtypes": [str(d).replace("torch.", "") for d in b.dtypes],
                         "sync_free": b.sync_free})
        else:
            rows.append({"name": name, "devices": [], "available": False,
                         "reason": _import_errors.get(name, "not installed"), "priority": -1,
                         "description": "", "dtypes": [], "sync_free": False})
    return rows


def _strict() -> bool:
    return os.environ.get("FASTUNLEARN_STRICT", "0") not in ("", "0", "false", "False")


@torch.compiler.disable  # lazy imports and warnings must not be traced
def resolve_backend(name: str, device_type: str) -> Backend:
    """Return the backend to run for ``name`` on ``device_type`` ('cpu' / 'cuda')."""
    _load_optional()
    if name != "auto":
        if name not in _BACKENDS:
            known = ", ".join(backend_names())
            why = _import_errors.get(name, "unknown backend")
            raise BackendUnavailableError(
                f"backend {name!r} is not available: {why} (known: {known})")
        ok, why = _BACKENDS[name].available(device_type)
        if not ok:
            raise BackendUnavailableError(f"backend {name!r} is not available here: {why}")
        return _BACKENDS[name]
    # Backends may run on a device only on request (triton on CPU through the interpreter):
    # ``auto_devices`` lists where ``auto`` may pick them.
    candidates = sorted((b for b in _BACKENDS.values()
                         if device_type in (b.auto_devices or b.devices)),
                        key=lambda b: -b.priority)
    best_possible = [b for b in candidates if b.name != "reference"]
    for b in candidates:
        if b.name == "reference":
            continue
        ok, why = b.available(device_type)
        if ok:
            skipped = best_possible[: best_possible.index(b)] if b in best_possible else []
            if skipped:
                msg = (f"fastunlearn: backend 'auto' fell back to {b.name!r} on {device_type} "
                       f"({skipped[0].name} unavailable: {skipped[0].available(device_type)[1]})")
                if _strict():
                    raise BackendUnavailableError(msg + " and FASTUNLEARN_STRICT=1")
                if (b.name, device_type) not in _warned:
                    _warned.add((b.name, device_type))
                    warnings.warn(msg, stacklevel=3)
            return b
    raise BackendUnavailableError(f"no loss backend available for device {device_type!r}")


def get_backend(name: str) -> Backend | None:
    _load_optional()
    return _BACKENDS.get(name)
