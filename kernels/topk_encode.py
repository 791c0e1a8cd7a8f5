"""Fused TopK encode: z = x W^T + b, f = TopK_k(ReLU(z)), without ever writing the [B, n] matrix z.

Stage 1 (Triton): a grid of (row blocks) x (column splits). Each program walks its column range tile by
tile and computes the [BLOCK_M, BLOCK_N] tile of z with tl.dot (fp32 accumulation). Its epilogue costs a
compare on the common tile: each row keeps an fp32 threshold thr (its KP-th best value at the last merge,
-1 until KP entries were seen), and a tile whose row maxima all stay at or below their thr ends there.
Otherwise the entries with f > thr are appended, as packed int64 keys (fp32 bits of f << 32 | KEY_LOW -
column: a key orders by value, then by lower latent id), to the row's slots of a per-program buffer
[BLOCK_M, BUF] in global memory (L2): slots [0, KP) hold the row's best KP keys, the rest the appended
candidates. When a row's buffer could not take another tile, and at the end, every row's buffer is sorted
and cut back to its best KP, and thr is re-read from slot KP - 1. Columns are walked in ascending order,
so an entry equal to thr never beats it (ties to the lower id): the selection is exact.
Stage 2: top-k of the splits' KP candidates per row (torch.topk on the int64 keys), sorted.
Largest temporaries: the buffers [programs, BLOCK_M, BUF] and the candidates [B, splits, KP].

k above MAX_FUSED_KP takes the memory-bounded chunked path (torch_ops.topk_select_torch).
Backward: sparse and deterministic, through sparse_decode.encoder_grads (gather for x, row scatter for W, b).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import torch_ops, validate
from .backend import INTERPRET, resolve
from .code import SparseCode
from .gemm import precision, split_plan, tile_xwT
from .sparse_decode import encoder_grads

MAX_FUSED_KP = 256  # larger k runs the chunked path
SORT_ELEMENTS = 512  # keys per warp sorted at once by a merge step


@triton.jit
def _pack(value, col):
    """int64 key of a non-negative fp32 value at column col: orders by value, then by lower column."""
    return (value.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - col).to(tl.int64)


@triton.jit
def _merge(buf, row_mask, KP: tl.constexpr, BUF: tl.constexpr, BLOCK_M: tl.constexpr, MERGE_ROWS: tl.constexpr):
    """Cut each row of the program's buffer buf [BLOCK_M, BUF] back to its best KP keys (slots [0, KP),
    descending; the rest -1) and return the rows' new thresholds [BLOCK_M] (-1 while a row has fewer than
    KP keys, +inf for rows past B)."""
    tl.debug_barrier()  # the appends of every thread are visible
    slots = tl.arange(0, BUF)
    for r0 in range(0, BLOCK_M, MERGE_ROWS):  # MERGE_ROWS rows of keys at a time bound the registers
        ptrs = buf + (r0 + tl.arange(0, MERGE_ROWS))[:, None] * BUF + slots[None, :]
        keys = tl.sort(tl.load(ptrs), dim=1, descending=True)
        tl.store(ptrs, tl.where(slots[None, :] < KP, keys, -1))
    tl.debug_barrier()
    kth = tl.load(buf + tl.arange(0, BLOCK_M) * BUF + KP - 1)
    thr = tl.where(kth >= 0, (kth >> 32).to(tl.int32).to(tl.float32, bitcast=True), -1.0)
    return tl.where(row_mask, thr, float("inf"))


@triton.jit
def _topk_encode_kernel(
    x_ptr,  # [B, d]
    w_ptr,  # [n, d]
    b_ptr,  # [n]
    buf_ptr,  # [programs, BLOCK_M, BUF] int64, filled with -1: per-program top-KP + candidates, the output
    stats_ptr,  # [programs, 3] int32 out (COUNT only): tiles, tiles that appended, merges
    B,
    N,
    D,
    cols_per_split,
    stride_x,
    stride_w,
    HAS_BIAS: tl.constexpr,
    KP: tl.constexpr,
    BUF: tl.constexpr,
    MERGE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    COUNT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    program = pid_m * tl.num_programs(1) + pid_s
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    buf = buf_ptr + program.to(tl.int64) * (BLOCK_M * BUF)
    row_slot = tl.arange(0, BLOCK_M) * BUF  # [BLOCK_M] each row's first slot
    col_lo = pid_s * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, N)
    tile_cols = tl.arange(0, BLOCK_N)
    thr = tl.where(row_mask, -1.0, float("inf"))  # every entry qualifies until a row has KP keys
    fill = tl.zeros([BLOCK_M], dtype=tl.int32)  # keys in a row's slots, counted in registers (one owner)
    tiles = 0
    appended = 0
    merges = 0
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = n0 + tile_cols
        col_mask = cols < col_hi
        cols64 = cols.to(tl.int64)
        acc = tile_xwT(
            x_ptr, w_ptr, rows64, row_mask, cols64, col_mask, D, stride_x, stride_w,
            BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
        )  # fmt: skip
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        # Columns past N (only the last tile: cols_per_split is a multiple of BLOCK_N) read f = 0 and may
        # fill a row with fewer than KP columns; their keys rank below every real one (value 0, higher ids),
        # and the splits hold at least k real keys per row, so stage 2 never selects them.
        f = tl.maximum(acc, 0.0)
        if COUNT:
            tiles += 1
        if tl.max(tl.max(f, axis=1) - thr, axis=0) > 0:  # the common tile ends here
            take = f > thr[:, None]
            flags = take.to(tl.int32)
            # Qualifying entries take a row's next free slots in column order.
            slot = row_slot[:, None] + fill[:, None] + tl.cumsum(flags, axis=1) - 1
            tl.store(buf + slot, _pack(f, cols[None, :]), mask=take)
            fill += tl.sum(flags, axis=1)
            if COUNT:
                appended += 1
            if tl.max(fill, axis=0) > BUF - BLOCK_N:  # the next tile might not fit
                thr = _merge(buf, row_mask, KP, BUF, BLOCK_M, MERGE_ROWS)
                fill = tl.minimum(fill, KP)
                if COUNT:
                    merges += 1
    _merge(buf, row_mask, KP, BUF, BLOCK_M, MERGE_ROWS)
    if COUNT:
        tl.store(stats_ptr + program * 3, tiles)
        tl.store(stats_ptr + program * 3 + 1, appended)
        tl.store(stats_ptr + program * 3 + 2, merges)


def plan(B: int, n: int, d: int, k: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Tile sizes, KP (k rounded up to a power of two), the buffer width BUF and the column split."""
    KP = max(4, triton.next_power_of_2(k))
    ieee = int(precision(dtype) == "ieee")
    cfg = split_plan("topk_encode", B, n, device, KP=KP, D=d, IEEE=ieee, BYTES=dtype.itemsize)
    # Room for a tile past the KP kept keys and as many candidates again: a merge every ~KP appends per row.
    BUF = triton.next_power_of_2(2 * KP + cfg["BLOCK_N"])
    rows = SORT_ELEMENTS * cfg["num_warps"] // BUF
    return cfg | {"KP": KP, "BUF": BUF, "MERGE_ROWS": max(1, min(cfg["BLOCK_M"], rows))}


