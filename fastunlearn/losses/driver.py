"""The chunk driver shared by the chunked, triton and cuda backends (docs/architecture.md).

Valid rows are sorted by kind (forget, mismatch, normal, then dropped rows), so the rows that need
reference logits form one suffix. Each chunk of C sorted rows then runs:

    1. Z   = s H_c W^T                       policy logits, one GEMM in W's dtype
    2. ZR  = s HR_c W_ref^T                  reference logits of the chunk's normal suffix only
    3. row pass (pluggable)                  per-row NLL / KL, dZ written over Z
    4. dX_c = s dZ W                         straight into the caller's dX rows
    5. dW (=|+=) dZ^T (s H_c)                fp32 accumulation, beta = 0 on the first chunk
                                             (a single chunk writes W's dtype directly)
    6. db += s colsum(dZ)

s is the logit scale, applied to the gathered (C, H) rows, never to a (V, H) copy of a head.
Inside ``probe.record_phases()`` the time of each step is recorded (benchmarks).
Steps 4-6 run only for the inputs that need a gradient: a frozen head (LoRA) or a call under
``no_grad`` pays no dW GEMM. Gradients are for grad_output = 1; the autograd wrapper (``op``)
scales them in place.

A row pass is ``row_pass(z, zr, labels, scale, ref_start, hc, w, bias, ref_bias, softcap)``:
z (R, V) raw logits in the GEMM dtype, rows [0, ref_start) are NLL rows (label ``labels[r]``),
rows [ref_start, R) are normal rows whose reference logits are zr (R - ref_start, V); hc (R, H)
the scaled hidden rows and w (V, H) the head (for an fp32 target logit); bias / ref_bias (V,)
fp32 contiguous, already scaled, or None; softcap c or None. It overwrites z with
``scale[r] * d val_r / d z_r`` (the cap derivative included) and returns val (R,) fp32.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from .checks import defer_error_flag, invalid_rows, invalid_rows_error
from .options import LossOptions
from .probe import active_phases
from .types import KIND_NORMAL

WORKSPACE_ENV = "FASTUNLEARN_WORKSPACE_MB"
DEFAULT_WORKSPACE_MB = {"cuda": 1024, "cpu": 192}
MIN_CHUNK, MAX_CHUNK = 16, 8192
KIND_DROPPED = 3


@dataclass(frozen=True)
class ChunkPlan:
    """rows: rows per chunk; ref_rows: rows of the reference-logit buffer; chunks: count."""

    rows: int
    ref_rows: int
    chunks: int
    workspace_bytes: int


def plan_chunks(n_rows: int, n_ref: int, vocab: int, itemsize: int, device_type: str,
                chunk_rows: int | None = None) -> ChunkPlan:
    """The one chunk plan: as many rows per chunk as the logit workspace holds.

    ``itemsize`` is the bytes per logit of a chunk row: the workspace element, plus what the
    row pass allocates per logit (``temp_bytes_per_logit`` of a row-pass function).

    The budget (``FASTUNLEARN_WORKSPACE_MB``, default 1 GiB on CUDA, 192 MiB on CPU) holds
    the policy logits of a chunk and the reference logits of its normal rows. Policy and
    reference rows share chunks, so when few rows are normal the policy rows get almost all
    of it: fewer chunks means fewer passes over the fp32 dW. Every chunk re-reads and rewrites
    dW (V x H x 4 bytes), so chunks stay large (GEMM-friendly multiples of 256 from 512 rows).
    """
    if chunk_rows is None:
        mb = int(os.environ.get(WORKSPACE_ENV, 0) or DEFAULT_WORKSPACE_MB.get(device_type, 192))
        budget = (mb * 2**20) // (max(vocab, 1) * itemsize)  # rows of logits that fit
        rows = max(budget - min(n_ref, budget // 2), budget // 2)
        if rows >= 512:
            rows = rows // 256 * 256
        rows = max(MIN_CHUNK, min(MAX_CHUNK, rows))
    else:
        rows = int(chunk_rows)
    rows = max(1, min(rows, n_rows))
    ref_rows = min(rows, n_ref)
    chunks = -(-n_rows // rows) if n_rows else 0
    return ChunkPlan(rows, ref_rows, chunks, (rows + ref_rows) * vocab * itemsize)


def bytes_per_logit(gemm_dt: torch.dtype, row_pass) -> int:
    """A chunk's bytes per logit: the workspace element plus the row pass's own temporaries
    (``row_pass.temp_bytes_per_logit``: bytes, or a function of the logits' dtype)."""
    temp = getattr(row_pass, "temp_bytes_per_logit", 0)
    return torch.finfo(gemm_dt).bits // 8 + (temp(gemm_dt) if callable(temp) else temp)


def gemm_dtype(weight: torch.Tensor) -> torch.dtype:
    """The GEMMs run in the head's dtype: no (V, H) cast of the head, hidden rows are cast."""
    return weight.dtype


def torch_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, beta: float) -> torch.Tensor:
    """out = beta * out + a @ b with torch's GEMM (beta = 0: out's old contents are ignored)."""
    if beta == 0.0:
        return torch.mm(a, b, out=out)
    return out.addmm_(a, b, beta=beta)


