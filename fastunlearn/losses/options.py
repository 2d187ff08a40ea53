"""The non-tensor options of the fused loss, as one frozen object every backend takes."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .types import (
    DEFAULT_EPS_FORGET,
    DEFAULT_EPS_MISMATCH,
    DEFAULT_EPS_NORMAL,
    IGNORE_INDEX,
    REDUCTIONS,
)


@dataclass(frozen=True)
class LossOptions:
    """Everything about one loss call that is not a tensor.

    Logits are ``softcap(logit_scale * (h W^T + b))``: the scale first (Granite's
    ``logits_scaling`` s means ``logit_scale = 1 / s``; Cohere's ``logit_scale`` and Falcon-H1's
    ``lm_head_multiplier`` are used as they are), the soft-cap ``c * tanh(x / c)`` last (Gemma).

    Attributes:
        eps_forget, eps_mismatch, eps_normal: coefficients; loss = -eps_forget * forget_nll
            + eps_mismatch * mismatch_nll + eps_normal * normal_kl.
        reduction: "mean" (each term over its own valid tokens) or "sum".
        softcap: cap c > 0, or None.
        logit_scale: finite, non-zero multiplier of the logits.
        ignore_index: label of rows that do not count.
        chunk_rows: rows per chunk, or None for the plan of ``driver.plan_chunks``.
        num_rows: host-side valid-row counts (forget, mismatch, normal), or None. Backends that
            declare ``sync_free`` size their GEMMs from them instead of reading the device.
    """

    eps_forget: float = DEFAULT_EPS_FORGET
    eps_mismatch: float = DEFAULT_EPS_MISMATCH
    eps_normal: float = DEFAULT_EPS_NORMAL
    reduction: str = "mean"
    softcap: float | None = None
    logit_scale: float = 1.0
    ignore_index: int = IGNORE_INDEX
    chunk_rows: int | None = None
    num_rows: tuple[int, int, int] | None = None

    def __post_init__(self):
        for name in ("eps_forget", "eps_mismatch", "eps_normal"):
            value = getattr(self, name)
            if not math.isfinite(float(value)):
                raise ValueError(f"{name} must be finite, got {value}")
            object.__setattr__(self, name, float(value))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.softcap is not None:
            if not (math.isfinite(float(self.softcap)) and self.softcap > 0):
                raise ValueError(f"softcap must be positive or None, got {self.softcap}")
            object.__setattr__(self, "softcap", float(self.softcap))
        scale = float(self.logit_scale)
        if not math.isfinite(scale) or scale == 0.0:
            raise ValueError(f"logit_scale must be finite and non-zero, got {self.logit_scale}")
        object.__setattr__(self, "logit_scale", scale)
        object.__setattr__(self, "ignore_index", int(self.ignore_index))
        if self.chunk_rows is not None:
            if int(self.chunk_rows) <= 0:
                raise ValueError(f"chunk_rows must be positive, got {self.chunk_rows}")
            object.__setattr__(self, "chunk_rows", int(self.chunk_rows))
        if self.num_rows is not None:
            counts = tuple(int(n) for n in self.num_rows)
            if len(counts) != 3 or min(counts) < 0:
                raise ValueError("num_rows must be three non-negative counts (forget, mismatch, "
                                 f"normal), got {self.num_rows}")
            object.__setattr__(self, "num_rows", counts)

    @property
    def reduction_sum(self) -> bool:
        return self.reduction == "sum"

    @property
    def signs(self) -> tuple[float, float, float]:
        """d loss / d term for (forget_nll, mismatch_nll, normal_kl)."""
        return (-self.eps_forget, self.eps_mismatch, self.eps_normal)
