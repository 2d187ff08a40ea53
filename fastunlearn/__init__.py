"""fastunlearn: fast LLM unlearning (Yao, Xu, Liu 2023) with fused loss kernels."""
from ._source_tree import map_triton_kernels

map_triton_kernels()

from .losses import LossOutput  # noqa: E402, UnlearnLoss, unlearn_loss

__version__ = "0.1.0"
__all__ = ["LossOutput", "UnlearnLoss", "unlearn_loss", "__version__"]
