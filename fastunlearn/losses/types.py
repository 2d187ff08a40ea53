"""Shared constants and the output object of every loss backend."""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

# Row kinds. A row is one token position (one row of the (BT, H) hidden matrix).
KIND_FORGET = 0  # gradient ascent on the harmful answer
KIND_MISMATCH = 1  # harmful prompt paired with a random normal answer: plain NLL
KIND_NORMAL = 2  # KL(p_ref || p_cur) against the frozen reference
KIND_NAMES = ("forget", "mismatch", "normal")

# Paper defaults (Yao, Xu, Liu 2023).
DEFAULT_EPS_FORGET = 0.5
DEFAULT_EPS_MISMATCH = 1.0
DEFAULT_EPS_NORMAL = 1.0

REDUCTIONS = ("mean", "sum")


@dataclass
class LossOutput:
    """Total loss and its terms.

    With ``reduction="mean"`` each term is the mean over its own valid tokens (0 when the kind is
    absent); with ``"sum"`` each term is the sum over its valid tokens. ``loss`` is
    ``-eps_forget * forget_nll + eps_mismatch * mismatch_nll + eps_normal * normal_kl``.
    Counts are int64 tensors on the loss's device (no host synchronisation).
    """

    loss: torch.Tensor
    forget_nll: torch.Tensor
    mismatch_nll: torch.Tensor
    normal_kl: torch.Tensor
    n_forget: torch.Tensor
    n_mismatch: torch.Tensor
    n_normal: torch.Tensor
    backend: str = "reference"

    def detached(self) -> dict[str, float]:
        """Host-side floats for logging (this synchronises)."""
        return {
            "loss": float(self.loss.detach()),
            "forget_nll": float(self.forget_nll.detach()),
            "mismatch_nll": float(self.mismatch_nll.detach()),
            "normal_kl": float(self.normal_kl.detach()),
            "n_forget": int(self.n_forget),
            "n_mismatch": int(self.n_mismatch),
            "n_normal": int(self.n_normal),
        }


def check_options(reduction: str = "mean", softcap: float | None = None,
                  chunk_rows: int | None = None) -> None:
    """The non-tensor options every backend takes; raises ValueError with one clear line."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    if chunk_rows is not None and chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")


def check_inputs(hidden, weight, labels, kind, ref_hidden, ref_weight, reduction, bias=None,
                 ref_bias=None) -> None:
    """Shape / dtype checks shared by all backends; raises ValueError with one clear line."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (BT, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be (V, H) with H={hidden.shape[1]}, got shape {tuple(weight.shape)}")
    bt = hidden.shape[0]
    if labels.shape != (bt,):
        raise ValueError(f"labels must be ({bt},), got shape {tuple(labels.shape)}")
    if kind.shape != (bt,):
        raise ValueError(f"kind must be ({bt},), got shape {tuple(kind.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if kind.dtype not in (torch.int64, torch.int32, torch.int8, torch.uint8):
        raise ValueError(f"kind must be an integer tensor, got {kind.dtype}")
    check_options(reduction)
    if ref_hidden is not None:
        if ref_hidden.shape != hidden.shape:
            raise ValueError(
                f"ref_hidden must be aligned with hidden {tuple(hidden.shape)}, "
                f"got {tuple(ref_hidden.shape)}")
        rw = weight if ref_weight is None else ref_weight
        if rw.shape != weight.shape:
            raise ValueError(
                f"reference head {tuple(rw.shape)} differs from the policy head "
                f"{tuple(weight.shape)} (vocabularies must match)")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if ref_bias is not None and ref_bias.shape != (weight.shape[0],):
        raise ValueError(f"ref_bias must be ({weight.shape[0]},), got {tuple(ref_bias.shape)}")


def scaled_as(grad: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad * g`` (g: fp32 0-dim grad_output) stored straight into ``dtype``: fp32 math, cast
    on store, so no second fp32 (V, H) buffer next to the saved one (1 GiB at a 128k x 2048
    head)."""
    out = torch.empty(grad.shape, device=grad.device, dtype=dtype)
    return torch.mul(grad, g, out=out)
