"""The unlearning step as one module: policy trunk, reference, valid-row selection and the loss.

Why one module: under FSDP2 a parameter is only whole inside the forward of the module that
owns it. ``shard`` wraps every decoder layer, then this module as the root, so the root's
pre-forward gathers what is left (embeddings, final norm, head; the reference's too) and its
post-backward reduce-scatters their gradients. The head weight is read only inside ``forward``:
outside it ``lm_head.weight`` is a DTensor holding this rank's rows, and ``full_tensor()`` of it
used as the head gets no cross-rank gradient reduction. The reference trunk is called from inside
the same forward too (a sharded trunk called from outside fails on mixed Tensor / DTensor).

With one process the same module runs unsharded. The loss is a sum over this rank's valid
tokens with every coefficient divided by that kind's token count over all ranks and all
micro-batches of the step (:func:`coefficients`), and FSDP sums gradients over ranks instead of
averaging them, so N ranks compute exactly the loss and gradients of one process on the whole
batch.

    step = UnlearnStep(policy, reference=frozen_copy(policy), backend="chunked")
    shard(step, mp_policy=bf16_policy())            # with WORLD_SIZE > 1 only
    inputs = prepare(batch, device)
    coef = coefficients(eps, global_kind_counts(local_counts))
    out = step(inputs, coef); out.loss.backward()
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from . import method_terms
from .losses import KIND_NORMAL, LossOutput, unlearn_loss
from .losses.types import IGNORE_INDEX
from .method_terms import MethodSettings
from .models import eval_mode, head_of, trunk_of
from .step import kind_row_indices, trunk_inputs, valid_positions, valid_rows

REFERENCES = ("copy", "adapters", "cached", "none")
# The metric name of the normal rows' term of each ``MethodSettings.retain``.
RETAIN_METRICS = {"kl": "normal_kl", "nll": "normal_nll", "activations": "normal_distance"}


@dataclass
class StepInputs:
    """The device tensors of one micro-batch for this rank, prepared on the host."""

    trunk: dict  # keyword arguments of the trunk (input_ids, attention_mask | position_ids)
    flat: torch.Tensor  # (N,) hidden-row index of every valid position
    labels: torch.Tensor  # (N,) shifted labels
    kinds: torch.Tensor  # (N,) kind of every valid position (3: idk_dpo's preferred rows)
    normal_sel: torch.Tensor  # (M,) indices into the N valid positions that are normal
    ref_sel: torch.Tensor  # (K,) valid positions a live reference pass computes
    ref_batch_rows: torch.Tensor  # batch rows the live reference pass runs on
    ref_pos: torch.Tensor  # (K,) hidden-row index of each ref_sel position in that pass
    cached_ref: torch.Tensor | None  # (M, H) cached reference hidden states, or None
    # (N,) cached reference log-probabilities of the forget / preferred positions (0 on the
    # others) for a method that compares them with the reference, or None
    cached_ref_logp: torch.Tensor | None
    counts: tuple[int, int, int]  # this rank's valid positions per kind (host ints)
    sequence: torch.Tensor  # (N,) forget / preferred sequence of each position (else -1)
    n_sequences: int  # this rank's forget sequences (= preferred sequences with idk_dpo)


def prepare(batch, device: torch.device, model: nn.Module, cache=None,
            method: str = "paper") -> StepInputs:
    """Valid rows, kinds and reference positions of ``batch`` (host work, then one copy each).
    ``model``: the policy (packed rows get a mask built for its attention implementation);
    ``method``: which kinds the live reference pass covers (``method_terms.reference_kinds``)."""
    flat, labels, kinds = valid_positions(batch)
    rows = valid_rows(batch)
    t = batch.input_ids.shape[1]
    sel = (kinds == KIND_NORMAL).nonzero().squeeze(1)
    ref_sel = torch.isin(kinds, torch.tensor(method_terms.reference_kinds(method)))
    ref_sel = ref_sel.nonzero().squeeze(1)
    batch_row = flat // t
    ref_batch_rows = torch.unique(batch_row[ref_sel])
    ref_pos = torch.searchsorted(ref_batch_rows, batch_row[ref_sel]) * t + flat[ref_sel] % t
    cached, cached_logp = None, None
    if cache is not None and sel.numel():
        cached = cache.gather(_cached_rows(batch, rows, sel))
        _check_cached(cached, sel, "normal")
        cached = cached.to(device, non_blocking=True)
    logp_kinds = [k for k in method_terms.reference_kinds(method) if k != KIND_NORMAL]
    if cache is not None and logp_kinds:
        cached_logp = torch.zeros(flat.numel(), dtype=torch.float32)
        for kind in logp_kinds:
            at = (kinds == kind).nonzero().squeeze(1)
            values = cache.gather_logprobs(kind, _cached_rows(batch, rows, at))
            _check_cached(values, at, f"kind-{kind}")
            cached_logp[at] = values
        cached_logp = cached_logp.to(device, non_blocking=True)
    counts = tuple(int((kinds == k).sum()) for k in range(3))
    sequence, n_sequences = method_terms.sequence_ids(rows, kinds)
    return StepInputs(trunk_inputs(model, batch, device), flat.to(device), labels.to(device),
                      kinds.to(device), sel.to(device), ref_sel.to(device),
                      ref_batch_rows.to(device), ref_pos.to(device), cached, cached_logp,
                      counts, sequence.to(device), n_sequences)


def _cached_rows(batch, rows: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The cache's row indices of the rows holding valid positions ``at`` (in order; a row's
    positions are consecutive)."""
    return kind_row_indices(batch, torch.unique_consecutive(rows[at]))


