"""Public entry points: ``unlearn_loss(...)`` and ``UnlearnLoss``."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from . import chunked, reference  # noqa: F401  (chunked registers itself)
from .checks import check_inputs, flat_rows, raise_deferred_errors
from .options import LossOptions
from .registry import Backend, register_backend, resolve_backend
from .types import (
    DEFAULT_EPS_FORGET,
    DEFAULT_EPS_MISMATCH,
    DEFAULT_EPS_NORMAL,
    IGNORE_INDEX,
    LossOutput,
)


def _reference_fn(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
                  options: LossOptions) -> LossOutput:
    return reference.unlearn_loss_ref(
        hidden, weight, labels, kind, ref_hidden, ref_weight, eps_forget=options.eps_forget,
        eps_mismatch=options.eps_mismatch, eps_normal=options.eps_normal, bias=bias,
        ref_bias=ref_bias, softcap=options.softcap, logit_scale=options.logit_scale,
        reduction=options.reduction, ignore_index=options.ignore_index)


register_backend(Backend("reference", _reference_fn, ("cpu", "cuda"), priority=0,
                         description="plain PyTorch, (BT, V) logits materialised (testing)"))


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
    options: LossOptions | None = None,
) -> LossOutput:
    """The unlearning loss of Yao et al. from hidden states and head weights.

    ``loss = -eps_forget * NLL_forget + eps_mismatch * NLL_mismatch + eps_normal * KL_normal``
    with logits ``softcap(logit_scale * (hidden @ weight.T + bias))`` (see
    ``fastunlearn.losses.reference`` for the exact specification).

    Args:
        hidden: (BT, H) or (B, T, H) policy hidden states (fp32 / bf16; fp64 on the PyTorch
            and cpp backends; fp16 is refused), row r predicts ``labels[r]`` (labels shifted).
        weight: (V, H) head weight, e.g. ``model.get_output_embeddings().weight``.
        labels: (BT,) or (B, T) int ids; ``ignore_index`` for prompt / padding positions. Any
            other label outside [0, V) is an error.
        kind: same shape as labels: 0 forget, 1 mismatch, 2 normal (others are an error).
        ref_hidden: hidden states of the frozen reference aligned with ``hidden`` (only normal
            rows are read); ``None`` drops the KL term.
        ref_weight: (V, H) reference head; ``None`` means ``weight`` (detached), and then
            ``ref_bias`` defaults to ``bias``.
        logit_scale: multiplier of the logits before the soft-cap (Granite: 1 / logits_scaling;
            Cohere: logit_scale; Falcon-H1: lm_head_multiplier).
        reduction: "mean" per term over its own tokens, or "sum" (for gradient accumulation).
        backend: "auto" or a name from ``fastunlearn backends``.
        num_rows: optional host-side valid-token counts (forget, mismatch, normal); backends
            that declare ``sync_free`` then read nothing back from the device.
        options: a :class:`LossOptions` replacing every keyword above except ``bias``,
            ``ref_bias`` and ``backend``.

    Returns:
        LossOutput: ``loss`` (differentiable scalar), the three terms and their token counts.

    Raises:
        ValueError: one line naming the bad input (shape, dtype, device, label or kind).
        BackendUnavailableError: the named backend cannot run here.

    Example:
        >>> out = unlearn_loss(h, model.lm_head.weight, labels, kind, ref_h)
        >>> out.loss.backward()
    """
    if options is None:
        options = LossOptions(eps_forget, eps_mismatch, eps_normal, reduction, softcap,
                              logit_scale, ignore_index, chunk_rows,
                              None if num_rows is None else tuple(num_rows))
    raise_deferred_errors()
    hidden, ref_hidden, labels, ref_bias = flat_rows(hidden, ref_hidden, labels, ref_weight,
                                                     bias, ref_bias)
    kind = kind.reshape(-1)
    chosen = resolve_backend(backend, hidden.device.type)
    check_inputs(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, options,
                 dtypes=chosen.dtypes, backend=chosen.name,
                 rows_on_device=chosen.checks_rows_on_device)
    return chosen.fn(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
                     options)


class UnlearnLoss(nn.Module):
    """Module form of :func:`unlearn_loss` holding the options and the backend choice.

    Example:
        >>> loss_fn = UnlearnLoss(eps_forget=0.5, backend="auto")
        >>> out = loss_fn(hidden, model.lm_head.weight, labels, kind, ref_hidden)
    """

    def __init__(self, eps_forget: float = DEFAULT_EPS_FORGET,
                 eps_mismatch: float = DEFAULT_EPS_MISMATCH,
                 eps_normal: float = DEFAULT_EPS_NORMAL, *, softcap: float | None = None,
                 logit_scale: float = 1.0, reduction: str = "mean",
                 ignore_index: int = IGNORE_INDEX, backend: str = "auto",
                 chunk_rows: int | None = None):
        super().__init__()
        self.options = LossOptions(eps_forget, eps_mismatch, eps_normal, reduction, softcap,
                                   logit_scale, ignore_index, chunk_rows)
        self.backend = backend

    def __getattr__(self, name):
        # eps_forget, softcap, logit_scale, ... read through to the options
        options = self.__dict__.get("options")
        if options is not None and name in LossOptions.__dataclass_fields__:
            return getattr(options, name)
        return super().__getattr__(name)

    def forward(self, hidden, weight, labels, kind, ref_hidden=None, ref_weight=None, bias=None,
                ref_bias=None, num_rows=None) -> LossOutput:
        options = self.options
        if num_rows is not None:
            options = replace(options, num_rows=tuple(num_rows))
        return unlearn_loss(hidden, weight, labels, kind, ref_hidden, ref_weight, bias=bias,
                            ref_bias=ref_bias, backend=self.backend, options=options)
