"""The forget terms of the unlearning methods, and their plain-PyTorch specification.

Every method's loss is ``eps_forget * forget_term`` plus the paper's mismatch / retain terms
(``unlearn_loss``). The forget terms, from per-token log-probabilities of the labels (policy
logp, reference logp_ref) summed per sequence (S = sum of logp over a sequence's valid tokens,
L = its valid-token count):

    paper, graddiff   mean over tokens of logp                        (= -mean NLL: ascent)
    npo               mean over sequences of -(2/beta) logsigmoid(-beta (S - S_ref))
    simnpo            mean over sequences of -(2/beta) logsigmoid(-beta S / L - gamma)
    idk_dpo           mean over pairs of -(2/beta) logsigmoid(beta ((S_w - S_w_ref)
                                                                    - (S_l - S_l_ref)))
    rmu               mean over tokens of mean_h (a_h - c u_h)^2      (activations, no head)

w is the preferred (refusal) answer of a prompt, l its forget answer. At the reference
(S == S_ref) NPO and IdkDPO give 2 log 2 / beta per sequence / pair. A sequence (a pair) counts
in a mean when it has a valid token (both of its sequences have one); an empty mean is 0.

The fused path (``method_forget_loss``) never builds (BT, V) logits: logp / logp_ref from
``token_stats``, or for the sequence methods one pass that also applies the formulas'
derivatives per chunk (``sequence_term_and_weights``, in closed form); the specification
(``method_forget_loss_ref``) takes logp from a log_softmax over the full logits. They share the
formulas below, which return unreduced values.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import flat_rows
from .reference import logits_ref
from .sequence_term import sequence_forget_term
from .token_stats import reference_logprobs, token_stats
from .types import IGNORE_INDEX

METHODS = ("paper", "graddiff", "npo", "simnpo", "idk_dpo", "rmu")
SEQUENCE_METHODS = ("npo", "simnpo", "idk_dpo")
REFERENCE_METHODS = ("npo", "idk_dpo")  # the forget term needs the reference's logp
DEFAULT_BETA = {"npo": 0.1, "simnpo": 2.5, "idk_dpo": 0.1}
DEFAULT_GAMMA = 0.0


# ----------------------------------------------------------------------------- validation

def check_beta(beta: float) -> float:
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    return beta


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    return method


def _check_same_shape(**tensors) -> None:
    (first, t0), *rest = tensors.items()
    for name, t in rest:
        if t.shape != t0.shape:
            raise ValueError(f"{name} must have the shape of {first} {tuple(t0.shape)}, "
                             f"got {tuple(t.shape)}")


# ----------------------------------------------------------------------------- formulas

def sequence_sums(values: Tensor, segment: Tensor, n_segments: int) -> Tensor:
    """(n_segments,) sums of ``values`` (N,) per ``segment`` (N,) id; differentiable.

    Rows with a negative segment belong to no sequence and are left out. Segment ids must be
    below ``n_segments`` (checked eagerly: one host read on an accelerator)."""
    if values.dim() != 1 or not values.is_floating_point():
        raise ValueError(f"values must be a 1-D float tensor, got {values.dtype} of shape "
                         f"{tuple(values.shape)}")
    if segment.shape != values.shape or segment.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"segment must be an int64 / int32 tensor of shape "
                         f"{tuple(values.shape)}, got {segment.dtype} {tuple(segment.shape)}")
    if segment.device != values.device:
        raise ValueError(f"segment is on {segment.device} but values on {values.device}")
    n_segments = int(n_segments)
    if n_segments < 0:
        raise ValueError(f"n_segments must be >= 0, got {n_segments}")
    segment = segment.long()
    if segment.numel() and int(segment.max()) >= n_segments:
        raise ValueError(f"segment ids must be below n_segments={n_segments}, got "
                         f"{int(segment.max())}")
    member = segment >= 0
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return values.new_zeros(n_segments).index_add(0, torch.where(member, segment, 0),
                                                  torch.where(member, values, zero))


def npo_loss(S: Tensor, S_ref: Tensor, beta: float = DEFAULT_BETA["npo"]) -> Tensor:
    """-(2 / beta) * logsigmoid(-beta * (S - S_ref)) per sequence (unreduced).

    S, S_ref: per-sequence sums of log p(label) under the policy and the frozen reference."""
    beta = check_beta(beta)
    _check_same_shape(S=S, S_ref=S_ref)
    return -(2.0 / beta) * F.logsigmoid(-beta * (S - S_ref.detach()))


def simnpo_loss(S: Tensor, n_tokens: Tensor, beta: float = DEFAULT_BETA["simnpo"],
                gamma: float = DEFAULT_GAMMA) -> Tensor:
    """-(2 / beta) * logsigmoid(-beta * S / L - gamma) per sequence (unreduced).

    L = n_tokens, clamped at 1: a sequence without valid tokens gives a constant (leave it out
    of the mean)."""
    beta = check_beta(beta)
    gamma = float(gamma)
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma}")
    _check_same_shape(S=S, n_tokens=n_tokens)
    length = n_tokens.detach().to(S.dtype).clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(-beta * S / length - gamma)


def idk_dpo_loss(S_w: Tensor, S_w_ref: Tensor, S_l: Tensor, S_l_ref: Tensor,
                 beta: float = DEFAULT_BETA["idk_dpo"]) -> Tensor:
    """-(2 / beta) * logsigmoid(beta * ((S_w - S_w_ref) - (S_l - S_l_ref))) per pair.

    w: the preferred (refusal) answer, l: the forget answer of the same prompt."""
    beta = check_beta(beta)
    _check_same_shape(S_w=S_w, S_w_ref=S_w_ref, S_l=S_l, S_l_ref=S_l_ref)
    margin = (S_w - S_w_ref.detach()) - (S_l - S_l_ref.detach())
    return -(2.0 / beta) * F.logsigmoid(beta * margin)


def rmu_loss(act: Tensor, target: Tensor) -> Tensor:
    """mean over the last dim of (act - target)^2, per token (unreduced), in fp32 or wider.

    act: (..., H) the policy's activations at the RMU layer; target: broadcastable to act, e.g.
    the (H,) control vector c u (forget rows) or the reference's activations (normal rows)."""
    if act.dim() == 0 or target.dim() == 0 or target.shape[-1] != act.shape[-1]:
        raise ValueError(f"rmu target {tuple(target.shape)} must end in the hidden size of "
                         f"the activations {tuple(act.shape)}")
    try:
        torch.broadcast_shapes(act.shape, target.shape)
    except RuntimeError:
        raise ValueError(f"rmu target {tuple(target.shape)} does not broadcast to the "
                         f"activations {tuple(act.shape)}") from None
    dt = torch.promote_types(act.dtype, torch.float32)
    return (act.to(dt) - target.detach().to(dt)).pow(2).mean(-1)


