"""Metrics of a run as it trains: ``metrics.jsonl`` always, TensorBoard event files when asked.

``train.report_to=tensorboard`` adds ``<run>/tensorboard/`` beside ``metrics.jsonl``: every
number of a step's row as the scalar ``train/<key>`` and of an evaluation as ``eval/<key>``, at
the optimizer step. View it with ``tensorboard --logdir <run>/tensorboard``.
"""
from __future__ import annotations

import json
import numbers
from pathlib import Path

REPORT_TO = ("none", "tensorboard")


class MetricsLogError(ValueError):
    """A metrics destination that cannot be used here (one-line message)."""


def summary_writer_class(report_to: str):
    """The ``SummaryWriter`` class for ``report_to="tensorboard"`` (None for ``"none"``); a
    one-line error, before any work, when TensorBoard is not installed."""
    if report_to not in REPORT_TO:
        raise MetricsLogError(f"train.report_to must be {' or '.join(REPORT_TO)}, "
                              f"got {report_to!r}")
    if report_to == "none":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MetricsLogError("train.report_to=tensorboard needs TensorBoard, which is not "
                              "installed: pip install tensorboard") from None
    return SummaryWriter


def _numbers(values: dict) -> dict[str, float]:
    """The entries that are plottable numbers (not the step, not flags, not missing)."""
    return {k: float(v) for k, v in values.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class MetricsLog:
    """Writes each step's row to ``<run_dir>/metrics.jsonl`` (one JSON object per line,
    flushed per step) and, with ``report_to="tensorboard"``, to ``<run_dir>/tensorboard/``.

    ``enabled=False`` (every process but rank 0) writes nothing; the check that TensorBoard
    is installed runs anyway, so that all processes fail alike. Use it as a context manager,
    or call ``close``.
    """

    def __init__(self, run_dir: str | Path, report_to: str = "none", *, enabled: bool = True):
        writer_class = summary_writer_class(report_to)
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._board = None
        if not enabled:
            return
        self._jsonl = open(self.run_dir / "metrics.jsonl", "w", encoding="utf-8")
        if writer_class is not None:
            self._board = writer_class(log_dir=str(self.run_dir / "tensorboard"), flush_secs=30)

    @property
    def enabled(self) -> bool:
        return self._jsonl is not None

    def step(self, row: dict) -> None:
        """One optimizer step's row (it has ``step``)."""
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._board is not None:
            for key, value in _numbers(row).items():
                self._board.add_scalar(f"train/{key}", value, int(row["step"]))

    def evaluation(self, metrics: dict) -> None:
        """An evaluation's numbers (the dict has ``step``); TensorBoard only: evaluations are
        recorded in ``summary.json``."""
        if self._board is None or not metrics:
            return
        for key, value in _numbers(metrics).items():
            self._board.add_scalar(f"eval/{key}", value, int(metrics["step"]))

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