def accumulate_dw(dw: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """dw (V, H) = or += dz^T h in dw's dtype (fp32, or the inputs' own for a single chunk)."""
    from fastunlearn.triton_kernels.dw_accumulate import accumulate_dw as acc

    acc(dw, dz, h, beta=0.0 if first else 1.0)


def _scalar_vector(values, device) -> torch.Tensor:
    """A small fp32 device vector built with fill_ (a kernel argument): torch.tensor(list) on
    an accelerator would be a synchronising host-to-device copy."""
    out = torch.empty(len(values), device=device, dtype=torch.float32)
    for i, v in enumerate(values):
        out[i].fill_(float(v))
    return out


def _host_counts(bad, counts, options: LossOptions, has_ref: bool, vocab: int):
    """(n_forget, n_mismatch, n_normal) on the host, with the row check folded in."""
    device = counts.device
    if options.num_rows is not None:
        n_f, n_m, n_n = options.num_rows
        host = (n_f, n_m, n_n if has_ref else 0)
        mismatch = ValueError(f"num_rows={host} does not match the valid rows of the batch")
        if device.type == "cpu":
            if tuple(counts.tolist()) != host:
                raise ValueError(f"{mismatch} {tuple(counts.tolist())}")
        else:  # no synchronisation: checked at the next call
            want = _scalar_vector(host, device)
            defer_error_flag(bad.sum(), invalid_rows_error(
                "some", vocab, options.ignore_index, " (found in an earlier loss call)"))
            defer_error_flag((counts.float() != want).sum(), mismatch)
        return host
    if device.type == "cpu":  # rows already checked eagerly
        return tuple(counts.tolist())
    *host, n_bad = torch.cat([counts, bad.sum()[None]]).tolist()  # the one host sync
    if n_bad:
        raise invalid_rows_error(n_bad, vocab, options.ignore_index)
    return tuple(host)


def run_chunks(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
               options: LossOptions, row_pass, *, need_dx=True, need_dw=True, need_db=True,
               row_weight=None, row_values=None, fp32_gemm=None, chunk_sizes=None,
               chunk_weights=None):
    """(loss, terms (3,), counts (3,), dX, dW, db) for grad_output = 1.

    dX in hidden's dtype, dW in weight's dtype, db in bias's dtype; an input that needs no
    gradient gets an empty (0,) tensor and its GEMM is skipped.

    Per-row hooks (the token statistics, ``token_stats``): ``row_weight`` (BT,) multiplies
    each row's coefficient, so the gradients are those of sum_r coef_r * row_weight_r * val_r;
    ``row_values`` (BT,) fp32, filled in caller order with each counted row's NLL / KL (the
    other rows keep their value). ``loss`` and ``terms`` ignore ``row_weight``.
    ``fp32_gemm(a, b, out, beta)`` (out = beta * out + a @ b) replaces torch's GEMMs when the
    head is fp32 (the cpp backend's oneDNN engine on CPU).

    Per-chunk hooks (a sequence method's one-pass term, ``sequence_term``): ``chunk_sizes``
    (host ints summing to the counted rows) replaces the plan's equal chunks;
    ``chunk_weights(start, rows, vals)`` is called after each chunk's row pass with the
    chunk's position in sorted order and its (rows,) values, and returns (rows,) fp32 factors
    for the chunk's gradient rows (known only once the chunk's values are).
    """
    need_db = need_db and bias is not None
    device = hidden.device
    phases = active_phases()
    mark = (lambda name: phases.mark(name, device)) if phases else (lambda name: None)
    mark("start")
    bt, h_dim = hidden.shape
    vocab = weight.shape[0]
    has_ref = ref_hidden is not None
    labels = labels.long()
    kind = kind.long()
    bad = invalid_rows(labels, kind, vocab, options.ignore_index)
    counted = (labels != options.ignore_index) & ~bad
    if not has_ref:
        counted &= kind != KIND_NORMAL  # no reference: the KL term is absent
    key = torch.where(counted, kind, KIND_DROPPED)
    counts = (key[None, :] == torch.arange(3, device=device)[:, None]).sum(1)
    n_f, n_m, n_n = _host_counts(bad, counts, options, has_ref, vocab)
    n_rows = n_f + n_m + n_n
    order = torch.sort(key, stable=True).indices[:n_rows]
    key_sorted = key[order]
    # dropped rows only enter a chunk when a caller's num_rows is wrong (then reported later):
    # they get label 0 and a zero coefficient, so no kernel reads outside its row
    labels_sorted = torch.where(key_sorted == KIND_DROPPED, 0, labels[order])
    signs = _scalar_vector(options.signs, device)
    per_kind = signs if options.reduction_sum else signs / counts.clamp(min=1).float()
    row_scale = torch.cat([per_kind, per_kind.new_zeros(1)])[key_sorted]
    if row_weight is not None:
        row_scale = row_scale * row_weight.detach().float()[order]
    row_scale = row_scale.contiguous()

    gdt = gemm_dtype(weight)
    fp32_gemm = fp32_gemm if gdt == torch.float32 else None  # the engine takes fp32 only
    mm = fp32_gemm or torch_gemm
    acc_dt = torch.promote_types(gdt, torch.float32)
    s = options.logit_scale
    w = weight.detach()
    rw = w if ref_weight is None else ref_weight.detach().to(gdt)
    # (V,) vectors in the row pass's precision, contiguous, scaled: read by every kernel
    b32 = None if bias is None else (bias.detach().to(acc_dt) * s).contiguous()
    rb32 = None if ref_bias is None else (ref_bias.detach().to(acc_dt) * s).contiguous()

    # "not needed" is an empty tensor, a distinct one per output (op outputs may not alias)
    dx = torch.zeros(bt, h_dim, device=device, dtype=hidden.dtype) if need_dx \
        else hidden.new_empty(0)
    vals = torch.zeros(n_rows, device=device, dtype=torch.float32)
    plan = plan_chunks(n_rows, n_n, vocab, bytes_per_logit(gdt, row_pass), device.type,
                       options.chunk_rows)
    sizes = _chunk_sizes(plan, n_rows, chunk_sizes)
    # one chunk: one GEMM straight into the head's dtype rounds once, as an fp32 sum then a
    # cast would; several chunks accumulate in fp32
    dw_dt = gdt if len(sizes) == 1 else acc_dt
    dw = torch.empty(vocab, h_dim, device=device, dtype=dw_dt) if need_dw \
        else hidden.new_empty(0)
    db = torch.zeros(vocab, device=device, dtype=acc_dt) if need_db else hidden.new_empty(0)
    if n_rows:
        most = max(sizes)
        zbuf = torch.empty(most, vocab, device=device, dtype=gdt)
        zrbuf = torch.empty(min(most, n_n), vocab, device=device, dtype=gdt) if n_n else None
        dxbuf = torch.empty(most, h_dim, device=device, dtype=gdt) if need_dx else None
        first_normal = n_f + n_m
        mark("glue")
        starts = [0, *itertools.accumulate(sizes)][:-1]
        for i, (s0, r) in enumerate(zip(starts, sizes)):
            n_ref = max(0, s0 + r - max(s0, first_normal))
            idx = order[s0:s0 + r]
            hc = _gather(hidden, idx, gdt, s)
            z = mm(hc, w.t(), zbuf[:r], 0.0)  # 1
            mark("logits")
            zr = None
            if n_ref:
                hr = _gather(ref_hidden, idx[r - n_ref:], gdt, s)
                zr = mm(hr, rw.t(), zrbuf[:n_ref], 0.0)  # 2
                mark("ref_logits")
            vals[s0:s0 + r] = row_pass(z, zr, labels_sorted[s0:s0 + r],  # 3
                                       row_scale[s0:s0 + r], r - n_ref, hc, w, b32, rb32,
                                       options.softcap)
            factor = None
            if chunk_weights is not None:
                factor = chunk_weights(s0, r, vals[s0:s0 + r]).to(gdt)[:, None]
                hc.mul_(factor)  # dW = dZ^T (f * H_c); the row pass is done with hc
            mark("row_pass")
            if need_dx:  # 4
                d = mm(z, w, dxbuf[:r], 0.0)
                if factor is not None:
                    d.mul_(factor)
                if s != 1.0:
                    d.mul_(s)
                dx.index_copy_(0, idx, d.to(dx.dtype))
                mark("dx")
            if need_dw:  # 5
                if fp32_gemm is not None:
                    fp32_gemm(z.t(), hc, dw, 0.0 if i == 0 else 1.0)
                else:
                    accumulate_dw(dw, z, hc, first=i == 0)
                mark("dw")
            if need_db:  # 6
                db += z.sum(0, dtype=acc_dt) if factor is None else z.t().mv(factor[:, 0])
                mark("glue")
        del zbuf, zrbuf, dxbuf
    elif need_dw:
        dw.zero_()
    if need_db and s != 1.0:
        db.mul_(s)
    if row_values is not None:
        row_values.index_copy_(0, order, vals)
    sums = torch.zeros(4, device=device, dtype=torch.float32).index_add_(0, key_sorted, vals)[:3]
    terms = sums if options.reduction_sum else sums / counts.clamp(min=1).float()
    loss = (signs * terms).sum()
    if need_dw and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)  # in the forward: the backward allocates nothing of (V, H)
    if need_db and db.dtype != bias.dtype:
        db = db.to(bias.dtype)
    mark("glue")
    return loss, terms, counts, dx, dw, db


