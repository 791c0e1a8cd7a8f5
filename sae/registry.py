"""The architectures: one name per SAE class. The CLI, `sae.load` / `sae.save` and the bench read this map."""

from __future__ import annotations

from .base import SAE
from .prefix import MatryoshkaSAE, OrderedSAE
from .threshold import GatedSAE, JumpReLUSAE, ReLUSAE
from .topk import BatchTopKSAE, TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {
    cls.name: cls for cls in (TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE, ReLUSAE, MatryoshkaSAE, OrderedSAE)
}


def architecture(name: str) -> type[SAE]:
    """The SAE class registered as `name`; ValueError naming the known names otherwise."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]
