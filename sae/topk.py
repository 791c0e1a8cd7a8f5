"""TopK SAE (Gao et al., "Scaling and evaluating sparse autoencoders"): f = TopK_k(ReLU(z))."""

from __future__ import annotations

import torch

import kernels
from kernels import SparseCode

from .base import SAE


class TopKSAE(SAE):
    """z = (x - b_dec) W_enc^T + b_enc; f = TopK_k(ReLU(z)); x_hat = f W_dec + b_dec.

    Runs the fused encoder, so no [B, d_sae] tensor is ever formed in forward or backward.
    """

    def __init__(self, d_in: int, d_sae: int, k: int, **kwargs):
        super().__init__(d_in, d_sae, **kwargs)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= d_sae:
            raise ValueError(f"k must be an int in [1, d_sae={d_sae}], got {k!r}")
        self.k = k

    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        b_dec = self.b_dec if self.apply_b_dec_to_input else None
        return kernels.topk_encode(self._rows(x), self.W_enc, self.b_enc, self.k, b_dec=b_dec)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"