def _chunk_sizes(plan: ChunkPlan, n_rows: int, sizes) -> list[int]:
    """The rows of each chunk: the caller's ``sizes`` (checked) or the plan's equal chunks."""
    if sizes is None:
        return [min(plan.rows, n_rows - s0) for s0 in range(0, n_rows, plan.rows)]
    sizes = [int(r) for r in sizes]
    if sum(sizes) != n_rows or min(sizes, default=1) < 1:
        raise ValueError(f"chunk_sizes {sizes} must be positive and add up to the {n_rows} "
                         "counted rows")
    return sizes


def _gather(t: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype, scale: float):
    """Rows ``idx`` of ``t`` as a fresh (R, H) tensor in ``dtype``, times the logit scale."""
    rows = t.detach().index_select(0, idx).to(dtype)
    return rows.mul_(scale) if scale != 1.0 else rows


# ----------------------------------------------------------------------------- PyTorch row pass

def _logits(z, bias, softcap, dtype):
    """(x, t): fp32 logits with bias and cap, and tanh(x_raw / c) (None without a cap)."""
    x = z.to(dtype, copy=True)
    if bias is not None:
        x += bias
    if softcap is None:
        return x, None
    t = torch.tanh(x.div_(softcap))
    return x.copy_(t).mul_(softcap), t


