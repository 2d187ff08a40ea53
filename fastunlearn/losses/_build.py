"""Just-in-time build of the compiled loss extensions in ``csrc/`` (cached on disk).

Nothing here runs at import time. :func:`load_extension` compiles on first use with
``torch.utils.cpp_extension.load`` into a cache directory keyed by the sources, the flags, the
torch version and the machine, so later processes only load the shared library (well under a
second). Without ninja (``load`` requires it) the same sources are built with setuptools in a
subprocess instead. A failed build raises :class:`ExtensionBuildError` whose message carries the
tail of the compiler output; the full output is kept in ``<build dir>/build_error.log``.

Environment:
    FASTUNLEARN_BUILD_DIR   root of the build cache (default ``~/.cache/fastunlearn``)
    FASTUNLEARN_NO_BUILD=1  never compile: only load an extension that is already built
    FASTUNLEARN_CPU_FLAGS   extra C++ flags for the CPU backend (default ``-march=native``)
    FASTUNLEARN_VERBOSE_BUILD=1  stream the compiler output
    FASTUNLEARN_BUILD_BACKEND=setuptools  build with setuptools even when ninja is present
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from ..log import get_logger

_LOCK = threading.Lock()
_CACHE: dict[str, object] = {}
_FAILED: dict[str, str] = {}


class ExtensionBuildError(RuntimeError):
    """The extension could not be compiled or loaded; the message has the compiler output."""


def csrc_dir() -> Path:
    """Directory with the C++ / CUDA sources (``fastunlearn.csrc``: the checkout's ``csrc/``
    in an editable install, package data in a wheel)."""
    try:
        import fastunlearn.csrc as pkg

        return Path(pkg.__file__).resolve().parent
    except ImportError:  # running from a source tree without installing
        return Path(__file__).resolve().parents[2] / "csrc"


def build_root() -> Path:
    root = os.environ.get("FASTUNLEARN_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastunlearn")
    return Path(root)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _cpu_signature() -> str:
    """Identifies the host CPU so that a -march=native build is never reused on another CPU."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return text


