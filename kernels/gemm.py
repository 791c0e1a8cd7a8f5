"""The matrix-product tile every fused encoder shares, and how its grid is split over the latents.

A fused encoder's work is (row blocks) x (column splits S): each program owns BLOCK_M rows of x and a
contiguous range of latents, walks that range BLOCK_N latents at a time, and for each tile computes
`tile_xwT`, then runs its own epilogue (top-k insertion). The (row block, split) work items are taken by
persistent programs in `grouped_item` order, so that the resident programs share one group of row blocks of x
in L2 (`split_plan`).

An encoder whose epilogue keeps no state across tiles (the threshold encoder) runs persistent programs
instead: one (row block, one-tile split) work item after another, in the grouped order of `grouped_item`,
with its tiles through `tile_xwT_desc` (TMA) where x's and W's rows are 16-byte aligned.
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


@triton.jit
def tile_xwT_desc(
    x_desc,  # [B, d] descriptor, block [BLOCK_M, BLOCK_K]
    w_desc,  # [n, d] descriptor, block [BLOCK_N, BLOCK_K]
    row0,
    col0,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """`tile_xwT` of rows [row0, row0 + BLOCK_M) and latents [col0, col0 + BLOCK_N) through TMA descriptors
    (rows, latents and d past the tensors' ends read zeros)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        a = x_desc.load([row0, k0])
        w = w_desc.load([col0, k0])
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def grouped_item(item, row_blocks, splits, group_rows):
    """(row block, column split) of work item `item` in [0, row_blocks * splits): items walk `group_rows` row
    blocks (fastest) x every split, then the next `group_rows` row blocks (the last group may be shorter). The
    programs resident at once hold consecutive items, so they share `group_rows` row blocks of x and a few
    splits' columns of W in L2."""
    per_group = group_rows * splits
    group = item // per_group
    first = group * group_rows
    size = tl.minimum(row_blocks - first, group_rows)
    rest = item - group * per_group
    return first + rest % size, rest // size


def tma_ready(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor can back a TMA descriptor: non-empty, unit column stride, 16-byte aligned base
    and row stride (else the kernels take pointer loads)."""
    return t.numel() > 0 and t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0


@functools.cache
def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


H100_L2_BYTES = 50 * 2**20


@functools.cache
def l2_bytes(device: torch.device) -> int:
    """The device's L2 size; an H100's off CUDA (the interpreter and the compile check take a GPU's order)."""
    if device.type != "cuda":
        return H100_L2_BYTES
    return torch.cuda.get_device_properties(device).L2_cache_size


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


def split_plan(op: str, B: int, n: int, device: torch.device, *, persistent: bool = False, **shape: int) -> dict:
    """`op`'s launch config plus the column split: "cols_per_split", "S", "group_rows" and "grid", for
    "items" = row blocks x S work items in `grouped_item` order, taken by "grid" persistent programs (at
    most cfg["waves"] resident programs per SM on CUDA, cfg["programs"] in the interpreter) in rounds that
    each hold one group of "group_rows" row blocks x every split, with that group of x (shape["D"] columns
    of shape["BYTES"] bytes) and a W tile per split in half the L2.

    persistent: one tile per split (S = cdiv(n, BLOCK_N)); "items" = row blocks x S work items, taken by
    "grid" programs in `grouped_item` order, whose groups of "group_rows" row blocks of x (shape["D"]
    columns of shape["BYTES"] bytes) fill at most half of the L2."""
    cfg = dict(tuning.config(op, **shape))
    row_blocks = triton.cdiv(B, cfg["BLOCK_M"])
    tiles = triton.cdiv(n, cfg["BLOCK_N"])
    # An interpreter config names its program count; a GPU config its waves of programs per SM.
    target = cfg["programs"] if "programs" in cfg else cfg["waves"] * num_sms(device)
    if persistent:
        cfg["cols_per_split"], cfg["S"] = cfg["BLOCK_N"], tiles
        cfg["items"] = row_blocks * tiles
        cfg["grid"] = max(1, min(cfg["items"], target))
        block_bytes = cfg["BLOCK_M"] * shape["D"] * shape["BYTES"]
        cfg["group_rows"] = max(1, min(row_blocks, l2_bytes(device) // 2 // block_bytes))
        return cfg
    # Rounds of at most `target` items, each round one group of row blocks x every split: the fewest rounds
    # (the fewest splits) whose group of x and one W tile per split fit half the L2, which then holds the
    # group's x for all of its column steps (the smallest such working set if none fits). Round splits
    # down: a round just over `target` items would take two.
    x_block, w_tile = (cfg[b] * shape["D"] * shape["BYTES"] for b in ("BLOCK_M", "BLOCK_N"))
    plans = []
    for rounds in range(1, row_blocks + 1):
        group = triton.cdiv(row_blocks, rounds)
        splits = max(1, min(tiles, target // group))
        plans.append((group * x_block + splits * w_tile, group, splits))
        if plans[-1][0] <= l2_bytes(device) // 2:
            break
    _, group, splits = plans[-1] if plans[-1][0] <= l2_bytes(device) // 2 else min(plans)
    cfg["cols_per_split"] = triton.cdiv(tiles, splits) * cfg["BLOCK_N"]
    cfg["S"] = triton.cdiv(n, cfg["cols_per_split"])
    cfg["group_rows"] = group
    cfg["items"] = row_blocks * cfg["S"]
    cfg["grid"] = max(1, min(cfg["items"], group * cfg["S"], target))
    return cfg
