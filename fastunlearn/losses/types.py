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
    # A method other than the paper's: its own forget term (summed like the others); None for
    # the paper's loss, whose forget term is -forget_nll.
    forget_term: torch.Tensor | None = None

    def detached(self) -> dict[str, float]:
        """Host-side floats for logging (this synchronises, so it also raises a bad-row error
        that an accelerator backend flagged on the device without a sync)."""
        from .checks import raise_deferred_errors

        raise_deferred_errors(block=True)
        return {
            "loss": float(self.loss.detach()),
            "forget_nll": float(self.forget_nll.detach()),
            "mismatch_nll": float(self.mismatch_nll.detach()),
            "normal_kl": float(self.normal_kl.detach()),
            "n_forget": int(self.n_forget),
            "n_mismatch": int(self.n_mismatch),
            "n_normal": int(self.n_normal),
        }


def scaled_as(grad: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad * g`` (g: fp32 0-dim grad_output) stored straight into ``dtype``: fp32 math, cast
    on store, so no second fp32 (V, H) buffer next to the saved one (1 GiB at a 128k x 2048
    head)."""
    out = torch.empty(grad.shape, device=grad.device, dtype=dtype)
    return torch.mul(grad, g, out=out)