def rmu_control_vector(hidden_size: int, steer: float, seed: int = 0, *, device=None,
                       dtype=torch.float32) -> Tensor:
    """c * u: u a unit vector drawn uniformly from [0, 1)^H with ``seed`` (the same on every
    run and process), c = ``steer`` > 0."""
    steer = float(steer)
    if not (math.isfinite(steer) and steer > 0):
        raise ValueError(f"rmu steer must be a finite number > 0, got {steer}")
    if int(hidden_size) <= 0:
        raise ValueError(f"hidden_size must be positive, got {hidden_size}")
    u = torch.rand(int(hidden_size), generator=torch.Generator().manual_seed(int(seed)),
                   dtype=torch.float64)
    return (steer * u / u.norm()).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- forget terms

def _mean(values: Tensor, counted: Tensor, reduction: str) -> Tensor:
    total = torch.where(counted, values, torch.zeros((), dtype=values.dtype,
                                                     device=values.device)).sum()
    if reduction == "sum":
        return total
    return total / counted.sum().clamp(min=1).to(values.dtype)


def _check_pairs(pairs, n_segments):
    if pairs is None or pairs.dim() != 2 or pairs.shape[1] != 2 \
            or pairs.dtype not in (torch.int64, torch.int32):
        raise ValueError("idk_dpo needs pairs: an int (P, 2) tensor of segment ids "
                         "(preferred, forget)")
    if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= n_segments):
        raise ValueError(f"pairs must hold segment ids in [0, {n_segments})")
    return pairs.long()


