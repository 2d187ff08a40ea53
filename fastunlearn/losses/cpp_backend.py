"""``cpp`` backend: the fused unlearning loss as a C++ CPU extension (csrc/unlearn_loss_cpu.cpp).

The extension is compiled just in time on first use (or on the first availability probe) and
cached on disk (see ``_build``); importing this module compiles nothing. The op is registered as
``fastunlearn::cpp_unlearn_loss`` through ``torch.library.custom_op`` with a fake implementation
and an autograd formula, so ``torch.compile`` traces through it. Gradients are computed in the
forward; the backward only scales them by grad_output.
"""
import os
from typing import Optional

import torch
from torch import Tensor

from ._build import cpu_arch_flags, extension_status, load_extension
from .registry import Backend, register_backend
from .types import IGNORE_INDEX, LossOutput, check_options, scaled_as

EXT_NAME = "fastunlearn_cpp_loss"
SOURCES = ["unlearn_loss_cpu.cpp", "adamw_sr_cpu.cpp"]
DEFAULT_WORKSPACE_MB = 192


_GEMM_CHOSEN = False


def load(build: bool = True):
    """Build (first time) and import the extension; raises ExtensionBuildError on failure.

    ``build=False`` only loads an already built extension (for cheap probes).

    On first load the GEMM engine is chosen: FASTUNLEARN_CPP_GEMM=onednn|aten forces one;
    the default ``auto`` uses oneDNN (bundled in libtorch) when it matches at::mm on a self-check.
    """
    global _GEMM_CHOSEN
    # -fno-math-errno: lets the compiler vectorise sqrt (we never read errno)
    flags = ["-O3", "-fopenmp", "-fno-math-errno", *cpu_arch_flags()]
    ext = load_extension(EXT_NAME, SOURCES, cflags=flags, ldflags=["-fopenmp"], build=build)
    if not _GEMM_CHOSEN:
        _GEMM_CHOSEN = True
        want = os.environ.get("FASTUNLEARN_CPP_GEMM", "auto")
        if want not in ("auto", "onednn", "aten"):
            raise ValueError(f"FASTUNLEARN_CPP_GEMM must be auto, onednn or aten, got {want!r}")
        engine = ext.set_gemm("aten" if want == "aten" else "onednn")
        if want == "auto" and engine == "onednn" and not _gemm_self_check(ext):
            ext.set_gemm("aten")
    return ext


