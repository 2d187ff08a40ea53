"""AdamW for bf16 weights without an fp32 master copy: stochastic rounding on every store.

Why: fp32 master weights cost 16 bytes per trainable parameter (weight, gradient, two AdamW
moments). Holding all four in bf16 halves that (Llama-3.2-1B: 18.4 -> 9.2 GiB), but plain
AdamW on bf16 tensors rounds to nearest and loses every update below half a bf16 spacing
(2^-9 to 2^-8 of the weight): at the paper's lr 2e-6 the weights barely move, and the second
moment, which beta2 = 0.999 moves by 0.1 % a step, freezes. Stochastic rounding keeps each store
unbiased (E[round(x)] = x), so small updates accumulate in expectation instead of vanishing.

``StochasticRoundingAdamW`` computes torch.optim.AdamW's update in fp32 and stores the weight
and both moments back in their own dtypes, bf16 ones rounded stochastically. fp32 parameters
get exactly AdamW. One pass per tensor: a Triton kernel on CUDA (``triton_kernels/adamw_sr.py``),
a C++ loop on CPU (``csrc/adamw_sr_cpu.cpp``, in the ``cpp`` extension; same random bits); the
same math in PyTorch slices otherwise (fp32 parameters, or no compiler).

Approximation (documented in the README): a bf16 run is not bit-equal to an fp32-master run;
each stored value carries zero-mean rounding noise of at most one bf16 spacing.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

try:  # absent from torch builds without distributed support
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()

IMPLS = ("auto", "triton", "cpp", "torch")
_SLICE = 1 << 22  # elements per fp32 slice on the PyTorch path (16 MiB per temporary)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None
                             ) -> torch.Tensor:
    """fp32 ``x`` -> bf16, rounded up with probability equal to the discarded fraction.

    Example: 1 + 2^-9 (a quarter of the way from 1 to the next bf16, 1 + 2^-7) becomes 1 with
    probability 3/4 and 1 + 2^-7 with probability 1/4. Infinities stay infinite.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 takes float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device,
                          generator=generator)
    # adding below the kept 16 bits carries into them with probability = discarded fraction
    rounded = (bits + noise).bitwise_and_(-65536).view(torch.float32)
    return rounded.to(torch.bfloat16)  # exact: the low 16 bits are zero


def _store(dst: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None) -> None:
    if dst.dtype == torch.bfloat16:
        dst.copy_(stochastic_round_to_bf16(value, generator))
    else:
        dst.copy_(value)


def adamw_sr_torch(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                   exp_avg_sq: torch.Tensor, *, beta1: float, beta2: float, eps: float,
                   decay: float, step_size: float, inv_bc2_sqrt: float,
                   generator: torch.Generator | None = None) -> None:
    """The PyTorch twin of ``triton_kernels.adamw_sr.adamw_sr_fwd`` (same arguments, in place),
    one fp32 slice of at most 2^22 elements at a time."""
    flat = [t.view(-1) for t in (param, grad, exp_avg, exp_avg_sq)]
    for start in range(0, param.numel(), _SLICE):
        p, g, m, v = (t[start:start + _SLICE] for t in flat)
        g32 = g.float()
        p32 = p.float().mul_(decay)
        m32 = m.float().mul_(beta1).add_(g32, alpha=1.0 - beta1)
        v32 = v.float().mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
        denom = v32.sqrt().mul_(inv_bc2_sqrt).add_(eps)
        p32.addcdiv_(m32, denom, value=-step_size)
        _store(p, p32, generator)
        _store(m, m32, generator)
        _store(v, v32, generator)


@functools.cache
def _cpp_extension():
    """The C++ extension, or None if it cannot be built here (PyTorch ops are used then)."""
    from .losses import cpp_backend
    from .losses._build import ExtensionBuildError

    try:
        return cpp_backend.load()
    except ExtensionBuildError as exc:
        warnings.warn(f"StochasticRoundingAdamW: C++ step unavailable, using PyTorch ops "
                      f"({str(exc).splitlines()[0]})", stacklevel=3)
        return None