def _check_cached(values: torch.Tensor, at: torch.Tensor, what: str) -> None:
    if values.shape[0] != at.numel():
        raise ValueError(f"reference cache does not match the batch's {what} rows (data or "
                         "tokenisation changed): rebuild the cache")


def coefficients(eps: tuple[float, float, float], global_counts) -> tuple[float, float, float]:
    """eps of each kind divided by its valid-token count over the whole step (all ranks, all
    micro-batches): with ``reduction="sum"`` the summed loss is then the global mean loss."""
    return tuple(e / max(int(n), 1) for e, n in zip(eps, global_counts))


class UnlearnStep(nn.Module):
    """Policy (trunk + head), reference and loss of one micro-batch in one forward.

    ``reference``: ``copy`` (a frozen module, kept in eval mode; sharded like the policy),
    ``adapters`` (the LoRA policy with its adapters disabled, run inside the same forward),
    ``cached`` (hidden states come with the inputs; ``ref_head`` is the reference head weight,
    a full tensor gathered once) or ``none`` (no KL term).
    """

    def __init__(self, policy: nn.Module, reference: nn.Module | None = None, *,
                 mode: str | None = None, ref_head: torch.Tensor | None = None,
                 ref_bias: torch.Tensor | None = None, backend: str = "auto",
                 chunk_rows: int | None = None, compute_dtype: torch.dtype = torch.float32,
                 method: MethodSettings | None = None):
        super().__init__()
        self.method = method or MethodSettings()
        self.method.check(policy, mode)
        if mode is None:
            mode = "copy" if reference is not None else \
                ("adapters" if hasattr(policy, "disable_adapter") else "none")
        if mode not in REFERENCES:
            raise ValueError(f"reference mode must be one of {', '.join(REFERENCES)}, "
                             f"got {mode!r}")
        if (mode == "copy") != (reference is not None):
            raise ValueError("a reference module is given exactly with mode='copy'")
        if mode == "adapters" and not hasattr(policy, "disable_adapter"):
            raise ValueError("mode='adapters' needs a LoRA (peft) policy")
        if mode == "cached" and ref_head is None:
            raise ValueError("mode='cached' needs the reference head weight (ref_head)")
        self.policy = policy
        self.reference = reference
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()
        self.mode = mode
        # Plain attributes, not buffers: a full copy, never sharded or checkpointed.
        self.ref_head, self.ref_bias = ref_head, ref_bias
        self.backend, self.chunk_rows, self.compute_dtype = backend, chunk_rows, compute_dtype

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # dropout off in the reference, always
        return self

    def _autocast(self, device: torch.device):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.compute_dtype)

    def reference_states(self, trunk: dict) -> torch.Tensor:
        """(R, T, H) last hidden states of the reference trunk for trunk keyword arguments: the
        copy, the LoRA policy with adapters off, or (``cached``, before training) the policy.
        Called from outside ``forward`` (building the cache): under FSDP2 this is a registered
        forward method, so the root's weights are whole inside it."""
        return self._reference_trunk(trunk)

    @torch.no_grad()
    def _reference_trunk(self, trunk: dict) -> torch.Tensor:
        # Inside forward this is called directly: the registered wrapper would reshard the
        # root's weights on return, before the head is read.
        if self.reference is not None or hasattr(self.policy, "disable_adapter"):
            ctx, model = self._reference_model()
        else:  # building the cache before training: the policy is the reference
            ctx, model = contextlib.nullcontext(), self.policy
        device = next(iter(trunk.values())).device
        with ctx, eval_mode(model), self._autocast(device):
            return trunk_of(model)(**trunk).last_hidden_state

    def _reference_hidden(self, inputs: StepInputs) -> torch.Tensor:
        """(K, H) reference hidden states of the ``ref_sel`` valid positions (a live pass)."""
        idx = inputs.ref_batch_rows
        rows = {k: v.index_select(0, idx) if torch.is_tensor(v) else v
                for k, v in inputs.trunk.items()}
        out = self._reference_trunk(rows)
        out = out.reshape(-1, out.shape[-1]).to(self.compute_dtype)
        return out[inputs.ref_pos]

    def _reference_model(self):
        """(context, model) of the reference: the copy, or the LoRA policy with adapters off."""
        if self.reference is not None:
            return contextlib.nullcontext(), self.reference
        return self.policy.disable_adapter(), self.policy

    def forward(self, inputs: StepInputs, coef: tuple[float, float, float],
                reduction: str = "sum") -> LossOutput:
        """The summed loss of this rank's rows, each kind weighted by ``coef`` (see
        :func:`coefficients`; a per-sequence method's forget weight is divided by the forget
        sequences instead). Every rank runs the same sequence of sharded calls whatever its
        rows (the layers gather their weights collectively). ``reduction="mean"``: each term
        the mean over its own tokens (sequences) of these rows, weighted by ``coef`` (one
        process only)."""
        if reduction == "mean" and self.method.name != "paper":
            out = self.forward(inputs, method_terms.local_coefficients(self.method, coef,
                                                                       inputs))
            return method_terms.as_means(out, self.method, inputs)
        if self.method.name == "rmu":
            return method_terms.rmu_forward(self, inputs, coef)
        device = inputs.flat.device
        eps_f, eps_m, eps_n = coef
        method = self.method
        needs_kl = eps_n != 0 and method.retain == "kl"
        live_ref = (needs_kl or method.reference_on_forget) and \
            self.mode in ("copy", "adapters")
        if live_ref and not inputs.ref_sel.numel():
            raise ValueError("every micro-batch of every rank needs a normal row")
        ref_h = self._reference_hidden(inputs) if live_ref else None
        with self._autocast(device):
            hidden = trunk_of(self.policy)(**inputs.trunk).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).to(self.compute_dtype)[inputs.flat]
        ref_hidden = None
        if ref_h is not None:
            ref_hidden = hidden.new_zeros(hidden.shape)
            ref_hidden[inputs.ref_sel] = ref_h
        elif self.mode == "cached" and needs_kl and inputs.cached_ref is not None \
                and inputs.normal_sel.numel():
            ref_hidden = hidden.new_zeros(hidden.shape)
            ref_hidden[inputs.normal_sel] = inputs.cached_ref.to(self.compute_dtype)

        head = head_of(self.policy)  # whole here: inside the root's forward
        weight = head.weight.to(self.compute_dtype)
        bias = None if head.bias is None else head.bias.to(self.compute_dtype)
        if self.mode == "cached":
            ref_weight = self.ref_head.to(device, self.compute_dtype)
            ref_bias = None if self.ref_bias is None else \
                self.ref_bias.to(device, self.compute_dtype)
        elif self.mode == "copy":
            ref = head_of(self.reference)
            if (ref.logit_scale, ref.softcap) != (head.logit_scale, head.softcap):
                raise ValueError("the reference head's logit scale / soft-cap differ from the "
                                 "policy's")
            ref_weight = ref.weight.to(self.compute_dtype)
            ref_bias = None if ref.bias is None else ref.bias.to(self.compute_dtype)
        else:  # adapters (LoRA leaves the head alone) or no reference: the loss detaches it
            ref_weight, ref_bias = None, None if bias is None else bias.detach()
        n_f, n_m, n_n = inputs.counts
        labels = inputs.labels
        if method.per_sequence:  # forget (and preferred) rows go to the method's own term
            labels = torch.where(inputs.sequence >= 0, IGNORE_INDEX, labels)
            n_f = 0
        kl_hidden = ref_hidden if needs_kl else None
        out = unlearn_loss(hidden, weight, labels, inputs.kinds.clamp(max=2), kl_hidden,
                           ref_weight, eps_forget=eps_f, eps_mismatch=eps_m, eps_normal=eps_n,
                           bias=bias, ref_bias=ref_bias, softcap=head.softcap,
                           logit_scale=head.logit_scale, reduction=reduction,
                           backend=self.backend, chunk_rows=self.chunk_rows,
                           num_rows=(n_f, n_m, n_n if kl_hidden is not None else 0))
        if method.name == "paper":
            return out
        head_args = dict(bias=bias, ref_bias=ref_bias, softcap=head.softcap,
                         logit_scale=head.logit_scale, backend=self.backend,
                         chunk_rows=self.chunk_rows)
        return method_terms.add_method_terms(out, method, inputs, coef, hidden, weight,
                                             ref_hidden, ref_weight, head_args)


