"""Public entry points: ``unlearn_loss(...)`` and ``UnlearnLoss``."""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from . import chunked, reference
from .registry import Backend, register_backend, resolve_backend
from .types import (
    DEFAULT_EPS_FORGET,
    DEFAULT_EPS_MISMATCH,
    DEFAULT_EPS_NORMAL,
    IGNORE_INDEX,
    LossOutput,
    check_inputs,
)


def _reference_fn(hidden, weight, labels, kind, ref_hidden=None, ref_weight=None, **kw):
    kw.pop("chunk_rows", None)
    return reference.unlearn_loss_ref(hidden, weight, labels, kind, ref_hidden, ref_weight, **kw)


register_backend(Backend("reference", _reference_fn, ("cpu", "cuda"), priority=0,
                         description="plain PyTorch, (BT, V) logits materialised (testing)"))
register_backend(Backend("chunked", chunked.chunked_unlearn_loss, ("cpu", "cuda"), priority=10,
                         description="row-chunked PyTorch, no (BT, V) logits"))


def unlearn_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    kind: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    *,
    eps_forget: float = DEFAULT_EPS_FORGET,
    eps_mismatch: float = DEFAULT_EPS_MISMATCH,
    eps_normal: float = DEFAULT_EPS_NORMAL,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    chunk_rows: int | None = None,
    num_rows: tuple[int, int, int] | None = None,
) -> LossOutput:
    """The unlearning loss of Yao et al. from hidden states and head weights.

    ``loss = -eps_forget * NLL_forget + eps_mismatch * NLL_mismatch + eps_normal * KL_normal``
    (see ``fastunlearn.losses.reference`` for the exact specification).

    Args:
        hidden: (BT, H) or (B, T, H) policy hidden states (fp32 / bf16 / fp16), row r predicts
            ``labels[r]`` (labels already shifted).
        weight: (V, H) head weight, e.g. ``model.get_output_embeddings().weight``.
        labels: (BT,) or (B, T) int64 ids; ``ignore_index`` for prompt / padding positions.
        kind: same shape as labels: 0 forget, 1 mismatch, 2 normal.
        ref_hidden: hidden states of the frozen reference aligned with ``hidden`` (only normal
            rows are read); ``None`` drops the KL term.
        ref_weight: (V, H) reference head; ``None`` means ``weight`` (detached).
        reduction: "mean" per term over its own tokens, or "sum" (for gradient accumulation).
        backend: "auto" or a name from ``fastunlearn backends``.
        num_rows: optional host-side valid-token counts (forget, mismatch, normal); backends
            that size their matrix products from them (triton) then need no host sync.

    Returns:
        LossOutput: ``loss`` (differentiable scalar), the three terms and their token counts.

    Example:
        >>> out = unlearn_loss(h, model.lm_head.weight, labels, kind, ref_h)
        >>> out.loss.backward()
    """
    if hidden.dim() == 3:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if ref_hidden is not None:
            ref_hidden = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    labels = labels.reshape(-1)
    kind = kind.reshape(-1)
    check_inputs(hidden, weight, labels, kind, ref_hidden, ref_weight, reduction, bias, ref_bias)
    if ref_weight is None and ref_bias is None:
        ref_bias = bias  # the reference head is the policy head, bias included
    chosen = resolve_backend(backend, hidden.device.type)
    if chosen.name == "reference":
        return chosen.fn(hidden, weight, labels, kind, ref_hidden, ref_weight,
                         eps_forget=eps_forget, eps_mismatch=eps_mismatch, eps_normal=eps_normal,
                         bias=bias, ref_bias=ref_bias, softcap=softcap, logit_scale=logit_scale,
                         reduction=reduction, ignore_index=ignore_index)
    if logit_scale != 1.0:  # s (h W^T + b) = (s h) W^T + s b: exact, autograd carries s back
        hidden = hidden * logit_scale
        bias = None if bias is None else bias * logit_scale
        ref_hidden = None if ref_hidden is None else ref_hidden * logit_scale
        ref_bias = None if ref_bias is None else ref_bias * logit_scale
    extra = {}
    if num_rows is not None and _accepts(chosen.fn, "num_rows"):
        extra["num_rows"] = tuple(int(n) for n in num_rows)
    return chosen.fn(hidden, weight, labels, kind, ref_hidden, ref_weight,
                     eps_forget=eps_forget, eps_mismatch=eps_mismatch, eps_normal=eps_normal,
                     bias=bias, ref_bias=ref_bias, softcap=softcap, reduction=reduction,
                     ignore_index=ignore_index, chunk_rows=chunk_rows, **extra)


@functools.lru_cache(maxsize=None)
def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


class UnlearnLoss(nn.Module):
    """Module form of :func:`unlearn_loss` holding the coefficients and the backend choice.

    Example:
        >>> loss_fn = UnlearnLoss(eps_forget=0.5, backend="auto")
        >>> out = loss_fn(hidden, model.lm_head.weight, labels, kind, ref_hidden)
    """

    def __init__(self, eps_forget: float = DEFAULT_EPS_FORGET,
                 eps_mismatch: float = DEFAULT_EPS_MISMATCH,
                 eps_normal: float = DEFAULT_EPS_NORMAL, *, softcap: float | None = None,
                 logit_scale: float = 1.0, reduction: str = "mean",
                 ignore_index: int = IGNORE_INDEX,
                 backend: str = "auto", chunk_rows: int | None = None):
        super().__init__()
        self.eps_forget, self.eps_mismatch, self.eps_normal = eps_forget, eps_mismatch, eps_normal
        self.softcap, self.reduction, self.ignore_index = softcap, reduction, ignore_index
        self.logit_scale = logit_scale
        self.backend, self.chunk_rows = backend, chunk_rows

    def forward(self, hidden, weight, labels, kind, ref_hidden=None, ref_weight=None, bias=None,
                ref_bias=None) -> LossOutput:
        return unlearn_loss(hidden, weight, labels, kind, ref_hidden, ref_weight,
                            eps_forget=self.eps_forget, eps_mismatch=self.eps_mismatch,
                            eps_normal=self.eps_normal, bias=bias, ref_bias=ref_bias,
                            softcap=self.softcap, logit_scale=self.logit_scale,
                            reduction=self.reduction,
                            ignore_index=self.ignore_index, backend=self.backend,
                            chunk_rows=self.chunk_rows)
