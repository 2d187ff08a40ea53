"""Per-token statistics of the policy and its reference without (BT, V) logits.

``token_stats`` returns, per row r with logits ``softcap(logit_scale * (h_r W^T + b))``,

    logp_r     = log p(y_r)                 policy, differentiable w.r.t. hidden, weight, bias
    logp_ref_r = log p_ref(y_r)             reference, no gradient
    kl_r       = KL(p_ref(.|r) || p(.|r))   differentiable like logp_r

the per-token pieces of the sequence-level methods (NPO, SimNPO, DPO-style: see ``methods``).
The specification is ``reference.token_stats_ref``.

How each backend computes them (``TOKEN_STATS_PATHS``):

* chunked, cuda: the shared chunk driver (``driver.run_chunks``) with the backend's row pass;
* cpp: the chunk driver with the extension's fused C++ row pass (``cpp_backend.row_pass``; the
  PyTorch pass for non-fp32 logits) and its fp32 GEMM engine (oneDNN): the extension's own loop
  returns loss terms only, no per-row values;
* triton: the Triton token-stats loop (``triton_kernels/token_stats.py``), the logit scale folded
  into its inputs (hidden * s, bias * s);
* reference: ``token_stats_ref`` with the (BT, V) logits in memory (testing).

On the driver path one custom op (``fastunlearn::token_stats``) runs, without gradients:

    forward   one driver call with every row as an NLL row (value: NLL = -logp) and, with a
              reference and ``with_kl``, a second copy of the rows as KL rows in the same call;
              one driver call over the reference's rows as NLL rows (logp_ref).
    backward  recomputes through the driver (``fastunlearn::token_stats_backward``) with per-row
              weights: -grad_logp on the NLL rows and grad_kl on the KL rows. A row with both
              gradients appears twice in that one call, so dW accumulates in one fp32 buffer;
              an output that got no gradient (unused) adds no rows.

Cost in row GEMMs against the head (N valid rows): forward N policy + N reference logits, and N
policy + N reference more for the KL copy (``with_kl=False`` skips it); backward N policy logits
+ N dX + N dW, and the same plus N reference logits again when kl carries a gradient. The policy
logits are computed twice (forward and backward): the upstream gradients are known only after
the forward, and keeping the logits would cost (BT, V) memory. A sequence method whose
sequences fit a chunk avoids that with ``sequence_term`` (one pass, weights known per chunk).
Each driver call reads the valid-row count back from the device once.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .checks import check_inputs, flat_rows, raise_deferred_errors
from .driver import run_chunks, torch_row_pass
from .options import LossOptions
from .reference import token_stats_ref
from .registry import BackendUnavailableError, resolve_backend
from .types import IGNORE_INDEX, KIND_MISMATCH, KIND_NORMAL

TOKEN_STATS_PATHS = {
    "reference": "plain PyTorch (token_stats_ref), (BT, V) logits materialised (testing)",
    "chunked": "chunk driver + PyTorch row pass",
    "cpp": "chunk driver + the extension's C++ row pass and GEMM engine",
    "cuda": "chunk driver + CUDA row-pass kernel",
    "triton": "Triton token-stats loop (triton_kernels/token_stats.py)",
}
_DRIVER_BACKENDS = ("chunked", "cpp", "cuda")

# Driver kinds with a +1 coefficient under _pass_options: mismatch rows give val = NLL, normal
# rows val = KL; a per-row weight then sets each row's gradient coefficient.
_NLL_ROWS, _KL_ROWS = KIND_MISMATCH, KIND_NORMAL


def _pass_options(softcap, logit_scale, ignore_index, chunk_rows) -> LossOptions:
    return LossOptions(eps_forget=0.0, eps_mismatch=1.0, eps_normal=1.0, reduction="sum",
                       softcap=softcap, logit_scale=logit_scale, ignore_index=ignore_index,
                       chunk_rows=chunk_rows)


def row_pass_of(backend: str):
    """(row pass, whether it needs a contiguous head, fp32 GEMM or None) of a backend that runs
    on the chunk driver (chunked, cpp, cuda, triton)."""
    if backend == "cuda":
        from .cuda_backend import _kernel_row_pass

        return _kernel_row_pass, True, None  # the kernel reads W[y] rows with unit strides
    if backend == "cpp":  # the extension's row pass and GEMM engine (oneDNN), as its loop
        from .cpp_backend import onednn_gemm, row_pass

        return row_pass, False, onednn_gemm
    if backend == "triton":
        from .triton_backend import triton_row_pass

        return triton_row_pass, False, None
    return torch_row_pass, False, None


def _driver_pass(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias, options,
                 backend, kinds, row_weight=None, need=(False, False, False)):
    """One driver call with the rows once per entry of ``kinds`` (NLL and / or KL rows).

    Returns (values (len(kinds), BT) fp32, dX (BT, H) summed over the copies, dW, db)."""
    row_pass, contiguous, fp32_gemm = row_pass_of(backend)
    bt = hidden.shape[0]
    n = len(kinds)

    def repeat(t):
        return t if t is None or n == 1 else torch.cat([t] * n)

    kind = torch.cat([torch.full((bt,), k, device=hidden.device, dtype=torch.long)
                      for k in kinds])
    values = torch.zeros(n * bt, device=hidden.device, dtype=torch.float32)
    _loss, _terms, _counts, dx, dw, db = run_chunks(
        repeat(hidden.detach()), weight.detach().contiguous() if contiguous else weight.detach(),
        repeat(labels), kind, repeat(ref_hidden) if _KL_ROWS in kinds else None, ref_weight,
        bias, ref_bias, options, row_pass, need_dx=need[0], need_dw=need[1], need_db=need[2],
        row_weight=row_weight, row_values=values, fp32_gemm=fp32_gemm)
    if need[0] and n > 1:  # the copies of a row add up
        dx = dx.view(n, bt, -1).sum(0, dtype=torch.promote_types(dx.dtype, torch.float32))
        dx = dx.to(hidden.dtype)
    return values.view(n, bt), dx, dw, db


# ----------------------------------------------------------------------------- the custom op

@torch.library.custom_op("fastunlearn::token_stats", mutates_args=())
def _stats_op(hidden: Tensor, weight: Tensor, labels: Tensor, ref_hidden: Optional[Tensor],
              ref_weight: Optional[Tensor], bias: Optional[Tensor], ref_bias: Optional[Tensor],
              softcap: Optional[float], logit_scale: float, ignore_index: int,
              chunk_rows: Optional[int], backend: str, with_kl: bool
              ) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, logp_ref, kl), each (BT,) fp32, through the chunk driver (no gradients)."""
    options = _pass_options(softcap, logit_scale, ignore_index, chunk_rows)
    has_ref = ref_hidden is not None
    kinds = (_NLL_ROWS, _KL_ROWS) if has_ref and with_kl else (_NLL_ROWS,)
    values, *_ = _driver_pass(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias,
                              options, backend, kinds)
    logp = values[0].neg().add_(0.0)  # +0 on ignored rows, not -0
    kl = values[1].clone() if len(kinds) == 2 else torch.zeros_like(logp)
    logp_ref = torch.zeros_like(logp)
    if has_ref:
        ref_values, *_ = _driver_pass(ref_hidden, weight if ref_weight is None else ref_weight,
                                      labels, None, None, ref_bias, None, options, backend,
                                      (_NLL_ROWS,))
        logp_ref = ref_values[0].neg().add_(0.0)
    return logp, logp_ref, kl


