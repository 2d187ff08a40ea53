"""Launchers of the fused unlearning loss and of the token-stats primitive (no autograd).

Structure (DESIGN.md "budget arithmetic"): rows are sorted on the device by
(valid, kind) so that ignored rows sit at the end and the normal rows form one contiguous block;
valid rows are processed in chunks of ``chunk_rows``:

    1. z   = h_c W^T          cuBLAS, input dtype, into a reused (C, V) workspace
    2. zr  = hr_c Wr^T        cuBLAS, only for the chunk's rows that have a reference
    3. row kernel             ``unlearn_rows_fwd``: per-row nll / kl, dlogits written over z
    4. dX_c = dz W            cuBLAS
    5. dW  += dz^T h_c        cuBLAS accumulating into one fp32 (V, H) buffer (out_dtype=fp32
                              when the installed torch supports it, else bounded slices)
    6. db  += sum_rows dz     fp32

FLOP floor with N valid rows, N_ref reference rows: 2NHV (z) + 2NHV (dX) + 2NHV (dW)
+ 2 N_ref HV (zr). Bytes beyond the GEMMs: the row kernel's ~(3 C + 2 C_ref) V elements per
chunk (see unlearn_rows.py), and each chunk's dW GEMM reads and writes the fp32 dW (hidden in
the GEMM's epilogue when chunks are large). Workspace: one (C, V) buffer of the input dtype;
chunks without reference rows use all C rows, chunks of normal rows use C / 2 rows for the
policy logits and C / 2 for the reference logits. C is set by ``chunk_rows`` or
FASTUNLEARN_TRITON_WORKSPACE_MB (default: see default_chunk_rows).

Host synchronisation: cuBLAS needs the number of valid rows (and of rows with a reference) as
host integers. Three ways to get them, in this order:
    * ``num_rows=(n_forget, n_mismatch, n_normal)`` given by the caller (the trainer knows
      them from its host-side batch): no synchronisation at all;
    * ``sync=True`` (default): one ``.tolist()`` of a 3-element count tensor per call;
    * ``sync=False`` (or FASTUNLEARN_TRITON_SYNC=0): no synchronisation; every row goes through
      the GEMMs (ignored rows get zero gradients) and the reference GEMM runs on all rows.
Counts, means and coefficients always stay on the device.
"""
from __future__ import annotations

import os

import torch

from .dw_accumulate import accumulate_dw
from .unlearn_rows import unlearn_rows_fwd

KIND_IGNORED = 3
_MAX_CHUNK = 4096


# ----------------------------------------------------------------------------- helpers

