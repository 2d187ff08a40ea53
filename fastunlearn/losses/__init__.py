"""Unlearning losses: the reference specification, the backends and the public API."""
from .api import UnlearnLoss, unlearn_loss
from .options import LossOptions
from .reference import token_stats_ref, unlearn_loss_ref
from .registry import (
    Backend,
    BackendUnavailableError,
    describe_backends,
    register_backend,
    resolve_backend,
)
from .types import (
    IGNORE_INDEX,
    KIND_FORGET,
    KIND_MISMATCH,
    KIND_NAMES,
    KIND_NORMAL,
    LossOutput,
)

__all__ = [
    "Backend", "BackendUnavailableError", "IGNORE_INDEX", "KIND_FORGET", "KIND_MISMATCH",
    "KIND_NAMES", "KIND_NORMAL", "LossOptions", "LossOutput", "UnlearnLoss", "describe_backends",
    "register_backend", "resolve_backend", "token_stats_ref", "unlearn_loss", "unlearn_loss_ref",
]
