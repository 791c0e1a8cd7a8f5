"""The matrix-product tile every fused encoder shares, and how its grid is split over the latents.

A fused encoder's work is (row blocks) x (column splits S) items: an item is BLOCK_M rows of x against a
contiguous range of latents, walked BLOCK_N latents at a time; each tile is `tile_xwT` (or `tile_xwT_desc`,
TMA, where x's and W's rows are 16-byte aligned), then the encoder's own epilogue. Persistent programs take
the items in `grouped_item` order, so that the resident programs share one group of row blocks of x in L2
(`split_plan`). An epilogue that keeps state across tiles (top-k) makes a split a long range of latents; one
that keeps none (the threshold encoder) has one tile per split.
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


def split_plan(op: str, B: int, n: int, device: torch.device, *, one_tile: bool = False, **shape: int) -> dict:
    """`op`'s launch config plus the column split: "cols_per_split", "S", "group_rows", "items" (row blocks x
    S) and "grid", the persistent programs (at most cfg["waves"] per SM on CUDA, cfg["programs"] in the
    interpreter) that take the items in `grouped_item` order. A group of "group_rows" row blocks of x
    (shape["D"] columns of shape["BYTES"] bytes) fits in half the L2.

    one_tile: one tile per split (S = cdiv(n, BLOCK_N)), the group of x alone in half the L2. Else the fewest
    splits whose rounds of items, each one group x every split, fit the group and a W tile per split there."""
    cfg = dict(tuning.config(op, **shape))
    row_blocks = triton.cdiv(B, cfg["BLOCK_M"])
    tiles = triton.cdiv(n, cfg["BLOCK_N"])
    # An interpreter config names its program count; a GPU config its waves of programs per SM.
    target = cfg["programs"] if "programs" in cfg else cfg["waves"] * num_sms(device)
    budget = l2_bytes(device) // 2
    if one_tile:
        cfg["cols_per_split"], cfg["S"] = cfg["BLOCK_N"], tiles
        cfg["items"] = row_blocks * tiles
        cfg["grid"] = max(1, min(cfg["items"], target))
        block_bytes = cfg["BLOCK_M"] * shape["D"] * shape["BYTES"]
        cfg["group_rows"] = max(1, min(row_blocks, budget // block_bytes))
        return cfg
    # Rounds of at most `target` items, each round one group of row blocks x every split: the fewest rounds
    # (the fewest splits) whose group of x and one W tile per split fit the budget, so that the L2 holds the
    # group's x for all of its column steps (the smallest such working set if none fits: the first that
    # fits is also the smallest so far). Round splits down: a round just over `target` items would take two.
    x_block, w_tile = (cfg[b] * shape["D"] * shape["BYTES"] for b in ("BLOCK_M", "BLOCK_N"))
    plans = []
    for rounds in range(1, row_blocks + 1):
        group = triton.cdiv(row_blocks, rounds)
        splits = max(1, min(tiles, target // group))
        plans.append((group * x_block + splits * w_tile, group, splits))
        if plans[-1][0] <= budget:
            break
    _, group, splits = min(plans)
    cfg["cols_per_split"] = triton.cdiv(tiles, splits) * cfg["BLOCK_N"]
    cfg["S"] = triton.cdiv(n, cfg["cols_per_split"])
    cfg["group_rows"] = group
    cfg["items"] = row_blocks * cfg["S"]
    cfg["grid"] = max(1, min(cfg["items"], group * cfg["S"], target))
    return cfg
