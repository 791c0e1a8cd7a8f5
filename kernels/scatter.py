"""Deterministic row scatter: the weight gradients of every sparse op, without floating-point atomics.

    dW[i]   = sum over (b, j) with indices[b, j] = i of coef[b, j] * X[b]      dW: [n, d]
    dsum[i] = sum over the same (b, j) of coef[b, j]                           dsum: [n] (bias gradients)

The (b, j) pairs are bucketed by latent (a stable sort and a CSR offset array; each pair's row of X and
coefficient are gathered into bucket order on the host, so the kernel's only dependent load is X's row).
A program owns LATENTS consecutive latents and one tile of d, and reduces each non-empty bucket BLOCK_E
pairs at a time in a fixed order, so results are bit-reproducible. Rows of latents that no pair names are
written as zeros, or left untouched (no traffic) when accumulating into an existing dW (`into`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import torch_ops, tuning, validate
from .backend import resolve


@triton.jit
def _scatter_rows_kernel(
    row_ptr,  # [P] int32: the row of X of each pair, pairs sorted by latent (stable)
    coef_ptr,  # [P] fp32: the coefficient of each sorted pair
    offsets_ptr,  # [n + 1] int64: latent i's pairs are [offsets[i], offsets[i + 1])
    x_ptr,  # [B, d]
    out_ptr,  # [n, d]
    sum_ptr,  # [n], written when WITH_SUM
    N,
    D,
    stride_x,
    stride_out,
    ACCUMULATE: tl.constexpr,  # out += the sums (rows of empty buckets untouched); else out = the sums
    WITH_SUM: tl.constexpr,
    LATENTS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    first = tl.program_id(0).to(tl.int64) * LATENTS
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    start = tl.load(offsets_ptr + first)
    if not ACCUMULATE:  # zero rows for the group's empty buckets
        group = first + tl.arange(0, LATENTS)
        in_range = group < N
        empty = in_range & (tl.load(offsets_ptr + group, in_range, 0) == tl.load(offsets_ptr + group + 1, in_range, 0))
        zeros = tl.zeros([LATENTS, BLOCK_D], dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + group[:, None] * stride_out + cols[None, :], zeros, empty[:, None] & col_mask[None, :])
        if WITH_SUM and pid_d == 0:
            tl.store(sum_ptr + group, tl.zeros([LATENTS], dtype=sum_ptr.dtype.element_ty), empty)
    lanes = tl.arange(0, BLOCK_E)
    lo = start
    for latent in range(first, tl.minimum(first + LATENTS, N)):
        hi = tl.load(offsets_ptr + latent + 1)
        if hi > lo:  # an empty bucket costs this compare
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            coef_sum = tl.zeros([BLOCK_E], dtype=tl.float32)
            for e0 in range(lo, hi, BLOCK_E):
                e = e0 + lanes
                e_mask = e < hi
                c = tl.load(coef_ptr + e, e_mask, 0.0)
                rows = tl.load(row_ptr + e, e_mask, 0).to(tl.int64)
                x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], e_mask[:, None] & col_mask[None, :], 0.0)
                acc += tl.sum(c[:, None] * x.to(tl.float32), axis=0)
                coef_sum += c
            dst = out_ptr + latent * stride_out + cols
            if ACCUMULATE:
                acc += tl.load(dst, col_mask, 0.0).to(tl.float32)
            tl.store(dst, acc.to(out_ptr.dtype.element_ty), col_mask)
            if WITH_SUM and pid_d == 0:
                tl.store(sum_ptr + latent, tl.sum(coef_sum, axis=0).to(sum_ptr.dtype.element_ty))
        lo = hi


def scatter_rows_triton(coef, indices, X, n: int, with_sum: bool, out_dtype: torch.dtype, into=None):
    """(dW [n, d] out_dtype, dsum [n] or [1]). With `into` ([n, d] out_dtype, not with with_sum) the rows are
    added to it in place, rows of empty buckets untouched (no traffic), and it is returned as dW."""
    if into is not None and (with_sum or into.shape != (n, X.shape[1]) or into.dtype != out_dtype):
        raise ValueError(f"into must be a [{n}, {X.shape[1]}] {out_dtype} tensor, without with_sum")
    K, D = coef.shape[1], X.shape[1]
    order, offsets = torch_ops.buckets(indices, n)
    rows = (order // K).to(torch.int32)
    coef = coef.reshape(-1)[order].float()
    out = torch.empty(n, D, device=X.device, dtype=out_dtype) if into is None else into
    sums = torch.empty(n if with_sum else 1, device=X.device, dtype=out_dtype)
    cfg = tuning.config("scatter_rows", D=D, BYTES=X.element_size())
    grid = (triton.cdiv(n, cfg["LATENTS"]), triton.cdiv(D, cfg["BLOCK_D"]))
    _scatter_rows_kernel[grid](
        rows, coef, offsets, X, out, sums, n, D, X.stride(0), out.stride(0), ACCUMULATE=into is not None,
        WITH_SUM=with_sum, LATENTS=cfg["LATENTS"], BLOCK_E=cfg["BLOCK_E"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
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
