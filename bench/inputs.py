"""Inputs: the tensors every provider of one shape shares (weights, the threshold families' parameters, x)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import SparseCode

from .shapes import Shape

CHECK_ROWS = 256  # rows of the batch each provider is checked on (spread over the batch)
BANDWIDTH = 1e-3  # JumpReLU's rectangle-kernel width (SAELens' default; inputs have ||x|| ~ sqrt(d))
SPARSITY_COEFF = 1.0  # ReLU's L1, JumpReLU's L0 and the gated L1 coefficient


class _Parameters:
    """A dataclass of nn.Parameters (and plain numbers)."""

    def tensors(self) -> list[nn.Parameter]:
        return [v for v in (getattr(self, f.name) for f in fields(self)) if isinstance(v, nn.Parameter)]

    def zero_grad(self) -> None:
        for p in self.tensors():
            p.grad = None


@dataclass
class Params(_Parameters):
    """Shared SAE weights (nn.Parameters, so every provider's module holds the very same tensors).

    W_enc, W_dec: [n, d] latent-major; b_enc: [n]; b_dec: [d].
    """

    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    k: int

    @classmethod
    def random(cls, d: int, n: int, k: int, dtype: torch.dtype, device, seed: int) -> Params:
        """Rows of W_dec near unit norm, W_enc = W_dec (the usual SAE init), small random biases."""
        g = torch.Generator(device=device).manual_seed(seed)
        kw = {"generator": g, "device": device, "dtype": dtype}
        W_dec = torch.randn(n, d, **kw).mul_(d**-0.5)
        return cls(
            W_enc=nn.Parameter(W_dec.clone()),
            b_enc=nn.Parameter(torch.randn(n, **kw).mul_(0.1)),
            W_dec=nn.Parameter(W_dec),
            b_dec=nn.Parameter(torch.randn(d, **kw).mul_(0.1)),
            k=k,
        )


@dataclass
class FamilyParams(_Parameters):
    """The threshold families' parameters beside the shared weights, set so that about k latents fire per row
    (a trained SAE's L0): q is the (1 - k/n) quantile of sample pre-activations z = (x - b_dec) W_enc^T + b_enc.

    threshold: [n] JumpReLU thresholds, all q (also BatchTopK's global inference threshold); b_relu: [n] the
    ReLU SAE's bias b_enc - q (z - q > 0 iff z > q); gated: b_gate = b_enc - q (pi_g > 0 iff z > q),
    r_mag small random, b_mag = b_enc, all [n].
    """

    threshold: nn.Parameter
    b_relu: nn.Parameter
    b_gate: nn.Parameter
    r_mag: nn.Parameter
    b_mag: nn.Parameter
    q: float

    @classmethod
    def calibrate(cls, p: Params, x: torch.Tensor, seed: int) -> FamilyParams:
        """x: [S, d] sample rows (setup, not timed)."""
        with torch.no_grad():
            z = F.linear(x - p.b_dec, p.W_enc, p.b_enc).float().reshape(-1)
            q = max(float(z.topk(x.shape[0] * p.k).values[-1]), 0.0)
            g = torch.Generator(device=x.device).manual_seed(seed + 2)
            r_mag = torch.randn(p.b_enc.shape, generator=g, device=x.device, dtype=x.dtype).mul_(0.1)
            b = p.b_enc.detach()
            par = lambda t: nn.Parameter(t.to(x.dtype).clone())
            return cls(par(torch.full_like(b, q)), par(b - q), par(b - q), par(r_mag), par(b), q)


@dataclass
class Inputs:
    """What every op of one shape shares.

    x: [B, d]; code: SparseCode [B, k] (the fused encoder's output for x, the decode ops' input);
    g_out: [B, d] (the decode backward's upstream gradient); rows: [R] the checked rows; touched: the
    number of distinct latents in `code` (rows of W a sparse op must read); fam: the threshold families'
    parameters, calibrated on the checked rows.
    """

    shape: Shape
    params: Params
    fam: FamilyParams
    x: torch.Tensor
    code: SparseCode
    g_out: torch.Tensor
    rows: torch.Tensor
    touched: int

    @classmethod
    def make(cls, shape: Shape, device, seed: int = 0) -> Inputs:
        dtype = shape.torch_dtype
        params = Params.random(shape.d, shape.n, shape.k, dtype, device, seed)
        g = torch.Generator(device=device).manual_seed(seed + 1)
        x = torch.randn(shape.B, shape.d, generator=g, device=device, dtype=dtype)
        g_out = torch.randn(shape.B, shape.d, generator=g, device=device, dtype=dtype)
        with torch.no_grad():
            code = kernels.topk_encode(x, params.W_enc, params.b_enc, shape.k, b_dec=params.b_dec)
        rows = torch.linspace(0, shape.B - 1, min(shape.B, CHECK_ROWS), device=device).round().long().unique()
        touched = int(torch.unique(code.indices).numel())
        fam = FamilyParams.calibrate(params, x[rows], seed)
        return cls(shape, params, fam, x, code, g_out, rows, touched)

    def nbytes(self) -> int:
        """Bytes of the tensors every provider of this shape shares (weights and inputs)."""
        shared = [*self.params.tensors(), *self.fam.tensors(), self.x, self.code.values, self.code.indices, self.g_out]
        return sum(t.numel() * t.element_size() for t in shared)

    def zero_grad(self) -> None:
        self.params.zero_grad()
        self.fam.zero_grad()
