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
    dense = torch.zeros(X.shape[0], n, dtype=coef.dtype, device=coef.device)
    dense.scatter_add_(1, indices.long(), coef)
    return dense.T @ X, dense.sum(0)
