"""Launchers of the token-stats primitive: per-token logp, logp_ref and KL, and their
recompute backward (no autograd; the unlearning loss itself runs through the chunk driver of
``fastunlearn.losses.driver``).

Rows are sorted on the device (valid rows first) and processed in chunks of ``chunk_rows``
(the caller plans them):

    1. z   = h_c W^T          input dtype, into a reused (C, V) workspace
    2. zr  = hr_c Wr^T        only for chunks with reference rows
    3. row kernel             ``unlearn_rows_fwd``: per-row nll / kl, dlogits written over z
    4. dX_c = dz W, dW (=|+=) dz^T h_c (fp32, beta = 0 on the first chunk), db += sum_rows dz

Chunks with reference rows split the workspace between policy and reference logits (C / 2
rows each). A token's logp and its KL can both carry an upstream gradient, so every row may
need both logit sets: this is why these statistics keep their own loop.

Host synchronisation: the GEMMs need the number of valid rows as a host integer:
    * ``num_valid`` given by the caller: no synchronisation;
    * ``sync=True`` (default): one ``.tolist()`` per call;
    * ``sync=False`` (or FASTUNLEARN_TRITON_SYNC=0): no synchronisation; every row goes through
      the GEMMs (ignored rows get zero gradients).
"""
from __future__ import annotations

import os

import torch

from .dw_accumulate import accumulate_dw
from .unlearn_rows import unlearn_rows_fwd

# ----------------------------------------------------------------------------- helpers

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
    chunk = max(1, min(chunk_rows, max(n_rows, 1)))
    if has_ref:
        chunk = max(2, chunk)
    block_v = _block_v_from_env()

    row_nll = torch.zeros(n_rows, device=dev, dtype=torch.float32)
    row_kl = torch.zeros(n_rows, device=dev, dtype=torch.float32)
    row_ref_nll = torch.zeros(n_rows, device=dev, dtype=torch.float32) if want_ref_nll else None
    dx_s = dw32 = db32 = None
    if write_grad:
        dx_s = torch.empty(n_rows, h_dim, device=dev, dtype=wdt)
        dw32 = torch.empty(vocab, h_dim, device=dev, dtype=torch.float32)
        if n_rows == 0:
            dw32.zero_()
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
                accumulate_dw(dw32, z, h, beta=0.0 if s == 0 else 1.0)  # 5. dW (fp32)
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
                    ref_bias=None, softcap=None, ignore_index=-100, chunk_rows=256,
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
                    ignore_index=-100, chunk_rows=256, num_valid=None, sync=None):
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
