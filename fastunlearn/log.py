"""Loggers of the library and the console setup of the command line.

Library modules log through ``get_logger(__name__)`` (the ``fastunlearn`` logger and its
children) and never install handlers or set levels: a program that imports fastunlearn keeps
Python's defaults (warnings on stderr, info silent) until it configures logging itself. The
command line calls ``configure``: one plain line per record on stderr, info and up by default.
"""
from __future__ import annotations

import logging
import os
import sys

ROOT = "fastunlearn"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``fastunlearn`` logger, or its child for ``name`` (a module's ``__name__`` or a
    short name such as ``"trainer"``)."""
    if not name or name == ROOT:
        return logging.getLogger(ROOT)
    if name.startswith(ROOT + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{ROOT}.{name}")


class _CurrentStderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes (a redirect, a test's capture),
    not as it was when the handler was made."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property decides
        pass


def configure(verbosity: str | int = "info") -> logging.Logger:
    """Console logging for the command line: ``fastunlearn: <message>`` on stderr for records
    at ``verbosity`` (debug | info | warning | error, or a logging level) and above.

    Calling it again replaces the earlier setup. Processes other than rank 0 of a
    ``torchrun`` / ``accelerate`` launch show warnings and errors only, so an info line
    appears once.
    """
    level = LEVELS.get(verbosity, verbosity) if isinstance(verbosity, str) else verbosity
    if not isinstance(level, int):
        raise ValueError(f"log verbosity must be one of {', '.join(LEVELS)}, got {verbosity!r}")
    if os.environ.get("RANK", "0") not in ("", "0"):
        level = max(level, logging.WARNING)
    logger = get_logger()
    for handler in [h for h in logger.handlers if isinstance(h, _CurrentStderr)]:
        logger.removeHandler(handler)
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(f"{ROOT}: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    return logger


def reset() -> None:
    """Undo :func:`configure`: the ``fastunlearn`` logger back to Python's defaults (the
    command line calls it on return, so an in-process ``main()`` leaves no handler behind)."""
    logger = get_logger()
    for handler in [h for h in logger.handlers if isinstance(h, _CurrentStderr)]:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