def accumulate(step: UnlearnStep, micro: list[StepInputs], eps: tuple[float, float, float],
               *, forward=None) -> dict:
    """Forward and backward of every micro-batch of one optimiser step on this rank.

    Normalisers are the per-kind token counts over all ranks and micro-batches; the gradient
    reduce-scatter runs once, after the last micro-batch. Returns the step's metrics, reduced
    over ranks: the summed loss, each term's mean over its tokens, and the global counts.
    ``forward(inputs, coef)``: the call that runs ``step`` on one micro-batch (default
    ``step`` itself; a caller may wrap it).
    """
    from .distributed import all_reduce_sum, global_kind_counts

    local = [sum(c) for c in zip(*(m.counts for m in micro))]
    *counts, n_sequences = global_kind_counts(local + [sum(m.n_sequences for m in micro)])
    coef = coefficients(eps, counts)
    if step.method.per_sequence:
        coef = (eps[0] / max(n_sequences, 1),) + coef[1:]
    sums = torch.zeros(5, dtype=torch.float64)
    for i, inputs in enumerate(micro):
        set_gradient_sync(step, i == len(micro) - 1)
        out = (forward or step)(inputs, coef)
        out.loss.backward()
        forget_term = out.loss.new_zeros(()) if out.forget_term is None else out.forget_term
        sums += torch.stack([t.detach().double().cpu() for t in
                             (out.loss, out.forget_nll, out.mismatch_nll, out.normal_kl,
                              forget_term)])
    sums = all_reduce_sum(sums).tolist()
    metrics = {"loss": sums[0], "forget_nll": sums[1] / max(counts[0], 1),
               "mismatch_nll": sums[2] / max(counts[1], 1), "normal_kl": None, "counts": counts}
    # the normal rows' term under its own name: KL, NLL (graddiff) or distance (rmu)
    metrics[RETAIN_METRICS[step.method.retain]] = sums[3] / max(counts[2], 1)
    if step.method.name != "paper":  # the method's own forget term, mean per token / sequence
        per = n_sequences if step.method.per_sequence else counts[0]
        metrics["forget_term"] = sums[4] / max(per, 1)
    if not step.method.has_head:
        metrics["forget_nll"] = None  # rmu never computes logits
    return metrics