def forget_term_from_logprobs(method, logp, logp_ref, valid, segment, n_segments, pairs, beta,
                              gamma, reduction):
    """The forget term from per-token logp (and logp_ref): shared by the fused path, the
    specification and the trainer's step, which differ only in where logp comes from."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    member = valid & (segment >= 0)
    if method in ("paper", "graddiff"):
        return _mean(logp, member, reduction)
    beta = check_beta(DEFAULT_BETA[method] if beta is None else beta)
    S = sequence_sums(logp, segment, n_segments)
    n_tokens = sequence_sums(member.to(logp.dtype), segment, n_segments)
    has_tokens = n_tokens > 0
    if method == "simnpo":
        return _mean(simnpo_loss(S, n_tokens, beta, gamma), has_tokens, reduction)
    S_ref = sequence_sums(logp_ref.detach(), segment, n_segments)
    if method == "npo":
        return _mean(npo_loss(S, S_ref, beta), has_tokens, reduction)
    w, lose = pairs[:, 0], pairs[:, 1]
    values = idk_dpo_loss(S[w], S_ref[w], S[lose], S_ref[lose], beta)
    return _mean(values, has_tokens[w] & has_tokens[lose], reduction)


def counted_sequences(method, valid, segment, n_segments, pairs) -> Tensor:
    """How many sequences (idk_dpo: pairs) a sequence method's mean is over: those with a
    valid token (both of a pair's sequences with one)."""
    n_tokens = sequence_sums((valid & (segment >= 0)).float(), segment, n_segments)
    has_tokens = n_tokens > 0
    if method == "idk_dpo":
        return (has_tokens[pairs[:, 0]] & has_tokens[pairs[:, 1]]).sum()
    return has_tokens.sum()


def sequence_term_and_weights(method, logp, logp_ref, segment, n_segments, pairs, beta,
                              gamma) -> tuple[Tensor, Tensor]:
    """A sequence method's forget term ("sum" reduction) over the rows ``logp`` (N,), every
    row a valid token, and d term / d logp per row: the fused one-pass path computes gradients
    inside its forward, so the derivative is in closed form here (tested against autograd).

    With u the logsigmoid's argument: d/dS of -(2/beta) logsigmoid(u) is -(2/beta)
    sigmoid(-u) du/dS, where du/dS is -beta / L (simnpo), -beta (npo), and +beta / -beta for
    the preferred / forget sequence of an idk_dpo pair. Sequences (pairs) without a row here
    add nothing, so a chunk holding whole sequences (pairs) gives its share of the term."""
    beta = check_beta(DEFAULT_BETA[method] if beta is None else beta)
    member = segment >= 0
    S = sequence_sums(logp, segment, n_segments)
    n_tokens = sequence_sums(member.to(logp.dtype), segment, n_segments)
    has_tokens = n_tokens > 0
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if method == "simnpo":
        length = n_tokens.clamp(min=1)
        values = simnpo_loss(S, n_tokens, beta, gamma)
        d_S = torch.where(has_tokens, 2.0 / length * torch.sigmoid(beta * S / length + gamma),
                          zero)
        term = torch.where(has_tokens, values, zero).sum()
    elif method == "npo":
        S_ref = sequence_sums(logp_ref, segment, n_segments)
        values = npo_loss(S, S_ref, beta)
        d_S = torch.where(has_tokens, 2.0 * torch.sigmoid(beta * (S - S_ref)), zero)
        term = torch.where(has_tokens, values, zero).sum()
    elif method == "idk_dpo":
        S_ref = sequence_sums(logp_ref, segment, n_segments)
        w, lose = pairs[:, 0], pairs[:, 1]
        counted = has_tokens[w] & has_tokens[lose]
        margin = (S[w] - S_ref[w]) - (S[lose] - S_ref[lose])
        values = idk_dpo_loss(S[w], S_ref[w], S[lose], S_ref[lose], beta)
        d_w = torch.where(counted, -2.0 * torch.sigmoid(-beta * margin), zero)
        d_S = torch.zeros_like(S).index_add_(0, w, d_w).index_add_(0, lose, -d_w)
        term = torch.where(counted, values, zero).sum()
    else:
        raise ValueError(f"{method!r} is not a sequence method ({', '.join(SEQUENCE_METHODS)})")
    weight = torch.where(member, d_S[segment.clamp(min=0)], zero)
    return term, weight


def _check_forget_args(method, labels, segment, ref_hidden, pairs, n_segments):
    check_method(method)
    if method == "rmu":
        raise ValueError("rmu has no head: its terms are rmu_loss on the layer's activations")
    if segment.shape != labels.reshape(-1).shape:
        raise ValueError(f"segment must have one id per label row {tuple(labels.shape)}, got "
                         f"{tuple(segment.shape)}")
    if method in REFERENCE_METHODS and ref_hidden is None:
        raise ValueError(f"{method} needs the reference's hidden states (ref_hidden)")
    return _check_pairs(pairs, n_segments) if method == "idk_dpo" else None


def method_forget_loss(method: str, hidden: Tensor, weight: Tensor, labels: Tensor,
                       segment: Tensor, n_segments: int, ref_hidden: Tensor | None = None,
                       ref_weight: Tensor | None = None, *, pairs: Tensor | None = None,
                       bias: Tensor | None = None, ref_bias: Tensor | None = None,
                       softcap: float | None = None, logit_scale: float = 1.0,
                       ignore_index: int = IGNORE_INDEX, beta: float | None = None,
                       gamma: float = DEFAULT_GAMMA, reduction: str = "mean",
                       backend: str = "auto", chunk_rows: int | None = None) -> Tensor:
    """A method's forget term (multiply by eps_forget), fused: ``token_stats`` for the token
    methods, ``sequence_term.sequence_forget_term`` (one pass over the head when the sequences
    fit a chunk) for npo, simnpo and idk_dpo; the reference's log-probabilities for npo and
    idk_dpo from one ``token_stats`` pass without gradients.

    Args:
        method: a head method of ``METHODS`` (not rmu).
        hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias, softcap, logit_scale,
            ignore_index, backend, chunk_rows: as in ``token_stats``; ref_hidden is needed by
            npo and idk_dpo, read by no other method.
        segment: (BT,) int sequence id of each row, in [0, n_segments); -1 for rows of no
            sequence (left out).
        pairs: idk_dpo only, (P, 2) int segment ids (preferred, forget) of each prompt.
        beta: None for ``DEFAULT_BETA[method]``; gamma: SimNPO's margin.
        reduction: "mean" (over counted tokens / sequences / pairs) or "sum".

    Returns:
        0-dim differentiable tensor (fp32).
    """
    pairs = _check_forget_args(method, labels, segment, ref_hidden, pairs, n_segments)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    head = dict(softcap=softcap, logit_scale=logit_scale, ignore_index=ignore_index,
                backend=backend, chunk_rows=chunk_rows)
    hidden, ref_hidden, flat_labels, ref_bias = flat_rows(hidden, ref_hidden, labels,
                                                          ref_weight, bias, ref_bias)
    valid, segment = flat_labels != ignore_index, segment.long()
    if method not in SEQUENCE_METHODS:
        logp = token_stats(hidden, weight, flat_labels, bias=bias, with_kl=False, **head)[0]
        return forget_term_from_logprobs(method, logp, None, valid, segment, n_segments, pairs,
                                         beta, gamma, reduction)
    logp_ref = None
    if method in REFERENCE_METHODS:
        logp_ref = reference_logprobs(ref_hidden, weight, flat_labels, ref_weight, bias=bias,
                                      ref_bias=ref_bias, **head)
    term, _ = sequence_forget_term(method, hidden, weight, flat_labels, segment, n_segments,
                                   pairs, logp_ref, bias=bias, beta=beta, gamma=gamma, **head)
    if reduction == "sum":
        return term
    counted = counted_sequences(method, valid, segment, n_segments, pairs)
    return term / counted.clamp(min=1).to(term.dtype)


# ----------------------------------------------------------------------------- specification

def token_logprobs_ref(hidden, weight, labels, *, bias=None, softcap=None, logit_scale=1.0,
                       ignore_index=IGNORE_INDEX, compute_dtype=None) -> Tensor:
    """(BT,) log p(label) from a log_softmax over the full (BT, V) logits; 0 on ignored rows."""
    dt = compute_dtype or torch.promote_types(hidden.dtype, torch.float32)
    labels = labels.reshape(-1).long()
    valid = labels != ignore_index
    z = logits_ref(hidden.reshape(-1, hidden.shape[-1]), weight, bias, softcap, dt, logit_scale)
    logp = F.log_softmax(z, dim=-1).gather(1, labels.masked_fill(~valid, 0)[:, None])[:, 0]
    return torch.where(valid, logp, torch.zeros((), dtype=dt, device=logp.device))


def sequence_logprobs_ref(hidden, weight, labels, segment, n_segments, *, bias=None,
                          softcap=None, logit_scale=1.0, ignore_index=IGNORE_INDEX,
                          compute_dtype=None) -> tuple[Tensor, Tensor]:
    """(S, n_tokens), each (n_segments,): per-sequence sums of log p(label) over valid tokens
    from the full logits (differentiable), and the valid-token counts."""
    logp = token_logprobs_ref(hidden, weight, labels, bias=bias, softcap=softcap,
                              logit_scale=logit_scale, ignore_index=ignore_index,
                              compute_dtype=compute_dtype)
    valid = (labels.reshape(-1) != ignore_index).to(logp.dtype)
    return (sequence_sums(logp, segment.long(), n_segments),
            sequence_sums(valid, segment.long(), n_segments))


def method_forget_loss_ref(method: str, hidden: Tensor, weight: Tensor, labels: Tensor,
                           segment: Tensor, n_segments: int, ref_hidden: Tensor | None = None,
                           ref_weight: Tensor | None = None, *, pairs: Tensor | None = None,
                           bias: Tensor | None = None, ref_bias: Tensor | None = None,
                           softcap: float | None = None, logit_scale: float = 1.0,
                           ignore_index: int = IGNORE_INDEX, beta: float | None = None,
                           gamma: float = DEFAULT_GAMMA, reduction: str = "mean",
                           compute_dtype: torch.dtype | None = None) -> Tensor:
    """The specification of ``method_forget_loss``: the same arguments, log-probabilities from
    the full logits in ``compute_dtype`` (default: at least fp32; tests use fp64)."""
    pairs = _check_forget_args(method, labels, segment, ref_hidden, pairs, n_segments)
    kw = dict(softcap=softcap, logit_scale=logit_scale, ignore_index=ignore_index,
              compute_dtype=compute_dtype)
    logp = token_logprobs_ref(hidden, weight, labels, bias=bias, **kw)
    logp_ref = torch.zeros_like(logp)
    if method in REFERENCE_METHODS:
        if ref_weight is None and ref_bias is None:
            ref_bias = bias  # the reference head is the policy head, bias included
        rw = weight if ref_weight is None else ref_weight
        with torch.no_grad():
            logp_ref = token_logprobs_ref(ref_hidden.detach(), rw.detach(), labels,
                                          bias=None if ref_bias is None else ref_bias.detach(),
                                          **kw)
    valid = labels.reshape(-1) != ignore_index
    return forget_term_from_logprobs(method, logp, logp_ref, valid, segment.long(), n_segments,
                                     pairs, beta, gamma, reduction)