def _gemm_self_check(ext) -> bool:
    """oneDNN's matmul is reached through an internal ATen symbol: check it against torch.mm
    (plain, transposed operands, accumulation) before trusting it."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 19, generator=g), torch.randn(19, 53, generator=g)
    c0 = torch.randn(37, 53, generator=g)
    try:
        cases = [
            (ext.gemm(a, b, torch.empty(37, 53), 0.0), a @ b),
            (ext.gemm(a, b.t().contiguous().t(), c0.clone(), 1.0), c0 + a @ b),
            (ext.gemm(a.t().contiguous().t(), b, c0.clone(), 1.0), c0 + a @ b),
            (ext.gemm(b.t(), a.t(), torch.empty(53, 37), 0.0), (a @ b).t()),
        ]
    except RuntimeError:
        return False
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-5) for x, y in cases)


def gemm_engine() -> str:
    """The GEMM engine the extension uses: 'onednn' or 'aten' (builds the extension)."""
    return load().gemm_engine()


def default_chunk_rows(vocab: int, workspace_mb: Optional[int] = None) -> int:
    """Rows per chunk so that the two fp32 (rows, V) logit buffers fit the workspace.

    The default (192 MiB, 512 rows at V = 49152) keeps the GEMMs efficient on CPU (measured:
    512-row chunks ~15% faster than 170-row ones) while staying far below the (BT, V) logits;
    FASTUNLEARN_WORKSPACE_MB overrides it (it is shared with the chunked backend's variable).
    """
    mb = workspace_mb or int(os.environ.get("FASTUNLEARN_WORKSPACE_MB", DEFAULT_WORKSPACE_MB))
    return max(16, (mb * 2**20) // (2 * 4 * max(vocab, 1)))


def _run(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, eps_forget,
         eps_mismatch, eps_normal, softcap, reduction_sum, ignore_index, chunk_rows, need_dx,
         need_dw):
    return tuple(load().forward_backward(
        hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, float(eps_forget),
        float(eps_mismatch), float(eps_normal), float(softcap), bool(reduction_sum),
        int(ignore_index), int(chunk_rows), bool(need_dx), bool(need_dw)))


def _fake(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, eps_forget,
          eps_mismatch, eps_normal, softcap, reduction_sum, ignore_index, chunk_rows, need_dx,
          need_dw):
    v, h = weight.shape
    f32 = torch.float32
    return (hidden.new_empty((), dtype=f32), hidden.new_empty((3,), dtype=f32),
            hidden.new_empty((3,), dtype=torch.int64),
            hidden.new_empty(hidden.shape if need_dx else (0,)),
            hidden.new_empty((v, h) if need_dw else (0,), dtype=f32),
            hidden.new_empty((v,) if bias is not None else (0,), dtype=f32))


def _setup_context(ctx, inputs, output):
    _loss, _terms, _counts, dx, dw, db = output
    ctx.save_for_backward(dx, dw, db)
    # only grad(loss) is used: do not materialise zero grads for the (V, H) / (BT, H) outputs
    ctx.set_materialize_grads(False)
    ctx.weight_dtype = inputs[1].dtype
    ctx.bias_dtype = inputs[6].dtype if inputs[6] is not None else None


def _backward(ctx, grad_loss, *_unused):
    if grad_loss is None:
        return (None,) * 17
    dx, dw, db = ctx.saved_tensors
    g = grad_loss.float()
    # an empty dx / dw means the forward skipped it (input did not require grad)
    d_hidden = dx * g.to(dx.dtype) if dx.numel() else None
    d_weight = scaled_as(dw, g, ctx.weight_dtype) if dw.numel() else None
    d_bias = scaled_as(db, g, ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return (d_hidden, d_weight, None, None, None, None, d_bias) + (None,) * 10


def register_fused_op(qualname: str, run):
    """Wrap ``run`` (the 17-argument driver of a compiled backend) as the custom op ``qualname``
    with a fake implementation and autograd (so torch.compile traces through it); on a torch
    without ``torch.library.custom_op`` a plain autograd.Function. Returns ``apply(*args)``."""
    if hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_autograd"):
        @torch.library.custom_op(qualname, mutates_args=())
        def op(hidden: Tensor, weight: Tensor, labels: Tensor, kind: Tensor,
               ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor],
               bias: Optional[Tensor], ref_bias: Optional[Tensor], eps_forget: float,
               eps_mismatch: float, eps_normal: float, softcap: float, reduction_sum: bool,
               ignore_index: int, chunk_rows: int, need_dx: bool, need_dw: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
            return run(hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias,
                       eps_forget, eps_mismatch, eps_normal, softcap, reduction_sum,
                       ignore_index, chunk_rows, need_dx, need_dw)

        op.register_fake(_fake)
        torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)
        return op

    class FusedUnlearnLossFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = run(*args)
            _setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, grad_loss, *rest):
            return _backward(ctx, grad_loss)

    return FusedUnlearnLossFunction.apply


_apply = register_fused_op("fastunlearn::cpp_unlearn_loss", _run)


def _needs_grad(hidden, weight) -> tuple[bool, bool]:
    """(need dX, need dW): a frozen head (LoRA) or frozen hidden states skip that GEMM."""
    on = torch.is_grad_enabled()
    return on and hidden.requires_grad, on and weight.requires_grad


def cpp_unlearn_loss(hidden, weight, labels, kind, ref_hidden=None, ref_weight=None, *,
                     eps_forget, eps_mismatch, eps_normal, bias=None, ref_bias=None,
                     softcap=None, reduction="mean", ignore_index=IGNORE_INDEX,
                     chunk_rows=None) -> LossOutput:
    """Fused unlearning loss on CPU (same contract as ``chunked.chunked_unlearn_loss``).

    Args:
        hidden: (BT, H) float32 / bfloat16 / float16 / float64 policy hidden states (any strides).
        weight: (V, H) head; computed in fp32, gradient returned in weight's dtype.
        labels: (BT,) int ids, ``ignore_index`` on rows that do not count.
        kind: (BT,) ints, 0 forget / 1 mismatch / 2 normal.
        ref_hidden: (BT, H) reference hidden states aligned with hidden, or None (no KL term).
        ref_weight: (V, H) reference head, None = weight (no gradient flows into it).
        bias / ref_bias: (V,) optional head biases. softcap: optional logit soft-cap c > 0.
        reduction: "mean" (each term over its own tokens) or "sum".
        chunk_rows: rows per chunk (default: :func:`default_chunk_rows`).

    Returns:
        LossOutput(backend="cpp"): differentiable ``loss`` (fp32 scalar), detached terms, int64
        counts. Sign convention: ``loss = -eps_forget*forget_nll + eps_mismatch*mismatch_nll +
        eps_normal*normal_kl``.

    Example:
        >>> out = cpp_unlearn_loss(h, W, labels, kind, ref_h, eps_forget=0.5, eps_mismatch=1.0,
        ...                        eps_normal=1.0)
        >>> out.loss.backward()
    """
    check_options(reduction, softcap, chunk_rows)
    rows = chunk_rows or default_chunk_rows(weight.shape[0] if weight.dim() == 2 else 1)
    if ref_bias is not None:
        ref_bias = ref_bias.detach()
    if ref_weight is not None:
        ref_weight = ref_weight.detach()
    if ref_hidden is not None:
        ref_hidden = ref_hidden.detach()
    loss, terms, counts, _dx, _dw, _db = _apply(
        hidden, weight, labels, kind, ref_hidden, ref_weight, bias, ref_bias, float(eps_forget),
        float(eps_mismatch), float(eps_normal), float(softcap or 0.0), reduction == "sum",
        int(ignore_index), int(rows), *_needs_grad(hidden, weight))
    terms = terms.detach()
    return LossOutput(loss, terms[0], terms[1], terms[2], counts[0], counts[1], counts[2],
                      backend="cpp")


def _availability(device_type):
    """Builds on the first probe for a CPU run (cached on disk); a device-less probe (listing the
    backends) only reports whether it is already built."""
    if device_type not in (None, "cpu"):
        return False, f"runs on cpu, not {device_type}"
    return extension_status(load, device_type, EXT_NAME)


register_backend(Backend("cpp", cpp_unlearn_loss, ("cpu",), priority=20,
                         availability=_availability,
                         description="C++ CPU extension: fused row pass, MKL GEMMs on row chunks"))
