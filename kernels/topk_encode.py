"""Fused TopK encode: z = x W^T + b, f = TopK_k(ReLU(z)), without ever writing the [B, n] matrix z.

Stage 1 (Triton): a grid of (row blocks) x (column splits). Each program walks its column range tile by
tile, computes the [BLOCK_M, BLOCK_N] tile of z with tl.dot (fp32 accumulation) and keeps, per row, the
KP best entries seen so far as packed int64 keys (fp32 bits of ReLU(z) << 32 | KEY_LOW - column): a key
orders by value, then by lower latent id, so the selection is exact and deterministic. The epilogue takes
a tile's row maxima (tl.max with indices, ties to the lower column) and replaces each row's lowest key
while the maximum beats it; once the running top-KP has settled, most tiles end after one comparison.
Each program writes its KP candidates per row, so the largest temporary is [B, splits, KP].
Stage 2: top-k of the splits' candidates per row (torch.topk on the int64 keys), sorted.

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


@triton.jit
def _pack(value, col):
    """int64 key of a non-negative fp32 value at column col: orders by value, then by lower column."""
    return (value.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - col).to(tl.int64)


@triton.jit
def _topk_encode_kernel(
    x_ptr,  # [B, d]
    w_ptr,  # [n, d]
    b_ptr,  # [n]
    cand_ptr,  # [B, S, KP] int64 out
    B,
    N,
    D,
    cols_per_split,
    stride_x,
    stride_w,
    stride_cb,
    stride_cs,
    HAS_BIAS: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    col_lo = pid_s * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, N)
    tile_cols = tl.arange(0, BLOCK_N)
    # Distinct negative sentinels: below every real key, and each slot is replaced exactly once.
    best = tl.zeros([BLOCK_M, KP], dtype=tl.int64) - 1 - tl.arange(0, KP)[None, :]
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
        # Insert the tile's entries that beat a row's running KP-th key, largest first. After the first
        # tiles few entries qualify, so this loop usually runs a few times or not at all.
        f = tl.where(col_mask[None, :], tl.where(acc > 0, acc, 0.0), -1.0)  # -1: never selected
        top, arg = tl.max(f, axis=1, return_indices=True, return_indices_tie_break_left=True)
        key = _pack(top, n0 + arg)
        low = tl.min(best, axis=1)
        take = (key > low) & (top >= 0)
        while tl.max(take.to(tl.int32), axis=0) > 0:
            best = tl.where((best == low[:, None]) & take[:, None], key[:, None], best)
            f = tl.where((tile_cols[None, :] == arg[:, None]) & take[:, None], -1.0, f)
            top, arg = tl.max(f, axis=1, return_indices=True, return_indices_tie_break_left=True)
            key = _pack(top, n0 + arg)
            low = tl.min(best, axis=1)
            take = (key > low) & (top >= 0)
    out = cand_ptr + rows64[:, None] * stride_cb + pid_s * stride_cs + tl.arange(0, KP)[None, :]
    tl.store(out, best, mask=row_mask[:, None])


def plan(B: int, n: int, d: int, k: int, device: torch.device) -> dict:
    """Tile sizes, KP (k rounded up to a power of two) and the column split."""
    KP = max(4, triton.next_power_of_2(k))
    return split_plan("topk_encode", B, n, device, KP=KP, D=d) | {"KP": KP}


def topk_select_triton(x, W, b, k: int):
    """x: [B, d], W: [n, d], b: [n] or None -> (values [B, k] x.dtype, indices [B, k] int32)."""
    B, D = x.shape
    N = W.shape[0]
    cfg = plan(B, N, D, k, x.device)
    KP, S = cfg["KP"], cfg["S"]
    cand = torch.empty(B, S, KP, device=x.device, dtype=torch.int64)
    _topk_encode_kernel[(triton.cdiv(B, cfg["BLOCK_M"]), S)](
        x, W, b if b is not None else W, cand, B, N, D, cfg["cols_per_split"],
        x.stride(0), W.stride(0), cand.stride(0), cand.stride(1),
        HAS_BIAS=b is not None, KP=KP, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], UPCAST=INTERPRET, PRECISION=precision(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    keys = cand.view(B, S * KP).topk(k, dim=1).values  # stage 2, sorted
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
