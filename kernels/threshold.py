"""The fused threshold encoder shared by ReLU, JumpReLU and gated (relu.py, jumprelu.py, gated.py), without
ever writing the [B, n] pre-activations.

The GEMM is tiled like the TopK encoder's ([BLOCK_M, BLOCK_N] tiles of x W^T, fp32 tl.dot), but the
epilogue keeps no state across tiles, so the programs are persistent: one per SM, each taking every
grid-th (row block, tile) work item in `gemm.grouped_item` order (the resident programs share a group of
row blocks of x in L2), its loads through TMA descriptors where x's and W's rows are 16-byte aligned. The
epilogue keeps the entries of each tile that pass the activation's test and compacts them into a padded
code of capacity C per row: a tile reserves its rows' slots with one int32 atomic add per row, and its
entries take consecutive slots from there (a cumulative sum over the tile's mask). Entries beyond C are
counted but not stored. Afterwards each row's slots are sorted by latent id (atomics order them
arbitrarily), so the result is deterministic. If a row kept more than C entries, the op runs again with
the capacity it needs (capacity 0) or raises an error naming the row count (a fixed capacity).

    ReLU (MODE 0):      kept where z > 0;                     f = z
    JumpReLU (MODE 1):  kept where z > theta or |z - theta| < bandwidth / 2 (the gradient band);
                        f = z * H(z - theta), so band entries at or below theta are kept with value 0
    gated (MODE 2):     u = x W^T, pi_g = u + b_gate, pi_m = exp(r_mag) * u + b_mag;
                        kept where pi_g > 0;                  f = ReLU(pi_m), gate = pi_g (= ReLU(pi_g) there)

Also here: the pieces the three ops' autograd share (slot masks, per-latent sums through the row scatter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import torch_ops
from .backend import INTERPRET, resolve
from .gemm import grouped_item, precision, split_plan, tile_xwT, tile_xwT_desc, tma_ready
from .scatter import scatter_rows
from .torch_ops import GATED


@triton.jit
def _threshold_encode_kernel(
    x_ptr,  # [B, d], or its TMA descriptor (TMA)
    w_ptr,  # [n, d], or its TMA descriptor (TMA)
    b_ptr,  # [n]: b_enc, or b_gate
    theta_ptr,  # [n] JumpReLU threshold
    r_ptr,  # [n] gated r_mag
    b2_ptr,  # [n] gated b_mag
    val_ptr,  # [B, C] out: f
    gate_ptr,  # [B, C] out: pi_g (gated only)
    aux_ptr,  # [B, C] fp32 out: z, or pi_m (gated)
    idx_ptr,  # [B, C] int32 out
    count_ptr,  # [B] int32, zeroed: kept entries per row, also those beyond C
    B,
    N,
    D,
    C,
    group_rows,
    stride_x,
    stride_w,
    half_band,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TMA: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE: tl.constexpr,  # B * C >= 2^31: int64 slot offsets
):
    row_blocks = tl.cdiv(B, BLOCK_M)
    tiles = tl.cdiv(N, BLOCK_N)
    # Persistent: each program takes every num_programs-th tile in grouped order. One loop over tiles around
    # the d loop, flattened, so the next tile's loads can issue during this tile's epilogue (not gated: its
    # epilogue holds a tile more, and the flattened loop's registers would spill).
    for item in tl.range(tl.program_id(0), row_blocks * tiles, tl.num_programs(0), flatten=MODE != 2):
        pid_m, pid_n = grouped_item(item, row_blocks, tiles, group_rows)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < B
        rows64 = rows.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        if TMA:
            acc = tile_xwT_desc(
                x_ptr, w_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, D, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION
            )
        else:
            acc = tile_xwT(
                x_ptr, w_ptr, rows64, row_mask, cols.to(tl.int64), col_mask, D, stride_x, stride_w,
                BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
            )  # fmt: skip
        if MODE == 2:  # gated: pi_m from u = acc first, so acc dies as the bias makes it pi_g (no spill)
            scale = tl.exp(tl.load(r_ptr + cols, mask=col_mask, other=0.0).to(tl.float32))
            shift = tl.load(b2_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            aux = scale[None, :] * acc + shift[None, :]
        z = acc
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if MODE == 0:  # ReLU
            keep = z > 0
            f = z
            aux = z
        elif MODE == 1:  # JumpReLU
            th = tl.load(theta_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            active = z > th
            keep = active | (tl.abs(z - th) < half_band)
            f = tl.where(active, z, 0.0)
            aux = z
        else:  # gated: z is pi_g
            keep = z > 0
        keep = keep & row_mask[:, None] & col_mask[None, :]
        flags = keep.to(tl.int32)
        cnt = tl.sum(flags, axis=1)
        # No branch around the empty tile (a sparse code's tile keeps a few entries; the loop stays flat).
        base = tl.atomic_add(count_ptr + rows, cnt, mask=row_mask & (cnt > 0), sem="relaxed")  # acq_rel: a fence
        pos = base[:, None] + tl.cumsum(flags, axis=1) - 1
        store = keep & (pos < C)
        if WIDE:
            off = rows64[:, None] * C + pos
        else:  # int32 offsets: half the registers of [BLOCK_M, BLOCK_N] int64 ones
            off = rows[:, None] * C + pos
        if MODE != 2:  # gated: the launcher takes f = ReLU(pi_m) from aux (a store and a tile fewer)
            tl.store(val_ptr + off, f.to(val_ptr.dtype.element_ty), mask=store)
        tl.store(aux_ptr + off, aux, mask=store)
        tl.store(idx_ptr + off, tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_N)), mask=store)
        if MODE == 2:
            tl.store(gate_ptr + off, z.to(gate_ptr.dtype.element_ty), mask=store)


def threshold_select_triton(mode: int, x, W, b, theta, r_mag, b_mag, half_band: float, capacity: int):
    """The fused kernel with capacity C = `capacity`, then a sort of each row's slots by latent id.
    Same contract as torch_ops.threshold_select_torch: (values [B, C], gate [B, C] or None, aux [B, C] fp32,
    indices [B, C] int32, counts [B] int32, also the entries beyond C)."""
    B, D = x.shape
    N = W.shape[0]
    ieee = int(precision(x.dtype) == "ieee")
    shape = {"D": D, "IEEE": ieee, "BYTES": x.element_size()}
    cfg = split_plan("threshold_encode", B, N, x.device, one_tile=True, **shape)
    values = torch.empty(B, capacity, device=x.device, dtype=x.dtype)
    gate = torch.empty_like(values) if mode == GATED else values
    aux = torch.empty(B, capacity, device=x.device, dtype=torch.float32)
    indices = torch.empty(B, capacity, device=x.device, dtype=torch.int32)
    counts = torch.zeros(B, device=x.device, dtype=torch.int32)
    dummy = W
    # TMA where rows are aligned and the product is on wgmma (the IEEE FMA product reads shared memory with
    # ordinary loads: behind TMA that costs a memory fence per step), except gated (its loop is not flattened,
    # and an unflattened TMA pipeline fences per tile)
    tma = mode != GATED and not ieee and tma_ready(x) and tma_ready(W)
    if tma:  # host-side descriptors: kernel parameters, nothing for the kernel to build or allocate
        xs = TensorDescriptor.from_tensor(x, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
        ws = TensorDescriptor.from_tensor(W, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    else:
        xs, ws = x, W
    _threshold_encode_kernel[(cfg["grid"],)](
        xs, ws, b if b is not None else dummy, theta if theta is not None else dummy,
        r_mag if r_mag is not None else dummy, b_mag if b_mag is not None else dummy,
        values, gate, aux, indices, counts, B, N, D, capacity, cfg["group_rows"],
        x.stride(0), W.stride(0), half_band,
        MODE=mode, HAS_BIAS=b is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], TMA=tma, UPCAST=INTERPRET, PRECISION=precision(x.dtype),
        WIDE=B * capacity >= 2**31, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    if mode == GATED:
        values = aux.clamp_min(0).to(x.dtype)
    filled = torch.arange(capacity, device=x.device) < counts[:, None]
    ids, perm = torch.where(filled, indices, N).sort(dim=1)  # empty slots (key N) go to the end
    filled = ids < N
    tidy = lambda t: torch.where(filled, t.gather(1, perm), 0)
    gate = tidy(gate) if mode == GATED else None
    return tidy(values), gate, tidy(aux), torch.where(filled, ids, 0).to(torch.int32), counts


def threshold_select_cpp(mode: int, x, W, b, theta, r_mag, b_mag, half_band: float, capacity: int):
    """The C++ fused encoder (csrc/encode.cpp), already in latent order; same contract as the Triton launcher."""
    B = x.shape[0]
    values = x.new_empty(B, capacity)
    gate = x.new_empty(B, capacity) if mode == GATED else None
    aux = x.new_empty(B, capacity, dtype=torch.float32)
    indices = x.new_empty(B, capacity, dtype=torch.int32)
    counts = x.new_empty(B, dtype=torch.int32)
    args = (mode, x, W, b, theta, r_mag, b_mag, half_band, values, gate, aux, indices, counts)
    torch.ops.sae_kernels_cpp.threshold_select(*args)
    return values, gate, aux, indices, counts


def threshold_select(
    mode: int, x, W, b, theta, r_mag, b_mag, half_band: float, capacity: int, guess: int, dense_above=None
):
    """The kept entries of each row by latent id, on the backend `x` resolves to.

    capacity > 0: C = capacity, a ValueError when a row keeps more. capacity 0: C = the largest row's count
    (at least 1), whatever the first capacity tried, `guess`, was (a wrong guess costs a second pass).
    -> (values, gate or None, aux, indices [B, C] int32, counts [B] int32), or None when capacity is 0 and
    a row keeps more than `dense_above` entries (the caller then runs densely).
    """
    args = (mode, x, W, b, theta, r_mag, b_mag, half_band)
    run = {"triton": threshold_select_triton, "cpp": threshold_select_cpp}.get(
        resolve(x), torch_ops.threshold_select_torch
    )
    C = capacity or max(1, min(W.shape[0], guess))
    out = run(*args, C)
    need = int(out[-1].max()) if x.shape[0] else 0
    if capacity:
        if need > capacity:
            raise ValueError(
                f"a row has {need} active latents, more than capacity={capacity}: "
                "raise the capacity, or pass capacity=None to grow it"
            )
        return out
    if dense_above is not None and need > dense_above:
        return None
    if need > C:
        return run(*args, need)
    return tuple(t if t is None or t.dim() == 1 else t[:, : max(need, 1)].contiguous() for t in out)


def observe(hints, counts: torch.Tensor, capacity) -> int | None:
    """After a call that chose its capacity: the next guess from its largest row count, which it returns.
    Nothing (None) for a fixed capacity or while torch.compile traces (no host sync there)."""
    if capacity is not None or not counts.numel() or torch.compiler.is_compiling():
        return None
    need = int(counts.max())
    hints.observe_capacity(need)
    return need


def filled(counts: torch.Tensor, K: int) -> torch.Tensor:
    """[B, K] bool: the slots that hold an entry."""
    return torch.arange(K, device=counts.device) < counts[:, None]


def dynamic_capacity(capacity: int):
    """C of a fake output: the fixed capacity, or an unbacked size when the op chooses it."""
    return capacity or torch.library.get_ctx().new_dynamic_size()


def latent_sums(cols: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """cols [B, K, m] -> [n, m] fp32: per latent, the sum over the slots naming it (deterministic)."""
    m = cols.shape[-1]
    flat = cols.reshape(-1, m).float().contiguous()
    ones = flat.new_ones(flat.shape[0], 1)
    sums, _ = scatter_rows(ones, indices.reshape(-1, 1), flat, n, False, torch.float32)
    return sums
