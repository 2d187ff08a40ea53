"""The unlearning methods of ``loss.method`` inside the step: which rows the reference covers,
how forget sequences are numbered, and the terms each method adds to the fused loss.

The paper's loss is the fused loss as it is. The other methods reuse it for the mismatch term
and the KL on normal rows and add their own terms (formulas in ``losses.methods``):

* graddiff: the fused loss's forget ascent, and the normal rows' NLL (``token_stats``) in
  place of the KL;
* npo, simnpo, idk_dpo: the forget rows (and idk_dpo's preferred rows) leave the fused loss;
  per-token log-probabilities from ``token_stats`` (fused, with gradients; the reference's too for
  npo and idk_dpo) are summed per sequence and go through the method's sequence loss;
* rmu: no head at all. The policy runs up to the RMU layer only; forget states are pushed to a
  fixed random direction, normal states held to the reference's at that layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .losses import LossOutput, token_stats
from .losses.methods import (
    DEFAULT_BETA,
    rmu_control_vector,
    rmu_loss,
)
from .losses.sequence_term import sequence_forget_term
from .losses.token_stats import reference_logprobs
from .losses.types import KIND_FORGET, KIND_NORMAL
from .models import eval_mode

KIND_PREFERRED = 3  # data.KIND_PREFERRED (data imports the tokenizer stack; this module must not)
PER_SEQUENCE = ("npo", "simnpo", "idk_dpo")


@dataclass(frozen=True)
class MethodSettings:
    """``loss.method`` and its parameters (``loss.beta``, ``gamma``, ``rmu_layer``,
    ``rmu_steer``); ``seed`` draws rmu's direction."""

    name: str = "paper"
    beta: float | None = None
    gamma: float = 0.0
    rmu_layer: int | None = None
    rmu_steer: float = 200.0
    seed: int = 0

    @property
    def per_sequence(self) -> bool:
        """The forget term is a mean over forget sequences, not over tokens."""
        return self.name in PER_SEQUENCE

    @property
    def reference_on_forget(self) -> bool:
        return self.name in ("npo", "idk_dpo")

    @property
    def has_head(self) -> bool:
        return self.name != "rmu"

    @property
    def retain(self) -> str:
        """What holds the normal rows: kl (the paper's), nll (graddiff), activations (rmu)."""
        return {"graddiff": "nll", "rmu": "activations"}.get(self.name, "kl")

    @property
    def inverse_temperature(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[self.name]

    def layer_index(self, model) -> int:
        from .unlearn_step import decoder_layers

        depth = len(decoder_layers(model))
        layer = depth // 4 if self.rmu_layer is None else self.rmu_layer
        if not 0 <= layer < depth:
            raise ValueError(f"loss.rmu_layer={layer} is outside the model's {depth} decoder "
                             "layers")
        return layer

    def check(self, policy, mode: str) -> None:
        """One-line errors for a method the step cannot run with this reference."""
        if self.name != "rmu":
            return
        if mode == "cached":
            raise ValueError("loss.method=rmu compares hidden states inside the model; the "
                             "cached reference holds last hidden states and log-probabilities "
                             "only: use reference=copy (or adapters with LoRA)")
        self.layer_index(policy)


def reference_kinds(method: str) -> tuple[int, ...]:
    """The row kinds a live reference pass runs on for ``method``."""
    if method == "npo":
        return (KIND_FORGET, KIND_NORMAL)
    if method == "idk_dpo":
        return (KIND_FORGET, KIND_NORMAL, KIND_PREFERRED)
    return (KIND_NORMAL,)


def sequence_ids(rows: torch.Tensor, kinds: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(N,) the forget sequence of each forget position (0 .. S-1, in row order), the
    preferred sequence of each preferred position (its pair: the j-th preferred row of a batch
    pairs with its j-th forget row), -1 elsewhere; and S."""
    out = torch.full_like(rows, -1)
    counts = []
    for kind in (KIND_FORGET, KIND_PREFERRED):
        sel = kinds == kind
        ids, local = torch.unique(rows[sel], return_inverse=True)
        out[sel] = local
        counts.append(ids.numel())
    if counts[1] and counts[1] != counts[0]:
        raise ValueError(f"{counts[1]} preferred rows for {counts[0]} forget rows: idk_dpo "
                         "needs one preferred row per forget row")
    return out, counts[0]


def local_coefficients(method: MethodSettings, coef, inputs) -> tuple[float, float, float]:
    """``coef`` divided by this micro-batch's own counts: the per-term means of these rows."""
    n_f, n_m, n_n = inputs.counts
    first = inputs.n_sequences if method.per_sequence else n_f
    return tuple(c / max(n, 1) for c, n in zip(coef, (first, n_m, n_n)))


def as_means(out: LossOutput, method: MethodSettings, inputs) -> LossOutput:
    """``out``'s summed terms as means over their own tokens (the forget term per sequence for
    a per-sequence method)."""
    n_f, n_m, n_n = (max(n, 1) for n in inputs.counts)
    per = max(inputs.n_sequences, 1) if method.per_sequence else n_f
    return LossOutput(out.loss, out.forget_nll / n_f, out.mismatch_nll / n_m,
                      out.normal_kl / n_n, out.n_forget, out.n_mismatch, out.n_normal,
                      backend=out.backend, forget_term=out.forget_term / per)


def add_method_terms(out: LossOutput, method: MethodSettings, inputs, coef, hidden, weight,
                     ref_hidden, ref_weight, head_args: dict) -> LossOutput:
    """The fused loss ``out`` (mismatch, KL, and for graddiff the forget ascent) plus the
    method's own terms; terms are sums over this micro-batch's rows like ``out``'s."""
    eps_f, _, eps_n = coef
    loss, forget_nll, normal = out.loss, out.forget_nll, out.normal_kl
    if method.name == "graddiff":
        forget_term = out.forget_nll.detach()
        sel = inputs.normal_sel
        if eps_n != 0 and sel.numel():
            logp, _, _ = token_stats(hidden[sel], weight, inputs.labels[sel], **head_args)
            normal = -logp.sum()
            loss = loss + eps_n * normal
    else:
        sel = (inputs.sequence >= 0).nonzero().squeeze(1)
        labels = inputs.labels[sel]
        n = inputs.n_sequences
        preferred = inputs.kinds[sel] == KIND_PREFERRED
        segment = inputs.sequence[sel] + n * preferred  # forget sequences, then preferred
        pairs = None
        if method.name == "idk_dpo":
            forget_ids = torch.arange(n, device=segment.device)
            pairs = torch.stack([forget_ids + n, forget_ids], 1)
        logp_ref = None
        if method.reference_on_forget:
            cached = inputs.cached_ref_logp  # the cached reference: no reference GEMM here
            logp_ref = cached[sel] if cached is not None else \
                reference_logprobs(ref_hidden[sel], weight, labels, ref_weight, **head_args)
        head = {k: v for k, v in head_args.items() if k != "ref_bias"}
        forget_term, logp = sequence_forget_term(
            method.name, hidden[sel], weight, labels, segment, 2 * n, pairs, logp_ref,
            beta=method.beta, gamma=method.gamma, **head)
        loss = loss + eps_f * forget_term
        forget_nll = -torch.where(preferred, 0.0, logp).sum()
        forget_term = forget_term.detach()
    counts = torch.tensor(inputs.counts, device=out.loss.device)
    return LossOutput(loss, forget_nll, out.mismatch_nll, normal.detach(), counts[0], counts[1],
                      counts[2], backend=out.backend, forget_term=forget_term)


# ----------------------------------------------------------------------------------- rmu
class _StopAtLayer(Exception):
    def __init__(self, states):
        self.states = states


def states_at_layer(model, layer: int, trunk: dict) -> torch.Tensor:
    """(R, T, H) output of decoder layer ``layer`` of ``model``'s trunk; the layers after it
    never run (a forward hook ends the pass there)."""
    from .models import trunk_of
    from .unlearn_step import decoder_layers

    def stop(_module, _inputs, output):
        raise _StopAtLayer(output[0] if isinstance(output, tuple) else output)

    handle = decoder_layers(model)[layer].register_forward_hook(stop)
    try:
        trunk_of(model)(**trunk)
    except _StopAtLayer as done:
        return done.states
    finally:
        handle.remove()
    raise RuntimeError(f"decoder layer {layer} did not run")


def rmu_forward(step, inputs, coef) -> LossOutput:
    """rmu's loss for one micro-batch: ``eps_forget`` times the summed per-token distance of
    forget states to the steering target, ``eps_normal`` times that of normal states to the
    reference's, both at the RMU layer (per-token mean over the hidden size)."""
    eps_f, _, eps_n = coef
    method = step.method
    device = inputs.flat.device
    layer = method.layer_index(step.policy)
    with step._autocast(device):
        states = states_at_layer(step.policy, layer, inputs.trunk)
    states = states.reshape(-1, states.shape[-1]).to(step.compute_dtype)[inputs.flat]
    forget_rows = (inputs.kinds == KIND_FORGET).nonzero().squeeze(1)
    target = rmu_control_vector(states.shape[-1], method.rmu_steer, method.seed,
                                device=device, dtype=states.dtype)
    forget_term = rmu_loss(states[forget_rows], target).sum()
    loss = eps_f * forget_term
    retain = states.new_zeros(())
    if eps_n != 0 and step.mode in ("copy", "adapters") and inputs.ref_sel.numel():
        ctx, model = step._reference_model()
        rows = {k: v.index_select(0, inputs.ref_batch_rows) if torch.is_tensor(v) else v
                for k, v in inputs.trunk.items()}
        with torch.no_grad(), ctx, eval_mode(model), step._autocast(device):
            ref = states_at_layer(model, layer, rows)
        ref = ref.reshape(-1, ref.shape[-1]).to(step.compute_dtype)[inputs.ref_pos]
        retain = rmu_loss(states[inputs.ref_sel], ref).sum()
        loss = loss + eps_n * retain
    counts = torch.tensor(inputs.counts, device=device)
    nan = torch.full((), math.nan, device=device)  # no head: no forget NLL
    return LossOutput(loss, nan, states.new_zeros(()), retain.detach(), counts[0], counts[1],
                      counts[2], backend="none", forget_term=forget_term.detach())