def _softmax_parts(x):
    """(m, e, s): row max (0 for an all -inf row, so no -inf - -inf), exp(x - m), sum."""
    m = x.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    return m.squeeze(1), e, e.sum(dim=1)


def target_logits(hc, w, y, bias, softcap, dtype=torch.float32):
    """softcap(<h_r, W_y> + b_y) in fp32 from the hidden rows: the stored logit would carry the
    GEMM dtype's rounding (2^-9 relative in bf16) straight into the NLL."""
    x = (hc.to(dtype) * w.index_select(0, y).to(dtype)).sum(1)
    if bias is not None:
        x += bias.index_select(0, y)
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def torch_row_pass(z, zr, labels, scale, ref_start, hc, w, bias, ref_bias, softcap):
    """The row pass in PyTorch (the chunked backend; the specification of the kernels).

    Softmax as exp(x - max) / sum (not exp(x - lse): lse rounded to fp32 costs the gradient
    precision at large logits); -inf logits (masked vocabulary entries) give p = q = 0 and add
    nothing to the KL cross term."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    rows = z.shape[0]
    x, t = _logits(z, bias, softcap, dtype)
    m, p, s = _softmax_parts(x)
    lse = m + torch.log(s)
    p.div_(s[:, None])
    vals = torch.empty(rows, device=z.device, dtype=torch.float32)
    if ref_start > 0:
        ar = torch.arange(ref_start, device=z.device)
        y = labels[:ref_start]
        x_y = target_logits(hc[:ref_start], w, y, bias, softcap, dtype)
        vals[:ref_start] = lse[:ref_start] - x_y
        p[ar, y] -= 1.0
    if ref_start < rows:
        xr, _ = _logits(zr, ref_bias, softcap, dtype)
        mr, q, sr = _softmax_parts(xr)
        q.div_(sr[:, None])
        lse_r = mr + torch.log(sr)
        xn = x[ref_start:]
        cross = torch.where(q > 0, q * (xr - xn), torch.zeros((), dtype=dtype,
                                                                 device=z.device)).sum(1)
        vals[ref_start:] = cross - lse_r + lse[ref_start:]
        p[ref_start:] -= q
    p.mul_(scale[:, None])
    if t is not None:
        p.mul_(1.0 - t * t)
    z.copy_(p)
    return vals


# fp32 (R, V) temporaries of torch_row_pass: logits, probabilities, tanh, reference probabilities
torch_row_pass.temp_bytes_per_logit = 16
