"""SAE model classes built on the `kernels` ops."""

from .base import SAE
from .topk import TopKSAE

__all__ = ["SAE", "TopKSAE"]