def _cpp_strict():
    """impl="cpp": the extension or its build error."""
    from .losses import cpp_backend

    return cpp_backend.load()


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction; torch.optim.AdamW's defaults) whose
    weights and moments may be bf16: the update is computed in fp32 and every bf16 store is
    rounded stochastically. Moments are kept in ``state_dtype`` (default: bf16 for bf16
    parameters, fp32 otherwise). ``impl``: ``auto`` (Triton kernel on CUDA, C++ on CPU for bf16
    parameters, PyTorch otherwise), ``triton`` (CPU tensors through the Triton interpreter, for
    tests), ``cpp`` or ``torch``.

        opt = StochasticRoundingAdamW(model.parameters(), lr=2e-6, weight_decay=0.0)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 state_dtype: torch.dtype | None = None, impl: str = "auto", seed: int = 0):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, "
                             f"{weight_decay})")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.state_dtype = state_dtype
        self.impl = impl
        # Host-side seeds for the kernel (no device sync); per-device generators for PyTorch.
        # Under torch.distributed every rank updates its own shard: its rounding bits must be
        # independent of the other ranks', so the rank is part of the seed.
        seed = seed + 1_000_003 * _rank()
        self._seeds = torch.Generator().manual_seed(seed)
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def rng_state(self) -> dict:
        """The state of the optimizer's own random generators (for checkpoints)."""
        return {"seeds": self._seeds.get_state(),
                "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_rng_state(self, state: dict) -> None:
        self._seeds.set_state(state["seeds"])
        for device, g_state in state["generators"].items():
            self._generator(torch.device(device)).set_state(g_state)

    def _moment_dtype(self, p: torch.Tensor) -> torch.dtype:
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.bfloat16 if p.dtype == torch.bfloat16 else torch.float32

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self._seed)
        return self._generators[device]

    def _path(self, p: torch.Tensor, exp_avg: torch.Tensor) -> str:
        """Which implementation updates ``p``: triton | cpp | torch."""
        if self.impl != "auto":
            return self.impl
        if _triton_usable(p.device):
            return "triton"
        if p.device.type == "cpu" and p.dtype == p.grad.dtype == torch.bfloat16 and \
                exp_avg.dtype in (torch.bfloat16, torch.float32) and _cpp_extension() is not None:
            return "cpp"
        return "torch"

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2) = float(group["lr"]), group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("StochasticRoundingAdamW does not support sparse "
                                       "gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    dtype = self._moment_dtype(p)
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype,
                                                        memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype,
                                                           memory_format=torch.contiguous_format)
                state["step"] += 1
                t = state["step"]
                hyper = dict(beta1=beta1, beta2=beta2, eps=group["eps"],
                             decay=1.0 - lr * group["weight_decay"],
                             step_size=lr / (1.0 - beta1 ** t),
                             inv_bc2_sqrt=1.0 / math.sqrt(1.0 - beta2 ** t))
                self._update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], hyper)
        return loss

    def _update(self, p, grad, exp_avg, exp_avg_sq, hyper) -> None:
        if isinstance(p, DTensor):  # FSDP2: this rank updates its own shard in place
            p, grad, exp_avg, exp_avg_sq = (t.to_local() for t in (p, grad, exp_avg, exp_avg_sq))
        # Every path works on contiguous tensors; a strided parameter is updated via a copy.
        target = p if p.is_contiguous() else p.contiguous()
        grad = grad.contiguous()
        path = self._path(p, exp_avg)
        if path in ("triton", "cpp"):
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self._seeds))
        if path == "triton":
            from fastunlearn.triton_kernels.adamw_sr import adamw_sr_fwd

            adamw_sr_fwd(target, grad, exp_avg, exp_avg_sq, seed=seed, **hyper)
        elif path == "cpp":
            ext = _cpp_extension() if self.impl == "auto" else _cpp_strict()
            ext.adamw_sr_step(target, grad, exp_avg, exp_avg_sq, seed=seed, **hyper)
        else:
            adamw_sr_torch(target, grad, exp_avg, exp_avg_sq,
                           generator=self._generator(p.device), **hyper)
        if target is not p:
            p.copy_(target)
