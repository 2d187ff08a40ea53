"""fastunlearn: fast LLM unlearning (Yao, Xu, Liu 2023) with fused loss kernels.

Importing the package needs torch only (the loss API); the trainer, CLI, evaluation and data
formats import their extras when used (see pyproject.toml's optional dependencies).
"""
from ._source_tree import map_triton_kernels

map_triton_kernels()

# After the mapping above: the losses import fastunlearn.triton_kernels lazily.
from .losses import LossOutput, UnlearnLoss, unlearn_loss  # noqa: E402
from .optim import StochasticRoundingAdamW  # noqa: E402

__version__ = "0.1.0"  # the one place of the version: pyproject.toml reads it here
__all__ = ["LossOutput", "StochasticRoundingAdamW", "UnlearnLoss", "unlearn_loss", "__version__"]
