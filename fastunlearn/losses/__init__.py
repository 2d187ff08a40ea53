"""Unlearning losses: the reference specification, the backends and the public API."""
from .api import UnlearnLoss, unlearn_loss
from .methods import (
    DEFAULT_BETA,
    DEFAULT_GAMMA,
    METHODS,
    idk_dpo_loss,
    method_forget_loss,
    method_forget_loss_ref,
    npo_loss,
    rmu_control_vector,
    rmu_loss,
    sequence_logprobs_ref,
    sequence_sums,
    simnpo_loss,
)
from .options import LossOptions
from .reference import token_stats_ref, unlearn_loss_ref
from .registry import (
    Backend,
    BackendUnavailableError,
    describe_backends,
    register_backend,
    resolve_backend,
)
from .token_stats import TOKEN_STATS_PATHS, token_stats
from .types import (
    IGNORE_INDEX,
    KIND_FORGET,
    KIND_MISMATCH,
    KIND_NAMES,
    KIND_NORMAL,
    LossOutput,
)

__all__ = [
    "Backend", "BackendUnavailableError", "DEFAULT_BETA", "DEFAULT_GAMMA", "IGNORE_INDEX",
    "KIND_FORGET", "KIND_MISMATCH", "KIND_NAMES", "KIND_NORMAL", "LossOptions", "LossOutput",
    "METHODS", "TOKEN_STATS_PATHS", "UnlearnLoss", "describe_backends", "idk_dpo_loss",
    "method_forget_loss", "method_forget_loss_ref", "npo_loss", "register_backend",
    "resolve_backend", "rmu_control_vector", "rmu_loss", "sequence_logprobs_ref",
    "sequence_sums", "simnpo_loss", "token_stats", "token_stats_ref", "unlearn_loss",
    "unlearn_loss_ref",
]