@contextlib.contextmanager
def measuring(step: UnlearnStep):
    """Inside: the step computes the paper's terms (forget NLL, mismatch NLL, normal KL) whatever
    its method, for likelihood metrics."""
    saved, step.method = step.method, MethodSettings()
    try:
        yield step
    finally:
        step.method = saved


@torch.no_grad()
def likelihood_metrics(step: UnlearnStep, micro: list[StepInputs]) -> dict:
    """Forget NLL, mismatch NLL and normal KL, each the mean over its kind's valid tokens of
    all ranks, through the same (sharded) forward as training, dropout off: the likelihood
    metrics of a run evaluated while the model is sharded."""
    from .distributed import all_reduce_sum, global_kind_counts

    counts = global_kind_counts([sum(c) for c in zip(*(m.counts for m in micro))])
    sums = torch.zeros(3, dtype=torch.float64)
    with eval_mode(step), measuring(step):
        for inputs in micro:
            out = step(inputs, (1.0, 1.0, 1.0))
            sums += torch.stack([t.double().cpu() for t in
                                 (out.forget_nll, out.mismatch_nll, out.normal_kl)])
    sums = all_reduce_sum(sums).tolist()
    return {"forget_nll": sums[0] / max(counts[0], 1), "mismatch_nll": sums[1] / max(counts[1], 1),
            "normal_kl": sums[2] / max(counts[2], 1), "counts": counts}


