"""Deterministic row scatter: the weight gradients of every sparse op, without floating-point atomics.

    dW[i]   = sum over (b, j) with indices[b, j] = i of coef[b, j] * X[b]      dW: [n, d]
    dsum[i] = sum over the same (b, j) of coef[b, j]                           dsum: [n] (bias gradients)

The (b, j) pairs are bucketed by latent (a stable sort and a CSR offset array), and each program reduces
one latent's bucket for one tile of d in a fixed order, so results are bit-reproducible. Rows of latents
that no pair names are written as zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import torch_ops, tuning, validate
from .backend import resolve


@triton.jit
def _scatter_rows_kernel(
    order_ptr,  # [B*K] int64: flat slots b*K + j, sorted by latent (stable)
    offsets_ptr,  # [n + 1] int64: bucket i is order[offsets[i]:offsets[i + 1]]
    coef_ptr,  # [B*K] contiguous
    x_ptr,  # [B, d]
    out_ptr,  # [n, d]
    sum_ptr,  # [n], written when WITH_SUM
    D,
    K,
    stride_x,
    stride_out,
    WITH_SUM: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    latent = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    start = tl.load(offsets_ptr + latent)
    end = tl.load(offsets_ptr + latent + 1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    coef_sum = tl.zeros([BLOCK_E], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_mask = e < end
        slot = tl.load(order_ptr + e, mask=e_mask, other=0)
        c = tl.load(coef_ptr + slot, mask=e_mask, other=0.0).to(tl.float32)
        row = slot // K
        x = tl.load(
            x_ptr + row[:, None] * stride_x + cols[None, :],
            mask=e_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(c[:, None] * x, axis=0)
        coef_sum += c
    tl.store(out_ptr + latent * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)
    if WITH_SUM:
        if pid_d == 0:
            tl.store(sum_ptr + latent, tl.sum(coef_sum, axis=0).to(sum_ptr.dtype.element_ty))


def scatter_rows_triton(coef, indices, X, n: int, with_sum: bool, out_dtype: torch.dtype):
    B, K = coef.shape
    D = X.shape[1]
    order, offsets = torch_ops.buckets(indices, n)
    out = torch.empty(n, D, device=X.device, dtype=out_dtype)
    sums = torch.empty(n if with_sum else 1, device=X.device, dtype=out_dtype)
    cfg = tuning.config("scatter_rows", D=D)
    grid = (n, triton.cdiv(D, cfg["BLOCK_D"]))
    _scatter_rows_kernel[grid](
        order, offsets, coef.contiguous(), X, out, sums, D, K, X.stride(0), out.stride(0),
        WITH_SUM=with_sum, BLOCK_E=cfg["BLOCK_E"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out, sums


def scatter_rows_cpp(coef, indices, X, n: int, with_sum: bool, out_dtype: torch.dtype):
    """csrc/sparse.cpp: a stable counting sort by latent, then each latent's bucket reduced in slot order."""
    dW = X.new_empty(n, X.shape[1])
    sums = X.new_empty(n if with_sum else 0, dtype=torch.float32)
    torch.ops.sae_kernels_cpp.scatter_rows(coef, indices, X, n, dW, sums)
    return dW.to(out_dtype), sums.to(out_dtype)


@torch.library.custom_op("sae_kernels::scatter_rows", mutates_args=())
def scatter_rows(
    coef: torch.Tensor, indices: torch.Tensor, X: torch.Tensor, n: int, with_sum: bool, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """coef [B, K], indices [B, K] in [0, n), X [B, d] -> (dW [n, d], dsum [n], or [0] without with_sum),
    both in out_dtype; see the module docstring."""
    X = validate.row_major(X)
    run = {"triton": scatter_rows_triton, "cpp": scatter_rows_cpp}.get(resolve(X), torch_ops.scatter_rows_torch)
    dW, dsum = run(coef, indices, X, n, with_sum, out_dtype)
    return dW, dsum if with_sum else dW.new_empty(0)


@scatter_rows.register_fake
def _(coef, indices, X, n, with_sum, out_dtype):
    return X.new_empty(n, X.shape[1], dtype=out_dtype), X.new_empty(n if with_sum else 0, dtype=out_dtype)
