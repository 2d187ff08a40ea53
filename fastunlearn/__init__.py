"""fastunlearn: fast LLM unlearning (Yao, Xu, Liu 2023) with fused loss kernels."""
from .losses import LossOutput, UnlearnLoss, unlearn_loss

__version__ = "0.1.0"
__all__ = ["LossOutput", "UnlearnLoss", "unlearn_loss", "__version__"]