def _build_dir(name: str, sources: list[Path], flags: list[str]) -> Path:
    import torch

    h = hashlib.sha256()
    for src in sorted(sources):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    for hdr in sorted(csrc_dir().glob("*.h")) + sorted(csrc_dir().glob("*.cuh")):
        h.update(hdr.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(_cpu_signature().encode())
    d = build_root() / f"{name}-{h.hexdigest()[:16]}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _built_library(build_dir: Path, name: str) -> Path | None:
    for p in sorted(build_dir.glob(f"{name}*.so")) + sorted(build_dir.glob(f"{name}*.pyd")):
        return p
    return None


def _import_from(path: Path, name: str):
    import torch  # noqa: F401  (the extension links against libtorch: load it first)

    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fail(name: str, build_dir: Path, summary: str, output: str) -> ExtensionBuildError:
    log = build_dir / "build_error.log"
    try:
        log.write_text(output)
    except OSError:
        pass
    tail = "\n".join(output.strip().splitlines()[-40:])
    return ExtensionBuildError(
        f"building the fastunlearn extension {name!r} failed: {summary} (full log: {log})\n{tail}")


def _setuptools_build(name, sources, build_dir, cflags, cuda_cflags, ldflags, with_cuda):
    """Build with setuptools in a subprocess (the path torch uses when ninja is missing)."""
    script = build_dir / "setup_build.py"
    ext_cls = "CUDAExtension" if with_cuda else "CppExtension"
    compile_args = {"cxx": cflags}
    if with_cuda:
        compile_args["nvcc"] = cuda_cflags
    script.write_text(
        "from setuptools import setup\n"
        f"from torch.utils.cpp_extension import BuildExtension, {ext_cls}\n"
        f"setup(name={name!r}, ext_modules=[{ext_cls}({name!r}, {[str(s) for s in sources]!r}, "
        f"extra_compile_args={compile_args!r}, extra_link_args={ldflags!r})],\n"
        "      cmdclass={'build_ext': BuildExtension.with_options(use_ninja=False)})\n")
    cmd = [sys.executable, str(script), "build_ext", "--build-lib", str(build_dir),
           "--build-temp", str(build_dir / "tmp")]
    proc = subprocess.run(cmd, cwd=build_dir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise _fail(name, build_dir, f"setuptools build exited with {proc.returncode}",
                    proc.stdout + proc.stderr)
    lib = _built_library(build_dir, name)
    if lib is None:
        raise _fail(name, build_dir, "setuptools produced no library", proc.stdout + proc.stderr)
    return _import_from(lib, name)


def load_extension(name: str, sources: list[str], *, cflags: list[str] | None = None,
                   cuda_cflags: list[str] | None = None, ldflags: list[str] | None = None,
                   with_cuda: bool = False, source_dir: str | Path | None = None,
                   build: bool = True):
    """Compile (first time) and import the extension ``name`` built from ``csrc/<sources>``
    (or ``source_dir/<sources>``).

    The result, or the failure, is cached for the process; the build itself is cached on disk.
    Raises ExtensionBuildError with the compiler output when the build fails. ``build=False``
    only loads an extension that is already built (raises ExtensionBuildError otherwise).
    """
    with _LOCK:
        if name in _CACHE:
            return _CACHE[name]
        if name in _FAILED:
            raise ExtensionBuildError(_FAILED[name])
        if not build:
            return _load_uncached(name, sources, cflags or [], cuda_cflags or [], ldflags or [],
                                  with_cuda, source_dir, build=False)
        try:
            module = _load_uncached(name, sources, cflags or [], cuda_cflags or [],
                                    ldflags or [], with_cuda, source_dir)
        except ExtensionBuildError as exc:
            _FAILED[name] = str(exc)
            raise
        _CACHE[name] = module
        return module


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Inter-process lock around a build. flock is released by the kernel when its holder dies,
    unlike torch's own 'lock' file (FileBaton), which a killed build leaves behind and which makes
    every later build wait forever; holding this lock, such a file can only be stale."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on torch's baton alone
        yield
        return
    with open(build_dir / ".fastunlearn_build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                stale.unlink()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load_uncached(name, sources, cflags, cuda_cflags, ldflags, with_cuda, source_dir,
                   build=True):
    srcs = [Path(source_dir or csrc_dir()) / s for s in sources]
    missing = [str(s) for s in srcs if not s.is_file()]
    if missing:
        raise ExtensionBuildError(f"extension {name!r}: missing sources {missing}")
    build_dir = _build_dir(name, srcs, cflags + cuda_cflags + ldflags + [str(with_cuda)])
    lib = _built_library(build_dir, name)
    import_failed = False
    if lib is not None and not (build_dir / "lock").exists():
        try:
            return _import_from(lib, name)
        except Exception:  # stale or partial library: rebuild below
            if _env_flag("FASTUNLEARN_NO_BUILD") or not build:
                raise
            import_failed = True
    if _env_flag("FASTUNLEARN_NO_BUILD") or not build:
        why = "FASTUNLEARN_NO_BUILD=1" if build else "it builds on first use"
        raise ExtensionBuildError(f"extension {name!r} is not built yet in {build_dir} ({why})")
    with _build_lock(build_dir):
        lib = _built_library(build_dir, name)
        if lib is not None and not import_failed:  # built by another process meanwhile
            try:
                return _import_from(lib, name)
            except Exception:
                pass
        return _compile(name, srcs, build_dir, cflags, cuda_cflags, ldflags, with_cuda)


def _compile(name, srcs, build_dir, cflags, cuda_cflags, ldflags, with_cuda):
    # A first build can take minutes (280 s were seen on a busy 2-core machine): say so, at
    # warning level so that a program which never configured logging shows it too.
    get_logger(__name__).warning(
        f"compiling the {'CUDA' if with_cuda else 'C++'} extension {name!r} once (a few "
        f"minutes, longer on a busy machine); later runs reuse {build_dir}")
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        try:
            cpp_extension.verify_ninja_availability()
            has_ninja = True
        except RuntimeError:
            has_ninja = False
    else:
        has_ninja = True
    if not has_ninja or os.environ.get("FASTUNLEARN_BUILD_BACKEND") == "setuptools":
        return _setuptools_build(name, srcs, build_dir, cflags, cuda_cflags, ldflags, with_cuda)
    try:
        return cpp_extension.load(
            name=name, sources=[str(s) for s in srcs], extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags or None, extra_ldflags=ldflags,
            build_directory=str(build_dir), with_cuda=with_cuda,
            verbose=_env_flag("FASTUNLEARN_VERBOSE_BUILD"))
    except Exception as exc:  # torch puts the ninja / compiler output in the message
        raise _fail(name, build_dir, type(exc).__name__, str(exc)) from exc


def extension_status(load, device_type, name: str) -> tuple[bool, str]:
    """(available, reason) for a backend's registry probe. ``load(build=...)`` imports the
    extension; a device-less probe (``device_type=None``, listing the backends) never compiles."""
    try:
        mod = load(build=device_type is not None)
    except ExtensionBuildError as exc:
        return False, str(exc).splitlines()[0]
    return True, f"built ({getattr(mod, '__file__', name)})"


def cpu_arch_flags() -> list[str]:
    """Flags for the CPU backend: -O3 plus -march=native unless FASTUNLEARN_CPU_FLAGS says else.

    The build is per machine (the cache key includes the CPU model and flags), so native is safe.
    """
    env = os.environ.get("FASTUNLEARN_CPU_FLAGS")
    if env is not None:
        return env.split()
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64") and os.name == "posix":
        return ["-march=native"]
    return []
