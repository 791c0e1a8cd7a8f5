"""The sparse codes every encoder returns and every decoder takes.

Every encoder returns a SparseCode (JumpReLUCode and GatedCode are SparseCodes with one extra field), so any
encoder's output goes straight into sparse_decode, prefix_errors or `to_dense`. The classes are frozen
dataclasses registered as pytrees (torch.compile and torch.export see their tensors); read the fields by name,
they do not unpack like tuples.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.utils._pytree as pytree


@dataclasses.dataclass(frozen=True, eq=False)
class SparseCode:
    """A batch of sparse latent vectors, K slots per row.

    values:  [B, K] activations (the input dtype).
    indices: [B, K] int32 latent ids. For TopK, K = k and slots are sorted by value, descending,
             equal values by lower latent id. For threshold activations K is a capacity: empty slots hold
             value 0 and an in-range index, and contribute exactly zero everywhere.
    """

    values: torch.Tensor
    indices: torch.Tensor

    def to_dense(self, n: int) -> torch.Tensor:
        """[B, n] dense activations (zeros outside the code; repeated ids add up); differentiable in `values`.
        The one dense scatter of a code in the project."""
        if self.indices.numel() and int(self.indices.max()) >= n:
            raise ValueError(f"n={n} is smaller than the largest latent index {int(self.indices.max())}")
        out = self.values.new_zeros(self.values.shape[0], n)
        return out.scatter_add(1, self.indices.long(), self.values)

    @property
    def k(self) -> int:
        """K, the slots per row."""
        return self.values.shape[1]


@dataclasses.dataclass(frozen=True, eq=False)
class JumpReLUCode(SparseCode):
    """A JumpReLU code: values / indices [B, C] (slots by latent id) hold the active latents (z > theta) and
    the inactive ones inside the gradient band (value 0), so a loss on the code reaches the thresholds.

    l0: [B] fp32, active latents per row, differentiable in the thresholds (the L0 penalty).
    """

    l0: torch.Tensor


@dataclasses.dataclass(frozen=True, eq=False)
class GatedCode(SparseCode):
    """A gated code: values = f = ReLU(pi_m) on the slots pi_g > 0, [B, C] by latent id.

    gate: [B, C] ReLU(pi_g) on the same slots (same indices), for the L1 penalty and the auxiliary
    reconstruction: `SparseCode(code.gate, code.indices)` decodes it.
    """

    gate: torch.Tensor


for _cls in (SparseCode, JumpReLUCode, GatedCode):
    pytree.register_dataclass(_cls)
