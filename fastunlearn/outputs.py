"""One output rule for every command (``run``, ``eval``, ``collect``, ``Trainer.run``).

* A target folder must be new or empty; a target file must be new. Nothing is written over.
  (A default name that is taken steps to the next free one, ``name-2``, ``name-3``, ...)
* A target is never one of the command's inputs.
* Writes are atomic: a folder is filled as a hidden sibling ``.<name>.partial`` and renamed
  when complete; a file is written to a hidden temporary file and renamed.
* The hidden sibling is also the lock of the target: a second run to the same target fails at
  once with one line. The partial folder of a killed run is noticed by the next run to that
  target, reported, and renamed aside (``.<name>.killed-<time>``); nothing is deleted.
* Files and folders get the permissions a plain ``open()`` / ``mkdir()`` gives (umask).

Every refusal is an :class:`OutputError` (a ``ValueError`` with a one-line message).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .log import get_logger

OWNER_FILE = ".fastunlearn-owner"


class OutputError(ValueError):
    """An output location that cannot or must not be written (one-line message)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor (or ``path`` itself) that exists."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_location(path: str | os.PathLike, what: str) -> None:
    """``path`` (a folder, maybe not yet created) can be created and written.

    Checked without creating anything: the nearest existing ancestor must be a writable folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise OutputError(f"{what} {path} lies under {base}, which is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: {base} is not writable")


def check_target_dir(out: str | os.PathLike, what: str = "output folder") -> Path:
    """``out`` is new or an empty folder, and its location is writable."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise OutputError(f"{what} {out} exists and is not empty: choose a new one "
                          "(results are never written over)")
    check_writable_location(out, what)
    return out


def check_fresh_dir(folder: Path) -> Path:
    """``folder`` is new, or empty, or a working folder from :func:`claim_dir` that holds only
    its owner mark (what ``Trainer.run`` writes into)."""
    folder = Path(folder)
    if folder.is_dir() and any(p.name != OWNER_FILE for p in folder.iterdir()):
        raise OutputError(f"output folder {folder} is not empty: choose a new one (results are "
                          "never written over)")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output folder {folder} is a file")
    return folder


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_target_file(out: str | os.PathLike, inputs: Iterable = (),
                      what: str = "output file") -> Path:
    """``out`` is a new file, not one of ``inputs``, in a writable folder."""
    out = Path(out)
    for src in inputs:
        if src is not None and (_same_file(out, Path(src)) or
                                out.absolute() == Path(src).absolute()):
            raise OutputError(f"{what} {out} is also an input: choose another name")
    if out.is_dir():
        raise OutputError(f"{what} {out} is a folder")
    if out.exists():
        raise OutputError(f"{what} {out} exists: choose a new name (files are never "
                          "written over)")
    check_writable_location(out.parent if str(out.parent) else Path("."), f"{what} folder")
    return out


def free_name(path: str | os.PathLike) -> Path:
    """``path`` if nothing has that name, else the first free ``stem-N.suffixes``."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return path
    name = path.name
    stem, dot, suffixes = name.partition(".") if not name.startswith(".") else (name, "", "")
    n = 2
    while True:
        candidate = path.with_name(f"{stem}-{n}{dot}{suffixes}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
        n += 1


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _owner() -> str:
    return f"{os.getpid()} {socket.gethostname()}"


def _owner_is_alive(work: Path, text: str) -> bool:
    """True unless the owner is a process of this host that no longer exists (or, without an
    owner mark, unless the folder is more than a minute old: the mark follows at once)."""
    try:
        pid_text, host = text.split()
        pid = int(pid_text)
    except ValueError:
        try:
            return time.time() - work.stat().st_mtime < 60
        except OSError:
            return True
    if host != socket.gethostname():
        return True  # another machine: cannot tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _set_aside_killed(work: Path, out: Path) -> None:
    """The partial folder of a killed run: keep it under a new name and say so."""
    aside = free_name(work.with_name(f".{out.name}.killed-{time.strftime('%Y%m%d-%H%M%S')}"))
    os.rename(work, aside)
    get_logger(__name__).warning(f"note: an earlier run to {out} was killed; its partial "
                                 f"folder is kept as {aside} (delete it when not needed)")


def claim_dir(out: str | os.PathLike, what: str = "output folder") -> Path:
    """Check ``out`` and create its hidden working folder (the lock). Returns the folder."""
    out = check_target_dir(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = partial_dir(out)
    for _ in range(2):
        try:
            os.mkdir(work)  # atomic: exactly one run gets the folder
        except FileExistsError:
            try:
                owner = (work / OWNER_FILE).read_text()
            except OSError:
                owner = ""
            if _owner_is_alive(work, owner):
                who = f" (pid {owner.split()[0]})" if owner else ""
                raise OutputError(f"another run{who} is writing {out} (working folder {work}): "
                                  "wait for it or choose another output") from None
            _set_aside_killed(work, out)
            continue
        (work / OWNER_FILE).write_text(_owner())
        return work
    raise OutputError(f"cannot claim {work}: another run keeps creating it")


def publish_dir(work: Path, out: str | os.PathLike) -> Path:
    """Rename the finished working folder to ``out``. If something else filled ``out`` in the
    meantime, the results go to a free name instead and OutputError says where."""
    out = Path(out)
    with contextlib.suppress(FileNotFoundError):
        (work / OWNER_FILE).unlink()
    try:
        os.rename(work, out)  # replaces an empty folder, refuses a non-empty one
        return out
    except OSError:
        pass
    alt = free_name(out)
    os.rename(work, alt)
    raise OutputError(f"{out} was written by something else while this run worked; this run's "
                      f"results are in {alt}")


def discard_dir(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """``with atomic_dir(out) as work:`` fill ``work``; it becomes ``out`` only on success,
    and is removed on any failure (an exception, Ctrl-C, SIGTERM)."""
    out = Path(out)
    new_parents = [p for p in out.absolute().parents if not p.exists()]  # deepest first
    work = claim_dir(out, what)
    try:
        yield work
    except BaseException:
        discard_dir(work)
        for folder in new_parents:  # the folders created for it, if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    publish_dir(work, out)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, inputs: Iterable = (), mode: str = "w",
                encoding: str | None = "utf-8") -> Iterator:
    """``with atomic_file(path) as f:`` write ``f``; ``path`` appears only when complete, with
    plain ``open()`` permissions. ``path`` must be new and not one of ``inputs``."""
    path = check_target_file(path, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        # link() fails if the name was taken meanwhile: never written over.
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise OutputError(f"output file {path} appeared while writing: choose a new "
                              "name") from None
        except OSError:  # a filesystem without hard links: check, then rename
            check_target_file(path, inputs)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
