"""The input check every backend shares: one clear ``ValueError`` line per bad input.

Row validity (labels in [0, V) or ``ignore_index``, kinds in {0, 1, 2} on counted rows) is
checked eagerly for CPU tensors. For accelerator tensors it costs a host synchronisation, so the
chunk driver folds it into the one count it reads back anyway; a backend that reads no count
(``num_rows`` given) leaves a device-side flag that is checked at the next loss call or at
:func:`raise_deferred_errors`: a bad batch is reported one call late, never silently.
"""
from __future__ import annotations

import torch

from .options import LossOptions

# Floating dtypes the loss accepts at all; a backend may declare fewer.
LOSS_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
FP16_MESSAGE = ("float16 {name} is not supported: the per-token gradient (about eps / N * p) "
                "underflows in float16; use bfloat16 or float32")


def _check_tensor(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (no data): load or materialise the weights "
                         "before computing the loss")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {device}: move every input "
                         "of the loss to one device")


def check_float(t: torch.Tensor, name: str, dtypes: tuple, backend: str) -> None:
    if t.dtype == torch.float16:
        raise ValueError(FP16_MESSAGE.format(name=name))
    if t.dtype not in LOSS_DTYPES:
        raise ValueError(f"{name} must be a float32, bfloat16 or float64 tensor, got {t.dtype}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"the {backend} backend takes {name} in {names}, got "
                         f"{str(t.dtype).replace('torch.', '')}")


def check_inputs(hidden, weight, labels, kind, ref_hidden=None, ref_weight=None, bias=None,
                 ref_bias=None, options: LossOptions | None = None, *,
                 dtypes: tuple = LOSS_DTYPES, backend: str = "reference",
                 rows_on_device: bool = False) -> None:
    """Shapes, dtypes, devices and row validity; raises ValueError with one line.

    ``rows_on_device``: the backend checks labels and kinds itself without an extra host sync
    (the chunk driver); they are then checked here only for CPU tensors."""
    options = options or LossOptions()
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (BT, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be (V, H) with H={hidden.shape[1]}, got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    bt, vocab = hidden.shape[0], weight.shape[0]
    if labels.shape != (bt,):
        raise ValueError(f"labels must be ({bt},), got shape {tuple(labels.shape)}")
    if kind.shape != (bt,):
        raise ValueError(f"kind must be ({bt},), got shape {tuple(kind.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if kind.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"kind must be an integer tensor, got {kind.dtype}")
    device = hidden.device
    named = {"hidden": hidden, "weight": weight, "labels": labels, "kind": kind,
             "ref_hidden": ref_hidden, "ref_weight": ref_weight, "bias": bias,
             "ref_bias": ref_bias}
    for name, t in named.items():
        if t is not None:
            _check_tensor(t, name, device)
    for name in ("hidden", "weight", "ref_hidden", "ref_weight", "bias", "ref_bias"):
        if named[name] is not None:
            check_float(named[name], name, dtypes, backend)
    if ref_hidden is not None and ref_hidden.shape != hidden.shape:
        raise ValueError(f"ref_hidden must be aligned with hidden {tuple(hidden.shape)}, "
                         f"got {tuple(ref_hidden.shape)}")
    if ref_weight is not None and ref_weight.shape != weight.shape:
        raise ValueError(f"reference head {tuple(ref_weight.shape)} differs from the policy head "
                         f"{tuple(weight.shape)} (vocabularies must match)")
    for name, t in (("bias", bias), ("ref_bias", ref_bias)):
        if t is not None and t.shape != (vocab,):
            raise ValueError(f"{name} must be ({vocab},), got {tuple(t.shape)}")
    if device.type == "cpu" or not rows_on_device:
        check_rows(labels, kind, vocab, options.ignore_index)


def invalid_rows(labels, kind, vocab: int, ignore_index: int) -> torch.Tensor:
    """(BT,) bool: counted rows (label != ignore_index) with a label outside [0, V) or a kind
    outside {0, 1, 2}."""
    labels = labels.long()
    kind = kind.long()
    counted = labels != ignore_index
    return counted & ((labels < 0) | (labels >= vocab) | (kind < 0) | (kind > 2))


def invalid_rows_error(n_bad, vocab: int, ignore_index: int, detail: str = "") -> ValueError:
    return ValueError(f"{n_bad} row(s) have a label outside [0, {vocab}) that is not "
                      f"ignore_index={ignore_index}, or a kind outside {{0, 1, 2}}{detail}")


def check_rows(labels, kind, vocab: int, ignore_index: int) -> None:
    """Eager row check (synchronises on an accelerator)."""
    bad = invalid_rows(labels, kind, vocab, ignore_index)
    rows = bad.nonzero().flatten()
    if rows.numel():
        r = int(rows[0])
        raise invalid_rows_error(rows.numel(), vocab, ignore_index,
                                 f" (first: row {r}, label {int(labels[r])}, kind {int(kind[r])})")


# ----------------------------------------------------------------------------- deferred flags

_PENDING: list = []


def defer_error_flag(flag: torch.Tensor, error: ValueError) -> None:
    """Keep ``flag`` (0-dim, non-zero = ``error``) for a later check without synchronising:
    a non-blocking copy to pinned host memory and an event mark when it has landed."""
    host = torch.empty((), dtype=flag.dtype, pin_memory=flag.is_cuda)
    host.copy_(flag, non_blocking=True)
    event = None
    if flag.is_cuda:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(flag.device))
    _PENDING.append((event, host, error))


def raise_deferred_errors(block: bool = False) -> None:
    """Raise the first error whose flag an earlier loss call set. Without ``block`` only flags
    that have already landed on the host are read (no synchronisation: the loss calls this on
    entry); with it, every pending flag is waited for (``LossOutput.detached`` does, as it
    synchronises anyway)."""
    while _PENDING:
        event, host, error = _PENDING[0]
        if event is not None and not event.query():
            if not block:
                return
            event.synchronize()
        _PENDING.pop(0)
        if int(host) != 0:
            _PENDING.clear()
            raise error


def flat_rows(hidden, ref_hidden, labels, ref_weight, bias, ref_bias):
    """(hidden, ref_hidden, labels, ref_bias) in the form every entry point works on: (B, T, H)
    states as (BT, H) rows, labels as (BT,), and the reference bias defaulting to the policy's
    when the reference head is the policy head."""
    if hidden.dim() == 3:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if ref_hidden is not None:
            ref_hidden = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    if ref_weight is None and ref_bias is None:
        ref_bias = bias  # the reference head is the policy head, bias included
    return hidden, ref_hidden, labels.reshape(-1), ref_bias