# ------------------------------------------------------------------------------ sharding
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a (peft-wrapped) causal LM: one FSDP unit each."""
    trunk = trunk_of(model)
    layers = getattr(trunk, "layers", None) or getattr(trunk, "h", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(trunk).__name__}")
    return layers


def bf16_policy(reduce_fp32: bool = True):
    """bf16 compute (weights gathered in bf16), gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                reduce_dtype=torch.float32 if reduce_fp32 else torch.bfloat16)


def shard(step: UnlearnStep, mesh=None, mp_policy=None, reshard_after_forward: bool = True):
    """FSDP2: every decoder layer of the policy (and of a copy reference), then the root.

    Gradients are summed over ranks (divide factor 1, plain SUM collectives): the loss is
    already normalised by the global token counts, so averaging would divide twice.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    models = [step.policy] + ([step.reference] if step.reference is not None else [])
    for model in models:
        for layer in decoder_layers(model):
            fully_shard(layer, **kw)
    fully_shard(step, **kw)
    register_fsdp_forward_method(step, "reference_states")  # builds the cached reference
    for m in step.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: no PREMUL_SUM (gloo lacks it)
    return step


def set_gradient_sync(step: nn.Module, enabled: bool) -> None:
    """Gradient accumulation: skip the reduce-scatter on all but the last micro-batch (a no-op
    unsharded)."""
    if hasattr(step, "set_requires_gradient_sync"):
        step.set_requires_gradient_sync(enabled)


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip gradients to a global L2 norm over all ranks; returns the norm before clipping.

    FSDP2 gradients are DTensors sharded along dim 0: each rank adds the squares of its own
    rows and one all-reduce sums them (the same formula, coefficient and clamp as
    ``torch.nn.utils.clip_grad_norm_``, with plain tensors the same result).
    """
    from torch.distributed.tensor import DTensor, Shard

    from .distributed import all_reduce_sum

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    local = []
    for g in grads:
        if isinstance(g, DTensor):
            if not all(isinstance(pl, Shard) for pl in g.placements):
                raise ValueError(f"clip_grad_norm expects sharded gradients, got {g.placements}")
            g = g.to_local()
        local.append(torch.linalg.vector_norm(g, dtype=torch.float32).square())
    total = all_reduce_sum(torch.stack(local).sum().double().cpu()).sqrt()
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return float(total)


