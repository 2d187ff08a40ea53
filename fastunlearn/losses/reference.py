"""The specification of the unlearning loss in plain PyTorch (logits materialised).

Per token row r with kind k(r) in {forget, mismatch, normal} and a valid label y_r:

    loss = eps_forget   * ( - mean_{forget rows}   NLL(y_r) )          # gradient ascent
         + eps_mismatch *   mean_{mismatch rows} NLL(y_r)              # random mismatch
         + eps_normal   *   mean_{normal rows}   KL(p_ref(.|r) || p_cur(.|r))

NLL(y_r) = logsumexp(z_r) - z_r[y_r] with z_r = h_r W^T (+ b), optionally soft-capped:
z <- c * tanh(z / c). KL is the true KL over the full vocabulary. A row is valid when its label
is not ``ignore_index`` (prompt tokens and padding carry the ignore index). Rows are aligned with
their labels: the trainer shifts labels so that hidden row r predicts labels[r].

Every fast backend must match these functions. They run in the inputs' dtype unless
``compute_dtype`` says otherwise (tests use float64), and they keep the (BT, V) logits in
memory, so use them for testing and debugging only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_inputs
from .options import LossOptions
from .types import (
    DEFAULT_EPS_FORGET,
    DEFAULT_EPS_MISMATCH,
    DEFAULT_EPS_NORMAL,
    IGNORE_INDEX,
    KIND_FORGET,
    KIND_MISMATCH,
    KIND_NORMAL,
    LossOutput,
)


def logits_ref(hidden, weight, bias=None, softcap=None, compute_dtype=None, logit_scale=1.0):
    """(BT, H) x (V, H) -> (BT, V) logits ``softcap(logit_scale * (h W^T + b))`` in
    ``compute_dtype`` (default: hidden's dtype). The cap comes last, as in Gemma."""
    dt = compute_dtype or hidden.dtype
    z = hidden.to(dt) @ weight.to(dt).T
    if bias is not None:
        z = z + bias.to(dt)
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _graph_zero(t):
    """0, connected to ``t``'s graph (so a loss with an absent kind still has a grad_fn); -inf
    entries (masked logits) must not turn it into NaN."""
    return t.masked_fill(~torch.isfinite(t), 0).sum() * 0


def _kl_rows(log_q, log_p):
    """KL(q || p) per row; entries with q = 0 (masked logits, -inf) add 0, not 0 * inf."""
    q = log_q.exp()
    return torch.where(q > 0, q * (log_q - log_p), torch.zeros((), dtype=q.dtype,
                                                                device=q.device)).sum(-1)


def unlearn_loss_ref(
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
    compute_dtype: torch.dtype | None = None,
) -> LossOutput:
    """Reference unlearning loss.

    Args:
        hidden: (BT, H) policy hidden states, any float dtype; differentiable.
        weight: (V, H) policy head; differentiable.
        labels: (BT,) int64 target ids, ``ignore_index`` on rows that do not count.
        kind: (BT,) integer row kinds (KIND_FORGET / KIND_MISMATCH / KIND_NORMAL).
        ref_hidden: (BT, H) reference hidden states aligned with ``hidden``; only normal rows
            are read. ``None`` skips the KL term (it is 0 with a count of 0).
        ref_weight: (V, H) reference head; ``None`` means the policy head (detached).
        eps_*: coefficients; the ascent sign is applied here, in the forward.
        reduction: "mean" (each term over its own valid tokens) or "sum" (for exact gradient
            accumulation: pass eps / total_tokens_of_that_kind).

    Returns:
        LossOutput with the total and each term (and int64 token counts).

    Example:
        >>> out = unlearn_loss_ref(h, W, labels, kind, ref_h, W_ref)
        >>> out.loss.backward()
    """
    options = LossOptions(eps_forget, eps_mismatch, eps_normal, reduction, softcap, logit_scale,
                          ignore_index)
    check_inputs(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, options)
    dt = compute_dtype or (hidden.dtype if hidden.dtype in (torch.float32, torch.float64)
                           else torch.float32)
    labels = labels.long()
    kind = kind.long()
    valid = labels != ignore_index
    safe_labels = labels.masked_fill(~valid, 0)

    if ref_weight is None and ref_bias is None:
        ref_bias = bias  # the reference head is the policy head, bias included
    z = logits_ref(hidden, weight, bias, softcap, dt, logit_scale)
    logp = F.log_softmax(z, dim=-1)
    nll = -logp.gather(1, safe_labels[:, None]).squeeze(1)

    m_forget = valid & (kind == KIND_FORGET)
    m_mismatch = valid & (kind == KIND_MISMATCH)
    m_normal = valid & (kind == KIND_NORMAL)

    zero = _graph_zero(z)
    forget_sum = torch.where(m_forget, nll, zero).sum()
    mismatch_sum = torch.where(m_mismatch, nll, zero).sum()

    if ref_hidden is not None:
        rw = weight.detach() if ref_weight is None else ref_weight
        with torch.no_grad():
            zr = logits_ref(ref_hidden.detach(), rw.detach(),
                            None if ref_bias is None else ref_bias.detach(), softcap, dt,
                            logit_scale)
            logp_ref = F.log_softmax(zr, dim=-1)
        kl_row = _kl_rows(logp_ref, logp)
        normal_sum = torch.where(m_normal, kl_row, zero).sum()
    else:
        m_normal = torch.zeros_like(m_normal)
        normal_sum = zero

    n_f, n_m, n_n = m_forget.sum(), m_mismatch.sum(), m_normal.sum()
    if reduction == "mean":
        forget = forget_sum / n_f.clamp(min=1)
        mismatch = mismatch_sum / n_m.clamp(min=1)
        normal = normal_sum / n_n.clamp(min=1)
    else:
        forget, mismatch, normal = forget_sum, mismatch_sum, normal_sum
    loss = -eps_forget * forget + eps_mismatch * mismatch + eps_normal * normal
    return LossOutput(loss, forget, mismatch, normal, n_f, n_m, n_n, backend="reference")


def token_stats_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    compute_dtype: torch.dtype | None = None,
):
    """Per-token statistics for sequence-level methods (NPO, SimNPO, DPO-style).

    Returns ``(logp, logp_ref, kl)``, each (BT,) in the compute dtype: the log-probability of
    the label under the policy (differentiable), under the reference (no grad; zeros when
    ``ref_hidden`` is None) and KL(p_ref || p_cur) per row (differentiable; zeros without a
    reference). Rows with ``ignore_index`` give 0 in all three.
    """
    dt = compute_dtype or (hidden.dtype if hidden.dtype in (torch.float32, torch.float64)
                           else torch.float32)
    labels = labels.long()
    valid = labels != ignore_index
    safe = labels.masked_fill(~valid, 0)
    logp_all = F.log_softmax(logits_ref(hidden, weight, bias, softcap, dt), dim=-1)
    zero = _graph_zero(logp_all)
    logp = torch.where(valid, logp_all.gather(1, safe[:, None]).squeeze(1), zero)
    if ref_hidden is None:
        return logp, torch.zeros_like(logp).detach(), torch.where(valid, zero, zero).expand_as(logp)
    rw = weight.detach() if ref_weight is None else ref_weight.detach()
    with torch.no_grad():
        logp_ref_all = F.log_softmax(
            logits_ref(ref_hidden.detach(), rw, None if ref_bias is None else ref_bias.detach(),
                       softcap, dt), dim=-1)
        logp_ref = torch.where(valid, logp_ref_all.gather(1, safe[:, None]).squeeze(1),
                               torch.zeros((), dtype=dt, device=hidden.device))
    kl = _kl_rows(logp_ref_all, logp_all)
    kl = torch.where(valid, kl, zero)
    return logp, logp_ref, kl
