"""The matrix-product tile every fused encoder shares, and how its grid is split over the latents.

A fused encoder's grid is (row blocks) x (column splits S): each program owns BLOCK_M rows of x and a
contiguous range of latents, walks that range BLOCK_N latents at a time, and for each tile computes
`tile_xwT`, then runs its own epilogue (top-k insertion, threshold compaction).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import tuning


@triton.jit
def tile_xwT(
    x_ptr,  # [B, d]
    w_ptr,  # [n, d]
    rows64,  # [BLOCK_M] int64 row ids
    row_mask,
    cols64,  # [BLOCK_N] int64 latent ids
    col_mask,
    D,
    stride_x,
    stride_w,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] fp32 tile of x W^T (masked rows and latents read zeros)."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < D
        a = tl.load(
            x_ptr + rows64[:, None] * stride_x + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + cols64[:, None] * stride_w + kk[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0
        )
        if UPCAST:  # the interpreter computes low-precision products wrongly
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@functools.cache
def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def tf32_enabled() -> bool:
    """Whether torch lets fp32 matrix products run in TF32, read through the new API only.

    `torch.backends.cuda.matmul.fp32_precision` also reflects the legacy `allow_tf32` switch, while reading
    `allow_tf32` after the new API was set raises; "none" defers to `torch.backends.fp32_precision`.
    """
    value = torch.backends.cuda.matmul.fp32_precision
    if value == "none":
        value = torch.backends.fp32_precision
    return value == "tf32"


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 inputs, following torch's TF32 setting (others ignore it)."""
    if dtype == torch.float32 and not tf32_enabled():
        return "ieee"
    return "tf32"


def split_plan(op: str, B: int, n: int, device: torch.device, **shape: int) -> dict:
    """`op`'s launch config plus the column split: "cols_per_split" and "S", so that the grid fills the SMs
    (cfg["waves"] resident programs per SM on CUDA, cfg["programs"] in the interpreter) without spilling
    into a second, mostly idle wave."""
    cfg = dict(tuning.config(op, **shape))
    row_blocks = triton.cdiv(B, cfg["BLOCK_M"])
    tiles = triton.cdiv(n, cfg["BLOCK_N"])
    # An interpreter config names its program count; a GPU config its waves of programs per SM.
    target = cfg["programs"] if "programs" in cfg else cfg["waves"] * num_sms(device)
    # Round down: a grid just over one wave of `target` programs would take two waves.
    splits = max(1, min(tiles, target // row_blocks))
    cfg["cols_per_split"] = triton.cdiv(tiles, splits) * cfg["BLOCK_N"]
    cfg["S"] = triton.cdiv(n, cfg["cols_per_split"])
    return cfg