def materialize_from_rank0(step: UnlearnStep, source: nn.Module | None,
                           device: torch.device, reference_source: nn.Module | None = None
                           ) -> None:
    """Fill a step built on the meta device (and sharded) with the weights of ``source``.

    ``source`` is the model loaded on rank 0's host (None on every other rank): one full copy
    per job, not one per rank. Rank 0 broadcasts each tensor and every rank keeps its own
    shard. A ``copy`` reference gets the weights of ``reference_source`` (another model loaded
    on rank 0), or else the same weights. Non-persistent buffers (rotary frequencies), which no
    state dict holds, are broadcast from rank 0's model too.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from .distributed import is_distributed, is_main

    if is_main() and source is None:
        raise ValueError("rank 0 needs the source model")
    step.to_empty(device=device)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    pairs = [(step.policy, source)]
    if step.reference is not None:
        pairs.append((step.reference, reference_source if reference_source is not None
                      else source))
    for model, src_model in pairs:
        # A fresh dict each time: loading replaces its values with this rank's shards.
        set_model_state_dict(model, src_model.state_dict() if is_main() else {}, options=opts)
        src = dict(src_model.named_buffers()) if is_main() else {}
        for name, buf in model.named_buffers():
            if is_main():
                buf.copy_(src[name])
            if is_distributed():
                dist.broadcast(buf, src=0)


# ------------------------------------------------------------------- cached reference
class StepReferenceRunner:
    """What ``reference_cache.build_reference_cache`` needs (``hidden`` and ``head``), served by
    a (sharded) ``UnlearnStep``: the trunk runs inside the root's registered forward method,
    and the head is gathered once into a full, frozen copy."""

    def __init__(self, step: UnlearnStep):
        self.step = step
        self._head = None

    def hidden(self, inputs: dict, autocast=None) -> torch.Tensor:
        return self.step.reference_states(inputs)

    def head(self):
        if self._head is None:  # every rank asks as often: the gather runs once on each
            self._head = self._gather_head()
        return self._head

    def _gather_head(self):
        from torch.distributed.tensor import DTensor

        model = self.step.reference if self.step.reference is not None else self.step.policy
        head = head_of(model)

        def full(t):  # a frozen copy needs no gradient: gathering it outside a forward is fine
            if t is None:
                return None
            return (t.full_tensor() if isinstance(t, DTensor) else t).detach()
        return type(head)(**{**vars(head), "weight": full(head.weight), "bias": full(head.bias)})


def build_cache_sharded(step: UnlearnStep, rows, *, device: torch.device,
                        compute_dtype: torch.dtype, storage_dtype: torch.dtype | None = None,
                        pad_id: int = 0, batch_rows: int = 16, logprob_rows: dict | None = None):
    """The reference cache of ``rows`` (all normal rows; and the log-probabilities of the rows
    in ``logprob_rows``, by kind), each rank computing its own share of every row list.

    Every rank runs the same number of reference forwards (the shorter shares repeat their last
    row, dropped afterwards), then the shares are exchanged, so every rank ends with the whole
    cache, identical to one built by one process.
    """
    from .reference_cache import build_reference_cache

    return build_reference_cache(StepReferenceRunner(step), rows, device=device,
                                 compute_dtype=compute_dtype, storage_dtype=storage_dtype,
                                 pad_id=pad_id, batch_rows=batch_rows, logprob_rows=logprob_rows,
                                 over_rows=_sharded_rows)


def _sharded_rows(rows, compute) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute(rows)`` -> (values, offsets), each rank computing its share (padded to the
    same length by repeating its last row), exchanged and concatenated in row order."""
    import math

    from .distributed import all_gather_objects, share, world_size

    if len(rows) < world_size():
        raise ValueError(f"{len(rows)} rows cannot be split over {world_size()} processes")
    mine = rows[share(len(rows))]
    padded = mine + [mine[-1]] * (math.ceil(len(rows) / world_size()) - len(mine))
    values, offsets = compute(padded)
    lengths = offsets[1:len(mine) + 1] - offsets[:len(mine)]
    pieces = all_gather_objects((values[:int(offsets[len(mine)])], lengths))
    out = torch.zeros(len(rows) + 1, dtype=torch.long)
    out[1:] = torch.cat([n for _, n in pieces]).cumsum(0)
    return torch.cat([v for v, _ in pieces]), out