@_stats_op.register_fake
def _stats_fake(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias, softcap,
                logit_scale, ignore_index, chunk_rows, backend, with_kl):
    return tuple(hidden.new_empty((hidden.shape[0],), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("fastunlearn::token_stats_backward", mutates_args=())
def _stats_backward_op(grad_logp: Optional[Tensor], grad_kl: Optional[Tensor], hidden: Tensor,
                       weight: Tensor, labels: Tensor, ref_hidden: Optional[Tensor],
                       ref_weight: Optional[Tensor], bias: Optional[Tensor],
                       ref_bias: Optional[Tensor], softcap: Optional[float], logit_scale: float,
                       ignore_index: int, chunk_rows: Optional[int], backend: str,
                       need_dx: bool, need_dw: bool, need_db: bool
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dW, db) of sum(grad_logp * logp + grad_kl * kl); an empty (0,) tensor for a
    gradient not asked for (dX in hidden's dtype, dW in weight's, db in bias's)."""
    need_db = need_db and bias is not None
    kinds, weights = [], []
    if grad_logp is not None:
        kinds.append(_NLL_ROWS)
        weights.append(-grad_logp.float())  # d logp = -d NLL
    if grad_kl is not None and ref_hidden is not None:
        kinds.append(_KL_ROWS)
        weights.append(grad_kl.float())
    if not kinds:
        return (torch.zeros_like(hidden) if need_dx else hidden.new_empty(0),
                torch.zeros_like(weight) if need_dw else hidden.new_empty(0),
                torch.zeros_like(bias) if need_db else hidden.new_empty(0))
    options = _pass_options(softcap, logit_scale, ignore_index, chunk_rows)
    _values, dx, dw, db = _driver_pass(hidden, weight, labels, ref_hidden, ref_weight, bias,
                                       ref_bias, options, backend, tuple(kinds),
                                       torch.cat(weights), (need_dx, need_dw, need_db))
    return dx, dw, db


@_stats_backward_op.register_fake
def _stats_backward_fake(grad_logp, grad_kl, hidden, weight, labels, ref_hidden, ref_weight,
                         bias, ref_bias, softcap, logit_scale, ignore_index, chunk_rows, backend,
                         need_dx, need_dw, need_db):
    need_db = need_db and bias is not None
    return (hidden.new_empty(hidden.shape if need_dx else (0,)),
            weight.new_empty(weight.shape) if need_dw else hidden.new_empty(0),
            bias.new_empty(bias.shape) if need_db else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    (hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias, softcap, logit_scale,
     ignore_index, chunk_rows, backend, with_kl) = inputs
    ctx.save_for_backward(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias)
    ctx.cfg = (softcap, logit_scale, ignore_index, chunk_rows, backend)
    ctx.set_materialize_grads(False)  # an unused output adds no rows to the recompute
    ctx.mark_non_differentiable(output[1])
    if ref_hidden is None or not with_kl:
        ctx.mark_non_differentiable(output[2])


def _backward(ctx, grad_logp, _grad_logp_ref, grad_kl):
    hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = (n[0], n[1], bias is not None and n[5])
    if not any(need) or (grad_logp is None and grad_kl is None):
        return (None,) * 13
    dx, dw, db = _stats_backward_op(grad_logp, grad_kl, hidden, weight, labels, ref_hidden,
                                    ref_weight, bias, ref_bias, *ctx.cfg, *need)
    return ((dx if need[0] else None), (dw if need[1] else None), None, None, None,
            (db if need[2] else None)) + (None,) * 7


torch.library.register_autograd("fastunlearn::token_stats", _backward,
                                setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry

def _scaled(t, s, to_float=False):
    """``t * s`` (the logit scale folded into an input), or ``t`` when s == 1 or t is None."""
    if t is None or s == 1.0:
        return t
    return (t.float() if to_float else t) * s


def _reference_stats(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias,
                     options: LossOptions):
    s = options.logit_scale
    logp, logp_ref, kl = token_stats_ref(
        _scaled(hidden, s), weight, labels, _scaled(ref_hidden, s), ref_weight,
        bias=_scaled(bias, s), ref_bias=_scaled(ref_bias, s), softcap=options.softcap,
        ignore_index=options.ignore_index)
    return logp.float(), logp_ref.float(), kl.float()


def _triton_stats(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias,
                  options: LossOptions):
    from .triton_backend import token_stats as triton_token_stats

    s = options.logit_scale
    return triton_token_stats(
        _scaled(hidden, s), weight, labels, _scaled(ref_hidden, s), ref_weight,
        bias=_scaled(bias, s, to_float=True), ref_bias=_scaled(ref_bias, s, to_float=True),
        softcap=options.softcap, ignore_index=options.ignore_index,
        chunk_rows=options.chunk_rows)


def checked_rows(hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias,
                 options: LossOptions, backend: str):
    """The input check of every token-statistics path: (backend name, hidden, ref_hidden,
    labels, ref_bias) with the inputs flattened to rows. Labels are checked here for every
    path (the driver folds the check into its count)."""
    raise_deferred_errors()
    hidden, ref_hidden, labels, ref_bias = flat_rows(hidden, ref_hidden, labels, ref_weight,
                                                     bias, ref_bias)
    chosen = resolve_backend(backend, hidden.device.type)
    if chosen.name not in TOKEN_STATS_PATHS:
        raise BackendUnavailableError(f"backend {chosen.name!r} has no token-stats path "
                                      f"(known: {', '.join(TOKEN_STATS_PATHS)})")
    kind = torch.zeros(labels.shape, dtype=torch.int8, device=labels.device)
    check_inputs(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, options,
                 dtypes=chosen.dtypes, backend=chosen.name,
                 rows_on_device=chosen.name in _DRIVER_BACKENDS)
    return chosen.name, hidden, ref_hidden, labels, ref_bias


def token_stats(hidden: Tensor, weight: Tensor, labels: Tensor,
                ref_hidden: Tensor | None = None, ref_weight: Tensor | None = None, *,
                bias: Tensor | None = None, ref_bias: Tensor | None = None,
                softcap: float | None = None, logit_scale: float = 1.0,
                ignore_index: int = IGNORE_INDEX, backend: str = "auto",
                chunk_rows: int | None = None, with_kl: bool = True
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token log-probabilities of the labels and KL to the reference, fused.

    Args:
        hidden: (BT, H) or (B, T, H) policy hidden states; row r predicts ``labels[r]``.
        weight: (V, H) policy head; bias: (V,) or None. Logits are
            ``softcap(logit_scale * (hidden @ weight.T + bias))``, as in ``unlearn_loss``.
        labels: (BT,) or (B, T) int ids; ``ignore_index`` on rows that do not count. Any other
            label outside [0, V) is an error.
        ref_hidden: reference hidden states aligned with ``hidden``, or None (then logp_ref and
            kl are 0). ref_weight: (V, H) reference head, or None for ``weight`` (detached);
            ``ref_bias`` then defaults to ``bias``.
        backend: "auto" or a loss backend name (``TOKEN_STATS_PATHS`` says how each one runs).
        chunk_rows: rows per chunk, or None for the driver's plan.
        with_kl: False skips the KL (kl is then 0, with no gradient): a sequence method that
            reads only logp and logp_ref saves a policy and a reference GEMM per forward on the
            driver backends.

    Returns:
        (logp, logp_ref, kl), each (BT,) float32, 0 on ignored rows. logp and kl are
        differentiable w.r.t. hidden, weight and bias (any per-token upstream gradients);
        logp_ref is not. No (BT, V) logits are built except by the reference backend.

    Raises:
        ValueError: one line naming the bad input (shape, dtype, device, label, option).
        BackendUnavailableError: the backend cannot run here or has no token-stats path.

    Example:
        >>> logp, logp_ref, _ = token_stats(h, W, labels, ref_h, with_kl=False)
        >>> S = sequence_sums(logp, segment, n_seq)   # fastunlearn.losses.methods
    """
    options = _pass_options(softcap, logit_scale, ignore_index, chunk_rows)
    chosen, hidden, ref_hidden, labels, ref_bias = checked_rows(
        hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias, options, backend)
    args = (hidden, weight, labels, ref_hidden, ref_weight, bias, ref_bias)
    if chosen == "reference":
        logp, logp_ref, kl = _reference_stats(*args, options)
    elif chosen == "triton":
        logp, logp_ref, kl = _triton_stats(*args, options)
    else:
        return _stats_op(*args, options.softcap, options.logit_scale, options.ignore_index,
                         options.chunk_rows, chosen, bool(with_kl))
    if not with_kl or ref_hidden is None:  # 0 and constant, as on the driver path
        kl = torch.zeros_like(logp_ref)
    return logp, logp_ref, kl


def reference_logprobs(ref_hidden: Tensor, weight: Tensor, labels: Tensor,
                       ref_weight: Tensor | None = None, *, bias: Tensor | None = None,
                       ref_bias: Tensor | None = None, **kwargs) -> Tensor:
    """(BT,) the reference's log p(label), without gradient (0 on ignored rows): its own head
    ``ref_weight`` / ``ref_bias``, or with ``ref_weight`` None the policy's head, bias included
    (``flat_rows``' rule). ``kwargs``: the other options of ``token_stats``."""
    ref_hidden, _, labels, ref_bias = flat_rows(ref_hidden, None, labels, ref_weight, bias,
                                                ref_bias)
    head = weight if ref_weight is None else ref_weight
    with torch.no_grad():
        return token_stats(ref_hidden, head.detach(), labels,
                           bias=None if ref_bias is None else ref_bias.detach(), with_kl=False,
                           **kwargs)[0]