def topk_select_triton(x, W, b, k: int, stats: torch.Tensor | None = None):
    """x: [B, d], W: [n, d], b: [n] or None -> (values [B, k] x.dtype, indices [B, k] int32).
    stats: None, or an int32 tensor that receives [programs, 3] loop counts (tiles, appends, merges)."""
    B, D = x.shape
    N = W.shape[0]
    cfg = plan(B, N, D, k, x.device, x.dtype)
    KP, S, BM = cfg["KP"], cfg["S"], cfg["BLOCK_M"]
    R = triton.cdiv(B, BM)
    buf = torch.full((R * S, BM, cfg["BUF"]), -1, device=x.device, dtype=torch.int64)
    if stats is not None:
        stats.resize_(R * S, 3)
    _topk_encode_kernel[(R, S)](
        x, W, b if b is not None else W, buf, stats if stats is not None else buf, B, N, D,
        cfg["cols_per_split"], x.stride(0), W.stride(0),
        HAS_BIAS=b is not None, KP=KP, BUF=cfg["BUF"], MERGE_ROWS=cfg["MERGE_ROWS"], BLOCK_M=BM,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], UPCAST=INTERPRET, PRECISION=precision(x.dtype),
        COUNT=stats is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    cand = buf.view(R, S, BM, cfg["BUF"])[..., :KP].transpose(1, 2).reshape(R * BM, S * KP)[:B]
    keys = cand.topk(k, dim=1).values  # stage 2, sorted
    values, indices = torch_ops.unpack_keys(keys)
    return values.to(x.dtype), indices


def topk_select_cpp(x, W, b, k: int):
    """The C++ fused encoder (csrc/encode.cpp); same contract as topk_select_triton."""
    values = x.new_empty(x.shape[0], k)
    indices = x.new_empty(x.shape[0], k, dtype=torch.int32)
    torch.ops.sae_kernels_cpp.topk_select(x, W, b, k, values, indices)
    return values, indices


@torch.library.custom_op("sae_kernels::topk_select", mutates_args=())
def topk_select(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK_k(ReLU(x W^T + b)): (values [B, k], indices [B, k] int32), sorted by value, ties to lower ids."""
    x, W, b = (validate.row_major(t) for t in (x, W, b))
    backend = resolve(x)
    if backend == "triton" and max(4, triton.next_power_of_2(k)) <= MAX_FUSED_KP:
        return topk_select_triton(x, W, b, k)
    if backend == "cpp":
        return topk_select_cpp(x, W, b, k)
    return torch_ops.topk_select_torch(x, W, b, k)


@topk_select.register_fake
def _(x, W, b, k):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int32)


def _setup(ctx, inputs, output):
    x, W, b, _ = inputs
    values, indices = output
    ctx.save_for_backward(x, W, values, indices)
    ctx.has_bias = b is not None


def _backward(ctx, grad_values, _grad_indices):
    x, W, values, indices = ctx.saved_tensors
    dz = torch.where(values > 0, grad_values, 0.0)  # ReLU: slots at zero pass no gradient
    return (*encoder_grads(ctx, dz, indices, x, W), None)


topk_select.register_autograd(_backward, setup_context=_setup)


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    k: int,
    *,
    b_dec: torch.Tensor | None = None,
) -> SparseCode:
    """f = TopK_k(ReLU((x - b_dec) W_enc^T + b_enc)) as a SparseCode, without a [B, n] temporary.

    x: [B, d]; W_enc: [n, d] (latent-major); b_enc: [n] or None; b_dec: [d] or None (input centering).
    Returns values [B, k] (x.dtype) and indices [B, k] int32, sorted by value, descending, equal values by
    lower latent id. Rows with fewer than k positive pre-activations are filled with zero values at the
    lowest ids among the rest. Differentiable in x, W_enc, b_enc and b_dec.
    """
    x = validate.encoder(x, "W_enc", W_enc, [("b_enc", b_enc)], b_dec)
    validate.k_of(k, W_enc.shape[0])
    values, indices = topk_select(x, W_enc, b_enc, k)
    return SparseCode(values, indices)