def default_chunk_rows(vocab: int, hidden: int, elem_size: int, device_type: str) -> int:
    """Rows per chunk (the workspace holds chunk x V logits of the input dtype).

    Default: a workspace of half the fp32 dW (V x H x 2 bytes), so the forward's peak
    (dW + workspace) stays at the backward's (fp32 dW + dW in the weight dtype): chunk = 2H /
    elem_size rows, clamped to [1024, 4096] on CUDA (fewer, larger GEMMs; every chunk re-reads
    and re-writes the fp32 dW). FASTUNLEARN_TRITON_WORKSPACE_MB overrides it.
    """
    mb = os.environ.get("FASTUNLEARN_TRITON_WORKSPACE_MB")
    if mb:
        rows = (int(mb) * 2**20) // (max(vocab, 1) * elem_size)
    elif device_type == "cuda":
        rows = min(max(2 * hidden // elem_size, 1024), _MAX_CHUNK)
    else:
        rows = (64 * 2**20) // (max(vocab, 1) * elem_size)
    if rows >= 512:
        rows = rows // 256 * 256  # GEMM-friendly multiples
    return int(max(16, min(_MAX_CHUNK, rows)))


def _block_v_from_env() -> int | None:
    v = os.environ.get("FASTUNLEARN_TRITON_BLOCK_V")
    return int(v) if v else None


def _sync_default() -> bool:
    return os.environ.get("FASTUNLEARN_TRITON_SYNC", "1") not in ("0", "false", "False")


def _check_dtypes(hidden, weight):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"triton backend: {name} must be fp32, bf16 or fp16, got {t.dtype}")


# ----------------------------------------------------------------------------- chunk loop

def _segments(n_rows, chunk, has_ref, ref_start):
    """Host-side chunk list [(s, e, ref)]: rows [s, e) of the sorted order, ref = whether the
    chunk has reference rows. Chunks without a reference use the whole workspace (chunk rows);
    chunks with one split it between policy and reference logits (chunk // 2 rows each)."""
    half = max(1, chunk // 2)
    if not has_ref:
        return [(s, min(s + chunk, n_rows), False) for s in range(0, n_rows, chunk)]
    if ref_start is None:  # no-sync mode: any row may need the reference
        return [(s, min(s + half, n_rows), True) for s in range(0, n_rows, half)]
    ref_start = min(ref_start, n_rows)
    segs = [(s, min(s + chunk, ref_start), False) for s in range(0, ref_start, chunk)]
    segs += [(s, min(s + half, n_rows), True) for s in range(ref_start, n_rows, half)]
    return segs


def _chunk_loop(hidden, weight, ref_hidden, ref_weight, perm, n_rows, y_s, a_s, b_s, *,
                ref_start, ref_rowmask, bias, ref_bias, softcap, write_grad, chunk_rows,
                want_ref_nll=False):
    """Run steps 1-6 over sorted rows perm[:n_rows].

    ref_start (host int): rows perm[ref_start:n_rows] have a reference; or ref_start None and
    ref_rowmask (n_rows,) bool on the device (no-sync mode: reference GEMM on whole chunks).
    Returns row_nll, row_kl, row_ref_nll (n_rows,) fp32 and, with write_grad, dx_sorted
    (n_rows, H) in the GEMM dtype, dw32 (V, H) fp32 and db32 (V,) fp32 or None.
    """
    dev = hidden.device
    vocab, h_dim = weight.shape
    wdt = weight.dtype
    has_ref = ref_hidden is not None
    rw = (weight if ref_weight is None else ref_weight).detach()
    w = weight.detach()
    chunk = chunk_rows or default_chunk_rows(vocab, h_dim, weight.element_size(), dev.type)
    chunk = max(1, min(chunk, max(n_rows, 1)))
    if has_ref:
        chunk = max(2, chunk)
    block_v = _block_v_from_env()

    row_nll = torch.zeros(n_rows, device=dev, dtype=torch.float32)
    row_kl = torch.zeros(n_rows, device=dev, dtype=torch.float32)
    row_ref_nll = torch.zeros(n_rows, device=dev, dtype=torch.float32) if want_ref_nll else None
    dx_s = dw32 = db32 = None
    if write_grad:
        dx_s = torch.empty(n_rows, h_dim, device=dev, dtype=wdt)
        dw32 = torch.zeros(vocab, h_dim, device=dev, dtype=torch.float32)
        db32 = torch.zeros(vocab, device=dev, dtype=torch.float32) if bias is not None else None
    if n_rows == 0:
        return row_nll, row_kl, row_ref_nll, dx_s, dw32, db32

    # one (chunk, V) workspace; a separate reference buffer only if the dtypes differ
    ws = torch.empty(chunk, vocab, device=dev, dtype=wdt)
    zr_ws = (torch.empty(chunk // 2, vocab, device=dev, dtype=rw.dtype)
             if has_ref and rw.dtype != wdt else None)
    ar = torch.arange(chunk, device=dev, dtype=torch.int32)
    with torch.no_grad():
        for s, e, with_ref in _segments(n_rows, chunk, has_ref, ref_start):
            c = e - s
            rows = perm[s:e]
            h = hidden.index_select(0, rows).to(wdt)
            z = ws[:c]
            torch.mm(h, w.T, out=z)  # 1. policy logits
            zr = ref_idx = None
            if with_ref:  # 2. reference logits (every row of the chunk)
                rh = ref_hidden.index_select(0, rows).to(rw.dtype)
                zr = ws[c:2 * c] if zr_ws is None else zr_ws[:c]
                torch.mm(rh, rw.T, out=zr)
                ref_idx = ar[:c] if ref_start is not None else torch.where(
                    ref_rowmask[s:e], ar[:c], -1).to(torch.int32)
            nll, kl, ref_nll = unlearn_rows_fwd(  # 3. row statistics and dlogits in place
                z, y_s[s:e], zr, ref_idx, a_s[s:e] if a_s is not None else None,
                b_s[s:e] if b_s is not None else None, bias=bias, ref_bias=ref_bias,
                softcap=softcap, write_grad=write_grad, block_v=block_v)
            row_nll[s:e] = nll
            row_kl[s:e] = kl
            if want_ref_nll:
                row_ref_nll[s:e] = ref_nll
            if write_grad:
                torch.mm(z, w, out=dx_s[s:e])  # 4. dX
                accumulate_dw(dw32, z, h)  # 5. dW (fp32)
                if db32 is not None:
                    db32 += z.sum(0, dtype=torch.float32)  # 6. db
    return row_nll, row_kl, row_ref_nll, dx_s, dw32, db32


def _host_or_padded(counts: torch.Tensor, num_rows, sync: bool | None):
    """(host counts list or None). None means no-sync padded mode."""
    if num_rows is not None:
        return [int(n) for n in num_rows]
    if sync is None:
        sync = _sync_default()
    if sync:
        return counts.tolist()  # the one host synchronisation (documented above)
    return None


# ----------------------------------------------------------------------------- the loss

def unlearn_loss_fwd(hidden, weight, labels, kind, ref_hidden=None, ref_weight=None, *,
                     eps_forget, eps_mismatch, eps_normal, bias=None, ref_bias=None,
                     softcap=None, reduction="mean", ignore_index=-100, chunk_rows=None,
                     num_rows=None, sync=None):
    """The whole unlearning loss and its gradients for grad_output = 1.

    Args:
        hidden: (BT, H) fp32/bf16/fp16, any strides. weight: (V, H) same dtype family.
        labels: (BT,) int; kind: (BT,) int (0 forget, 1 mismatch, 2 normal).
        ref_hidden: (BT, H) or None; ref_weight: (V, H) or None (= weight).
        bias, ref_bias: (V,) or None. softcap: float or None.
        num_rows: optional host ints (n_forget, n_mismatch, n_normal) of valid rows: removes
            the host synchronisation. sync: see the module docstring.

    Returns:
        loss () fp32, terms (3,) fp32 [forget_nll, mismatch_nll, normal_kl], counts (3,) int64,
        d_hidden (BT, H) hidden dtype, d_weight (V, H) fp32, d_bias (V,) fp32 or None.
        Sign convention: loss = -eps_forget * forget + eps_mismatch * mismatch
        + eps_normal * kl (ascent on forget rows comes from the sign, in the forward).
    """
    _check_dtypes(hidden, weight)
    dev = hidden.device
    bt, h_dim = hidden.shape
    has_ref = ref_hidden is not None
    labels = labels.long()
    kind = kind.long()
    # key: 0 forget, 1 mismatch, 2 normal (with a reference), 3 ignored
    vocab = weight.shape[0]
    # labels outside [0, V) and unknown kinds count as ignored: checking them on the host
    # would synchronise, and the kernel must never read outside its row
    valid = ((labels != ignore_index) & (labels >= 0) & (labels < vocab) & (kind >= 0)
             & (kind <= (2 if has_ref else 1)))
    key = torch.where(valid, kind, KIND_IGNORED)
    counts4 = (key[None, :] == torch.arange(4, device=dev)[:, None]).sum(1)
    counts = counts4[:3]
    perm = torch.argsort(key, stable=True)
    key_s = key[perm]
    y_s = torch.where(key_s == KIND_IGNORED, 0, labels[perm])

    # built with fill_ (a kernel argument), not torch.tensor(list): an H2D copy would sync
    sign4 = torch.zeros(4, device=dev, dtype=torch.float32)
    for i, eps in enumerate((-eps_forget, eps_mismatch, eps_normal)):
        sign4[i].fill_(float(eps))
    scale4 = sign4 / counts4.clamp(min=1).float() if reduction == "mean" else sign4
    idx4 = torch.arange(4, device=dev)
    a4 = torch.where(idx4 < 2, scale4, 0.0)  # NLL coefficient: forget, mismatch
    b4 = torch.where(idx4 == 2, scale4, 0.0)  # KL coefficient: normal
    a_s, b_s = a4[key_s], b4[key_s]

    host = _host_or_padded(counts, num_rows, sync)
    if host is None:  # no sync: all rows through the GEMMs, ignored ones with zero weight
        n_rows, ref_start, ref_rowmask = bt, None, key_s == 2
    else:
        n_rows = host[0] + host[1] + (host[2] if has_ref else 0)
        ref_start, ref_rowmask = host[0] + host[1], None

    row_nll, row_kl, _, dx_s, dw32, db32 = _chunk_loop(
        hidden, weight, ref_hidden, ref_weight, perm, n_rows, y_s, a_s, b_s,
        ref_start=ref_start, ref_rowmask=ref_rowmask, bias=bias, ref_bias=ref_bias,
        softcap=softcap, write_grad=True, chunk_rows=chunk_rows)

    k = key_s[:n_rows]
    zero = torch.zeros((), device=dev, dtype=torch.float32)
    sums = torch.stack([torch.where(k == 0, row_nll, zero).sum(),
                        torch.where(k == 1, row_nll, zero).sum(),
                        torch.where(k == 2, row_kl, zero).sum()])
    terms = sums / counts.clamp(min=1).float() if reduction == "mean" else sums
    loss = (sign4[:3] * terms).sum()
    d_hidden = torch.zeros(bt, h_dim, device=dev, dtype=hidden.dtype)
    if n_rows:
        d_hidden.index_copy_(0, perm[:n_rows], dx_s.to(hidden.dtype))
    return loss, terms, counts, d_hidden, dw32, db32


# ----------------------------------------------------------------------------- token stats

def _token_plan(hidden, labels, vocab, ignore_index, num_valid, sync):
    labels = labels.long()
    valid = (labels != ignore_index) & (labels >= 0) & (labels < vocab)  # see unlearn_loss_fwd
    key = (~valid).long()
    perm = torch.argsort(key, stable=True)
    n_valid_dev = valid.sum().reshape(1)
    host = _host_or_padded(n_valid_dev, None if num_valid is None else (num_valid,), sync)
    valid_s = key[perm] == 0
    y_s = torch.where(valid_s, labels[perm], 0)
    if host is None:  # no sync: every row, the reference only on valid ones
        return perm, hidden.shape[0], y_s, valid_s, None, valid_s
    return perm, int(host[0]), y_s, valid_s, 0, None


def token_stats_fwd(hidden, weight, labels, ref_hidden=None, ref_weight=None, *, bias=None,
                    ref_bias=None, softcap=None, ignore_index=-100, chunk_rows=None,
                    num_valid=None, sync=None):
    """Per-token (logp, logp_ref, kl), each (BT,) fp32; 0 on ignored rows (and for logp_ref,
    kl without a reference). kl = KL(p_ref || p_cur). No gradients (see token_stats_bwd)."""
    _check_dtypes(hidden, weight)
    bt = hidden.shape[0]
    dev = hidden.device
    perm, n_rows, y_s, valid_s, ref_start, ref_rowmask = _token_plan(
        hidden, labels, weight.shape[0], ignore_index, num_valid, sync)
    row_nll, row_kl, row_ref_nll, *_ = _chunk_loop(
        hidden, weight, ref_hidden, ref_weight, perm, n_rows, y_s, None, None,
        ref_start=ref_start, ref_rowmask=ref_rowmask, bias=bias, ref_bias=ref_bias,
        softcap=softcap, write_grad=False, chunk_rows=chunk_rows, want_ref_nll=True)
    valid_s = valid_s[:n_rows]
    zero = torch.zeros((), device=dev, dtype=torch.float32)
    logp = torch.zeros(bt, device=dev, dtype=torch.float32)
    logp_ref = torch.zeros(bt, device=dev, dtype=torch.float32)
    kl = torch.zeros(bt, device=dev, dtype=torch.float32)
    idx = perm[:n_rows]
    logp.index_copy_(0, idx, torch.where(valid_s, -row_nll, zero))
    if ref_hidden is not None:
        logp_ref.index_copy_(0, idx, torch.where(valid_s, -row_ref_nll, zero))
        kl.index_copy_(0, idx, torch.where(valid_s, row_kl, zero))
    return logp, logp_ref, kl


def token_stats_bwd(grad_logp, grad_kl, hidden, weight, labels, ref_hidden=None,
                    ref_weight=None, *, bias=None, ref_bias=None, softcap=None,
                    ignore_index=-100, chunk_rows=None, num_valid=None, sync=None):
    """Recompute backward of token_stats_fwd for per-token upstream gradients.

    grad_logp, grad_kl: (BT,) (any float dtype) or None. Returns d_hidden (BT, H) hidden
    dtype, d_weight (V, H) fp32, d_bias (V,) fp32 or None. d logp / dz = onehot - p and
    d kl / dz = p - q, so the row kernel runs with a = -grad_logp, b = grad_kl.
    """
    _check_dtypes(hidden, weight)
    bt, h_dim = hidden.shape
    dev = hidden.device
    perm, n_rows, y_s, valid_s, ref_start, ref_rowmask = _token_plan(
        hidden, labels, weight.shape[0], ignore_index, num_valid, sync)
    gl = (torch.zeros(bt, device=dev) if grad_logp is None else grad_logp.float())[perm]
    gk = (torch.zeros(bt, device=dev) if grad_kl is None or ref_hidden is None
          else grad_kl.float())[perm]
    a_s = torch.where(valid_s, -gl, 0.0).contiguous()
    b_s = torch.where(valid_s, gk, 0.0).contiguous()
    _, _, _, dx_s, dw32, db32 = _chunk_loop(
        hidden, weight, ref_hidden, ref_weight, perm, n_rows, y_s, a_s, b_s,
        ref_start=ref_start, ref_rowmask=ref_rowmask, bias=bias, ref_bias=ref_bias,
        softcap=softcap, write_grad=True, chunk_rows=chunk_rows)
    d_hidden = torch.zeros(bt, h_dim, device=dev, dtype=hidden.dtype)
    if n_rows:
        d_hidden.index_copy_(0, perm[:n_rows], dx_s.to(hidden.dtype))
    return d_hidden, dw32, db32
