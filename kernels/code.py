"""The sparse code every encoder returns and every decoder takes."""

from __future__ import annotations

from typing import NamedTuple

import torch


class SparseCode(NamedTuple):
    """A batch of sparse latent vectors, K slots per row.

    values:  [B, K] activations (the input dtype).
    indices: [B, K] int32 latent ids. For TopK, K = k and slots are sorted by value, descending,
             equal values by lower latent id. For threshold activations K is a capacity: empty slots hold
             value 0 and an in-range index, and contribute exactly zero everywhere.
    """

    values: torch.Tensor
    indices: torch.Tensor

    def to_dense(self, n: int) -> torch.Tensor:
        """[B, n] dense activations (zeros outside the code); differentiable in `values`."""
        if self.indices.numel() and int(self.indices.max()) >= n:
            raise ValueError(f"n={n} is smaller than the largest latent index {int(self.indices.max())}")
        out = self.values.new_zeros(self.values.shape[0], n)
        return out.scatter_add(1, self.indices.long(), self.values)

    @property
    def k(self) -> int:
        return self.values.shape[1]
