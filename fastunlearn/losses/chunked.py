"""Chunked PyTorch backend: the fused loss without ever holding (BT, V) logits.

Rows whose label is ignored are dropped first. The valid rows are processed in chunks of
``chunk_rows``; for each chunk we form the (chunk, V) logits in fp32, compute the three terms and
the logit gradient in place, and immediately fold it into dX (chunk, H) and an fp32 dW (V, H).
Gradients are computed in the forward; the backward only scales them by grad_output.

Memory: about 4 fp32 (chunk, V) buffers (policy logits, reference logits, probabilities, the
gradient) plus dW in fp32. FLOPs: 2NHV (logits) + 2NHV (dX) + 2NHV (dW) + 2 N_normal HV (ref).
This backend synchronises with the host once (to count valid rows); kernel backends do not.
"""
from __future__ import annotations

import os

import torch

from .types import IGNORE_INDEX, KIND_FORGET, KIND_MISMATCH, KIND_NORMAL, LossOutput, scaled_as

DEFAULT_WORKSPACE_MB = 256


def default_chunk_rows(vocab: int, workspace_mb: int | None = None) -> int:
    """Rows per chunk so that ~4 fp32 (rows, V) buffers fit in the workspace."""
    mb = workspace_mb or int(os.environ.get("FASTUNLEARN_WORKSPACE_MB", DEFAULT_WORKSPACE_MB))
    return max(16, (mb * 2**20) // (4 * 4 * max(vocab, 1)))


def _capped(z: torch.Tensor, softcap: float | None):
    """Apply the logit soft-cap in place; return the derivative factor (or None)."""
    if softcap is None:
        return None
    t = torch.tanh(z.div_(softcap))
    z.copy_(t).mul_(softcap)
    return 1.0 - t * t


def _project(h, w, b, softcap):
    z = (h @ w.T).float()
    if b is not None:
        z += b.float()
    return z, _capped(z, softcap)


def chunked_forward_backward(hidden, weight, labels, kind, ref_hidden, ref_weight, eps_forget,
                             eps_mismatch, eps_normal, bias, ref_bias, softcap, reduction,
                             ignore_index, chunk_rows):
    """Returns (loss, terms(3), counts(3), dX, dW, db) with gradients for grad_output = 1."""
    device = hidden.device
    bt, h_dim = hidden.shape
    vocab = weight.shape[0]
    labels = labels.long()
    kind = kind.long()
    has_ref = ref_hidden is not None
    valid = labels != ignore_index
    if not has_ref:
        valid = valid & (kind != KIND_NORMAL)
    rows = valid.nonzero().squeeze(1)  # host sync: the chunk loop needs the count
    kind_v = kind[rows]
    lab_v = labels[rows]
    counts = torch.stack([(kind_v == k).sum() for k in (KIND_FORGET, KIND_MISMATCH, KIND_NORMAL)])
    sign = torch.tensor([-eps_forget, eps_mismatch, eps_normal], device=device,
                        dtype=torch.float32)
    if reduction == "mean":
        scale = sign / counts.clamp(min=1).float()
    else:
        scale = sign
    row_scale = scale[kind_v]  # d loss / d (row's nll or kl)

    d_hidden = torch.zeros(bt, h_dim, device=device, dtype=hidden.dtype)
    d_weight = torch.zeros(vocab, h_dim, device=device, dtype=torch.float32)
    d_bias = torch.zeros(vocab, device=device, dtype=torch.float32) if bias is not None else None
    sums = torch.zeros(3, device=device, dtype=torch.float32)
    rw = weight if ref_weight is None else ref_weight
    chunk_rows = chunk_rows or default_chunk_rows(vocab)

    for start in range(0, rows.numel(), chunk_rows):
        r = rows[start:start + chunk_rows]
        k = kind_v[start:start + chunk_rows]
        y = lab_v[start:start + chunk_rows]
        h = hidden[r]
        # 1. policy logits and log-probabilities (fp32)
        z, cap_grad = _project(h, weight, bias, softcap)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        z_y = z.gather(1, y[:, None]).squeeze(1)
        nll = lse.squeeze(1) - z_y
        log_p = z.sub_(lse)  # in place: z now holds log p
        is_normal = k == KIND_NORMAL
        row_val = nll
        # 2. normal rows: KL(q || p) = sum q (log q - log p); d/dz = p - q
        q = None
        if has_ref and bool(is_normal.any()):
            nr = is_normal.nonzero().squeeze(1)
            with torch.no_grad():
                zr, _ = _project(ref_hidden[r[nr]].detach(), rw.detach(),
                                 None if ref_bias is None else ref_bias.detach(), softcap)
                log_q = torch.log_softmax(zr, dim=-1)
                del zr
            q = log_q.exp()
            kl = (q * (log_q - log_p[nr])).sum(-1)
            row_val = row_val.clone()
            row_val[nr] = kl
            del log_q
        p = log_p.exp_()  # in place: z now holds p
        if q is not None:
            p[nr] -= q
            del q
        # 3. NLL rows: d nll / dz = p - onehot(y)
        nll_rows = (~is_normal).nonzero().squeeze(1)
        p[nll_rows, y[nll_rows]] -= 1.0
        sums.index_add_(0, k, row_val.float())
        grad_z = p.mul_(row_scale[start:start + chunk_rows, None])
        if cap_grad is not None:
            grad_z.mul_(cap_grad)
        # 4. fold into dX, dW (fp32), db
        d_hidden[r] = (grad_z.to(weight.dtype) @ weight).to(hidden.dtype)
        d_weight.addmm_(grad_z.T, h.float())
        if d_bias is not None:
            d_bias += grad_z.sum(0)

    if reduction == "mean":
        terms = sums / counts.clamp(min=1).float()
    else:
        terms = sums
    loss = (sign * terms).sum()
    return loss, terms, counts, d_hidden, d_weight, d_bias


class ChunkedUnlearnLossFunction(torch.autograd.Function):
    """Autograd wrapper: gradients computed in forward, scaled by grad_output in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, kind, ref_hidden, ref_weight, ref_bias,
                eps_forget, eps_mismatch, eps_normal, softcap, reduction, ignore_index,
                chunk_rows):
        with torch.no_grad():
            loss, terms, counts, dx, dw, db = chunked_forward_backward(
                hidden, weight, labels, kind, ref_hidden, ref_weight, eps_forget, eps_mismatch,
                eps_normal, bias, ref_bias, softcap, reduction, ignore_index, chunk_rows)
        ctx.save_for_backward(dx, dw, db if db is not None else torch.empty(0))
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(terms, counts)
        return loss, terms, counts

    @staticmethod
    def backward(ctx, grad_loss, _grad_terms, _grad_counts):
        dx, dw, db = ctx.saved_tensors
        g = grad_loss.float()
        d_hidden = dx * g.to(dx.dtype) if ctx.needs_input_grad[0] else None
        d_weight = scaled_as(dw, g, ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        d_bias = scaled_as(db, g, ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] \
            else None
        return (d_hidden, d_weight, d_bias) + (None,) * 12


def chunked_unlearn_loss(hidden, weight, labels, kind, ref_hidden=None, ref_weight=None, *,
                         eps_forget, eps_mismatch, eps_normal, bias=None, ref_bias=None,
                         softcap=None, reduction="mean", ignore_index=IGNORE_INDEX,
                         chunk_rows=None) -> LossOutput:
    loss, terms, counts = ChunkedUnlearnLossFunction.apply(
        hidden, weight, bias, labels, kind, ref_hidden, ref_weight, ref_bias, eps_forget,
        eps_mismatch, eps_normal, softcap, reduction, ignore_index, chunk_rows)
    return LossOutput(loss, terms[0], terms[1], terms[2], counts[0], counts[1], counts[2],
                      backend="chunked")
