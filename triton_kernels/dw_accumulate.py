"""fp32 accumulation of the head's weight gradient, dW += dz^T h, from low-precision inputs.

Shared by the ``triton`` and ``cuda`` backends (pure torch: importing it does not import Triton).
Every chunk of rows adds its dz^T h into one fp32 (V, H) buffer. The fast way lets the GEMM do
the accumulation (beta = 1, fp32 output: cuBLAS reads and writes dW once, in its epilogue);
without it a (V, H) temporary is written, read back and added, twice the memory traffic per
chunk, which shows at large vocabularies (2 GiB of fp32 dW at V = 128256, H = 4096).
"""
from __future__ import annotations

import torch

_DW_SLICE = 8192  # rows of V per slice in the fallback dW path (bounds its temporary)

_ADDMM_F32_OK: dict[str, str] = {}


def _probe_addmm_f32(device: torch.device) -> str:
    """Which way of doing fp32 += bf16^T @ bf16 works on this torch / device (cached):
    'addmm' (aten::addmm.dtype_out in place, torch >= 2.8 style), 'mm' (mm.dtype) or 'cast'
    (fp32 GEMMs on upcast slices: exact, slower; CPU and old torch)."""
    key = str(device)
    if key in _ADDMM_F32_OK:
        return _ADDMM_F32_OK[key]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 40, generator=g).to(device=device, dtype=torch.bfloat16)
    b = torch.randn(64, 24, generator=g).to(device=device, dtype=torch.bfloat16)
    c0 = torch.randn(40, 24, generator=g).to(device)
    want = c0 + a.float().T @ b.float()
    mode = "cast"
    try:
        c = c0.clone()
        torch.ops.aten.addmm.dtype_out(c, a.T, b, torch.float32, out=c)
        if torch.allclose(c, want, rtol=1e-3, atol=1e-3):
            mode = "addmm"
    except Exception:
        pass
    if mode == "cast":
        try:
            c = c0 + torch.ops.aten.mm.dtype(a.T, b, torch.float32)
            if torch.allclose(c, want, rtol=1e-3, atol=1e-3):
                mode = "mm"
        except Exception:
            pass
    _ADDMM_F32_OK[key] = mode
    return mode


def accumulate_dw(dw32: torch.Tensor, g: torch.Tensor, h: torch.Tensor, beta: float = 1.0
                  ) -> None:
    """dw32 (V, H) = beta * dw32 + g^T (V, C) @ h (C, H), accumulated in dw32's precision, with
    no (V, H) temporary in the low-precision dtype when the installed torch allows it.
    beta = 0 writes the first chunk straight into an uninitialised buffer (no zero fill)."""
    if g.dtype == dw32.dtype and h.dtype == dw32.dtype:
        dw32.addmm_(g.T, h, beta=beta)
        return
    mode = _probe_addmm_f32(dw32.device)
    if mode == "addmm":
        torch.ops.aten.addmm.dtype_out(dw32, g.T, h, torch.float32, beta=beta, out=dw32)
        return
    for v0 in range(0, dw32.shape[0], _DW_SLICE):  # bounded temporaries
        gs = g[:, v0:v0 + _DW_SLICE].T
        if mode == "mm":
            part = torch.ops.aten.mm.dtype(gs, h, torch.float32)
        else:  # no low-precision GEMM with fp32 output here: fp32 GEMM on upcast slices
            part = gs.float() @ h.float()
        if beta == 0.0:
            dw32[v0:v0 + _DW_SLICE].copy_(part)
        else:
            dw32[v0:v0 + _DW_SLICE] += part
