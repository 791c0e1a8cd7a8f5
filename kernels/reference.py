"""Plain PyTorch SAE ops: the test oracle (run in float64). Slow, dense and obviously right.

Gradients come from torch.autograd through these dense formulas; `*_grads` spell them out for the
sparse backward kernels to be checked against.
"""

from __future__ import annotations

import torch

from .code import SparseCode


def preactivations(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None, b_dec=None):
    """z = (x - b_dec) W_enc^T + b_enc.  x: [B, d], W_enc: [n, d] -> [B, n]."""
    if b_dec is not None:
        x = x - b_dec
    z = x @ W_enc.T
    return z if b_enc is None else z + b_enc


def topk_indices(f: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] ids of the k largest entries per row; equal values go to the lower id (a stable sort)."""
    return torch.sort(f, dim=1, descending=True, stable=True).indices[:, :k]


def topk_encode(x, W_enc, b_enc, k: int, *, b_dec=None) -> SparseCode:
    """f = TopK_k(ReLU(z)) as a SparseCode; values differentiable in every input."""
    f = torch.relu(preactivations(x, W_enc, b_enc, b_dec))
    idx = topk_indices(f.detach(), k)
    return SparseCode(f.gather(1, idx), idx.to(torch.int32))


def sparse_decode(code: SparseCode, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """x_hat[b] = b_dec + sum_j values[b, j] * W_dec[indices[b, j]].  -> [B, d]"""
    out = torch.einsum("bk,bkd->bd", code.values, W_dec[code.indices.long()])
    return out if b_dec is None else out + b_dec


def gather_dot(g: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """[B, K]: g[b] . W[indices[b, j]] (the value gradient of a decode)."""
    return torch.einsum("bd,bkd->bk", g, W[indices.long()])


def scatter_rows(coef: torch.Tensor, indices: torch.Tensor, X: torch.Tensor, n: int):
    """dW[i] = sum over (b, j) with indices[b, j] = i of coef[b, j] * X[b]  -> ([n, d], [n] row sums)."""
    dense = SparseCode(coef, indices).to_dense(n)
    return dense.T @ X, dense.sum(0)


class _JumpReLU(torch.autograd.Function):
    """f = z * H(z - theta); df/dz = H(z - theta), df/dtheta = -(theta/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        band = ((z - theta).abs() < ctx.eps / 2).to(g.dtype)
        return g * (z > theta), (-(theta / ctx.eps) * band * g).sum(0), None


class _Step(torch.autograd.Function):
    """H(z - theta); dH/dz = 0, dH/dtheta = -(1/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        band = ((z - theta).abs() < ctx.eps / 2).to(g.dtype)
        return None, (-band * g / ctx.eps).sum(0), None


def jumprelu(x, W_enc, b_enc, threshold, bandwidth: float, *, b_dec=None):
    """Dense JumpReLU: (f [B, n], l0 [B]), straight-through threshold gradients (DESIGN section 5)."""
    z = preactivations(x, W_enc, b_enc, b_dec)
    return _JumpReLU.apply(z, threshold, bandwidth), _Step.apply(z, threshold, bandwidth).sum(1)


def jumprelu_band(x, W_enc, b_enc, threshold, bandwidth: float, *, b_dec=None) -> torch.Tensor:
    """[B, n] bool: the entries a JumpReLU code holds (z > theta, or |z - theta| < bandwidth / 2)."""
    z = preactivations(x, W_enc, b_enc, b_dec)
    return (z > threshold) | ((z - threshold).abs() < bandwidth / 2)


def relu(x, W_enc, b_enc, *, b_dec=None) -> torch.Tensor:
    """Dense ReLU SAE activations f = ReLU(z): [B, n]."""
    return torch.relu(preactivations(x, W_enc, b_enc, b_dec))


def gated(x, W_gate, b_gate, r_mag, b_mag, *, b_dec=None):
    """Dense gated encoder: (f [B, n], ReLU(pi_g) [B, n]); the Heaviside passes no gradient."""
    u = preactivations(x, W_gate, None, b_dec)
    pi_g = u + b_gate
    pi_m = torch.exp(r_mag) * u + b_mag
    return (pi_g > 0).to(u.dtype) * torch.relu(pi_m), torch.relu(pi_g)


def batch_topk(x, W_enc, b_enc, k: int, *, b_dec=None) -> torch.Tensor:
    """Dense BatchTopK [B, n]: the B*k largest entries of ReLU(z) over the batch (ties: lower row, then
    lower latent id first); zero entries are never kept."""
    f = relu(x, W_enc, b_enc, b_dec=b_dec)
    flat = f.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.sort(flat.detach(), descending=True, stable=True).indices[: f.shape[0] * k]] = True
    return torch.where(keep.view_as(f) & (f > 0), f, 0.0)


def prefix_errors(code: SparseCode, W_dec: torch.Tensor, r0: torch.Tensor) -> torch.Tensor:
    """[B, K + 1]: E[b, t] = ||r0[b] - decode of the first t slots||^2, one decode per t."""
    K = code.values.shape[1]
    cols = [r0 - sparse_decode(SparseCode(code.values[:, :t], code.indices[:, :t]), W_dec) for t in range(K + 1)]
    return torch.stack([c.pow(2).sum(-1) for c in cols], 1)


def prefix_losses(code: SparseCode, W_dec, b_dec, target, prefix_weights) -> torch.Tensor:
    """[B]: sum over prefix sizes m = 1..n of prefix_weights[m - 1] ||target - x_hat_m||^2, x_hat_m the
    decode of the latents i < m (one dense decode per prefix)."""
    n = W_dec.shape[0]
    f = code.to_dense(n)
    out = target.new_zeros(target.shape[0])
    for m in range(1, n + 1):
        if prefix_weights[m - 1] != 0:
            x_hat = f[:, :m] @ W_dec[:m] + (0 if b_dec is None else b_dec)
            out = out + prefix_weights[m - 1] * (target - x_hat).pow(2).sum(-1)
    return out
