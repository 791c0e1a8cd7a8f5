"""SAE model classes built on the `kernels` ops, their file formats and hooks into PyTorch models."""

from .base import SAE
from .formats import load, save
from .hooks import attach
from .hub import from_pretrained
from .prefix import MatryoshkaSAE, OrderedSAE
from .threshold import GatedSAE, JumpReLUSAE, ReLUSAE
from .topk import BatchTopKSAE, TopKSAE

__all__ = [
    "SAE",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "OrderedSAE",
    "ReLUSAE",
    "TopKSAE",
    "attach",
    "from_pretrained",
    "load",
    "save",
]
