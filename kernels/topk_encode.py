"""Fused TopK encode: z = x W^T + b, f = TopK_k(ReLU(z)), without ever writing the [B, n] matrix z.

Stage 1 (Triton): (row blocks) x (column splits) work items, taken in `gemm.grouped_item` order by persistent
programs (each round shares a group of row blocks of x in L2; `gemm.split_plan`). For an item, a program walks
its column range tile by tile and computes the [BLOCK_M, BLOCK_N] tile of z with tl.dot (fp32 accumulation).
Keys are packed int64 (fp32 bits of ReLU(z) << 32 | KEY_LOW - column): a key orders by value, then by lower
latent id. Each row keeps in a per-program buffer (global memory, L2) its best KP keys (descending) and CAND
candidate slots, CAND / 4 for each of its 4 lane groups (the columns 8 g + 2 lane + e of a tile, as the wgmma
accumulator layout gives them to one thread), and in registers its threshold: the KP-th key and its value
(-inf until KP keys were seen). The epilogue of a tile:
  1. one compare per element, z > thr, summed into a bit mask of the qualifying columns per (row, lane
     group): over the columns one thread holds, so without shuffles;
  2. if some row gains an entry (one block-wide maximum), the tile is staged in a per-program scratch (L2)
     and each (row, lane group) appends its qualifying entries, lowest column first, one per trip, to its
     candidate slots: a trip costs a few instructions per row, not per element;
  3. when a lane group's slots are full, every row's candidates are sorted and merged with its kept keys
     into its best KP (bitonic, in registers), and the thresholds are re-read.
Only keys above a row's KP-th key are appended and columns are walked in ascending order, so the selection
is exact (ties to the lower id); a full lane group merges before it appends, so nothing is dropped. An
item's last merge writes its rows' best KP keys out and empties the buffer for the program's next item.
Stage 2: top-k of the splits' KP candidates per row (torch.topk on the int64 keys), sorted.
Largest temporaries: the candidates [B, splits, KP] int64, the buffers [programs, KP + CAND, BLOCK_M] and
the staging [programs, BLOCK_M, BLOCK_N] (programs: at most one round, ~ the SMs).

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
from .gemm import grouped_item, precision, split_plan, tile_xwT
from .sparse_decode import encoder_grads

MAX_FUSED_KP = 256  # larger k runs the chunked path
MAX_BLOCK_N = 128  # a lane group's qualifying columns fit one int32 mask
MERGE_KEYS = 8192  # keys a merge step holds in registers (32 per thread at 8 warps)
KEY_MAX = tl.constexpr(2**63 - 1)  # the threshold key of rows past B: nothing beats it


@triton.jit
def _pack(value, col):
    """int64 key of a non-negative fp32 value at column col: orders by value, then by lower column."""
    return (value.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - col).to(tl.uint32).to(tl.int64)


@triton.jit
def _compare_swap(x, j: tl.constexpr, L: tl.constexpr, DESCENDING: tl.constexpr):
    """Keys x [ROWS, n]: order each pair of slots 2^j apart ascending, or descending where bit L of the slot
    is set (bitonic sort level L < log2 n), or all DESCENDING (L = log2 n). One compare per pair."""
    n: tl.constexpr = x.shape[1]
    pairs = tl.reshape(x, [x.shape[0], n // (2 << j), 2, 1 << j])
    lo, hi = tl.split(tl.permute(pairs, [0, 1, 3, 2]))  # [ROWS, n / 2^(j+1), 2^j]
    swap = lo > hi
    if (1 << L) < n:  # blocks of 2^L slots alternate: descending where bit L of the slot is set
        swap = swap != ((tl.arange(0, n // (2 << j)) >> (L - j - 1)) % 2 == 1)[None, :, None]
    elif DESCENDING:
        swap = lo < hi
    out = tl.join(tl.where(swap, hi, lo), tl.where(swap, lo, hi))
    return tl.reshape(tl.permute(out, [0, 1, 3, 2]), [x.shape[0], n])


@triton.jit
def _bitonic_sort(x, LOG: tl.constexpr, DESCENDING: tl.constexpr):
    """Sort each row of the int64 keys x [ROWS, 2^LOG]."""
    for level in tl.static_range(1, LOG + 1):
        for s in tl.static_range(level):
            x = _compare_swap(x, level - 1 - s, level, DESCENDING)
    return x


@triton.jit
def _bitonic_merge(x, LOG: tl.constexpr, DESCENDING: tl.constexpr):
    """Sort each row of x [ROWS, 2^LOG], each row a bitonic sequence (LOG compare-and-swap stages)."""
    for s in tl.static_range(LOG):
        x = _compare_swap(x, LOG - 1 - s, LOG, DESCENDING)
    return x


@triton.jit
def _merge(
    buf, row_mask, prow, prow3, row3_mask, out, out_stride, rows_left, KP: tl.constexpr, CAND: tl.constexpr,
    BLOCK_M: tl.constexpr, MERGE_ROWS: tl.constexpr, SPREAD: tl.constexpr, LOG_KP: tl.constexpr,
    LOG_CAND: tl.constexpr, FLUSH: tl.constexpr,
):  # fmt: skip
    """Merge every row's candidates (slots [KP, KP + CAND), -1 where empty) into its best KP keys (slots
    [0, KP), descending) and empty the candidates (buf: [slots, BLOCK_M], row r at column prow(r)). Returns
    the KP-th keys of the rows at prow3 [1, BLOCK_M // 2, 2] (-1 while a row has fewer than KP keys, KEY_MAX
    past B) and the KP-th values of the rows at prow [BLOCK_M] (-inf, +inf).
    FLUSH (an item's last merge): the best KP keys of row r < rows_left go to out + r out_stride (KP
    consecutive keys) instead, and every slot of buf is -1 again."""
    tl.debug_barrier()  # the appends of every thread are visible
    # A row's keys are loaded as [MERGE_ROWS, SPREAD, n // SPREAD]: rows over lanes and warps, the slots over
    # SPREAD warps and the registers (the columns read in a non-contiguous order, so that the loads are not
    # vectorised along the rows), so that most sort stages stay in registers.
    r = tl.arange(0, MERGE_ROWS)
    r = (r % 2) * (MERGE_ROWS // 2) + r // 2
    for r0 in range(0, BLOCK_M, MERGE_ROWS):  # MERGE_ROWS columns at a time bound the registers
        col = r0 + r[:, None, None]  # the buffer's columns
        kept_ptrs = buf + col + _slots(0, KP, SPREAD) * BLOCK_M
        cand_ptrs = buf + col + _slots(KP, CAND, SPREAD) * BLOCK_M
        cand = _bitonic_sort(tl.reshape(tl.load(cand_ptrs), [MERGE_ROWS, CAND]), LOG_CAND, False)  # ascending
        if CAND > KP:  # the last KP of each sorted row: its best, ascending
            cand = tl.max(tl.reshape(cand, [MERGE_ROWS, CAND // KP, KP]), axis=1)
        # Kept keys descending against the best candidates ascending: the pairwise larger are the row's
        # best KP, a bitonic sequence.
        kept = tl.reshape(tl.load(kept_ptrs), [MERGE_ROWS, KP])
        best = tl.reshape(_bitonic_merge(tl.maximum(kept, cand), LOG_KP, True), [MERGE_ROWS, SPREAD, KP // SPREAD])
        if FLUSH:
            row = 2 * (col % (BLOCK_M // 2)) + col // (BLOCK_M // 2)  # the row at that column
            tl.store(out + row.to(tl.int64) * out_stride + _slots(0, KP, SPREAD), best, mask=row < rows_left)
            best = tl.full([MERGE_ROWS, SPREAD, KP // SPREAD], -1, tl.int64)
        tl.store(kept_ptrs, best)
        tl.store(cand_ptrs, tl.full([MERGE_ROWS, SPREAD, CAND // SPREAD], -1, tl.int64))
    tl.debug_barrier()
    kth = tl.load(buf + (KP - 1) * BLOCK_M + prow)
    value = tl.where(kth >= 0, (kth >> 32).to(tl.int32).to(tl.float32, bitcast=True), -float("inf"))
    kth3 = tl.load(buf + (KP - 1) * BLOCK_M + prow3)
    return tl.where(row3_mask, kth3, KEY_MAX), tl.where(row_mask, value, float("inf"))


@triton.jit
def _slots(first, n: tl.constexpr, SPREAD: tl.constexpr):
    """Slots [first, first + n) as [1, SPREAD, n // SPREAD] (slot first + (n // SPREAD) a + b at [0, a, b])."""
    return first + tl.arange(0, SPREAD)[None, :, None] * (n // SPREAD) + tl.arange(0, n // SPREAD)[None, None, :]


@triton.jit
def _by_lane(t, BLOCK_M: tl.constexpr):
    """[BLOCK_M, 4] -> [4, BLOCK_M // 2, 2], the (row, lane) entry at [lane, row % 8 + 8 (row // 16), row // 8 % 2]:
    the order in which the wgmma accumulator layout spreads them (lane and row bits 0-2 over a warp's lanes,
    the higher row bits over warps, row bit 3 in registers), which the append trips' gathers and scatters
    also get, so they need no layout conversion."""
    return tl.reshape(tl.permute(tl.reshape(t, [BLOCK_M // 16, 2, 8, 4]), [3, 0, 2, 1]), [4, BLOCK_M // 2, 2])


@triton.jit
def _stage(stage, acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store the tile acc [BLOCK_M, BLOCK_N] to stage, (row, 16 h + 8 u + 2 q + e) at offset 16 BLOCK_M h +
    8 BLOCK_M (row // 8 % 2) + 128 (row // 16) + 16 (row % 8) + 4 q + 2 u + e. The tensor is stored as
    [q, row % 8, row // 16, row // 8 % 2, h, 2 u + e], which is how the wgmma accumulator layout holds it
    (lanes, warps, registers) and how the store's coalesced layout orders it: the tile leaves its registers
    without a layout conversion, four columns per store."""
    q = tl.arange(0, 4)[:, None, None, None, None, None]
    lo = tl.arange(0, 8)[None, :, None, None, None, None]
    hi = tl.arange(0, BLOCK_M // 16)[None, None, :, None, None, None]
    r3 = tl.arange(0, 2)[None, None, None, :, None, None]
    h = tl.arange(0, BLOCK_N // 16)[None, None, None, None, :, None]
    ue = tl.arange(0, 4)[None, None, None, None, None, :]
    offs = 16 * BLOCK_M * h + 8 * BLOCK_M * r3 + 128 * hi + 16 * lo + 4 * q + ue
    t = tl.permute(tl.reshape(acc, [BLOCK_M // 16, 2, 8, BLOCK_N // 16, 2, 4, 2]), [5, 2, 0, 1, 3, 4, 6])
    tl.store(stage + offs, tl.reshape(t, [4, 8, BLOCK_M // 16, 2, BLOCK_N // 16, 4]))


@triton.jit
def _append(mask, fill, thr_key, stage, stage_row, buf, slots, col0, CHECK: tl.constexpr, BLOCK_M: tl.constexpr):
    """One append trip: each (row, lane group) [4, BLOCK_M // 2, 2] appends its lowest qualifying column of
    mask (tile column col0 + 8 g + e at bit 2 g + e) to its next candidate slot and clears its bit. CHECK:
    only if the key still beats the row's KP-th key thr_key (a merge during the tile may have raised it;
    without one, every entry of the mask beats it). Returns (mask, fill)."""
    low = mask & -mask
    has = low != 0
    pos = (((low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 255) - 127) & 31  # log2(low)
    value = tl.load(stage + (stage_row + (pos >> 2) * (16 * BLOCK_M) + (pos & 3)), mask=has)
    key = _pack(tl.maximum(value, 0.0), col0 + ((pos >> 1) << 3) + (pos & 1))
    if CHECK:
        has &= key > thr_key
    tl.store(buf + (slots + fill * BLOCK_M), key, mask=has)
    return mask ^ low, fill + has.to(tl.int32)


@triton.jit
def _popcount(v):
    """Set bits of each int32 of v."""
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return (v * 0x01010101) >> 24 & 0x3F


@triton.jit
def _max2(a, b, c, d):
    return tl.maximum(a, c), tl.maximum(b, d)


@triton.jit
def _max3(t):
    return tl.max(tl.max(tl.max(t, axis=2), axis=1), axis=0)


@triton.jit
def _topk_encode_kernel(
    x_ptr,  # [B, d]
    w_ptr,  # [n, d]
    b_ptr,  # [n] fp32
    buf_ptr,  # [programs, BUF, BLOCK_M] int64 (slot-major), filled with -1: per-program top-KP + candidates
    stage_ptr,  # [programs, BLOCK_M, BLOCK_N] fp32 scratch: the tile being appended from
    out_ptr,  # [B, S, KP] int64 out: each row's best KP keys of each split (descending)
    stats_ptr,  # [programs, 4] int32 out (COUNT only): tiles, append trips, trips of filling tiles, merges
    B,
    N,
    D,
    cols_per_split,
    group_rows,
    stride_x,
    stride_w,
    HAS_BIAS: tl.constexpr,
    EVEN_N: tl.constexpr,  # every tile of every split is whole (no column masks)
    KP: tl.constexpr,
    CAND: tl.constexpr,
    BUF: tl.constexpr,
    MERGE_ROWS: tl.constexpr,
    SPREAD: tl.constexpr,
    LOG_KP: tl.constexpr,
    LOG_CAND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    COUNT: tl.constexpr,
):
    GROUPS: tl.constexpr = BLOCK_N // 8  # 8-column groups; a mask word holds 8 of them, 2 bits each
    WORDS: tl.constexpr = (GROUPS + 7) // 8
    PER_WORD: tl.constexpr = GROUPS // WORDS
    SLOTS: tl.constexpr = CAND // 4  # candidate slots of one (row, lane group)
    row_blocks = tl.cdiv(B, BLOCK_M)
    S = tl.cdiv(N, cols_per_split)
    program = tl.program_id(0)
    buf = buf_ptr + program.to(tl.int64) * (BLOCK_M * BUF)
    stage = stage_ptr + program.to(tl.int64) * (BLOCK_M * BLOCK_N)
    tile_cols = tl.arange(0, BLOCK_N)
    # Per (row, lane group) [4, BLOCK_M // 2, 2] (see _by_lane): its staged row and its candidate slots
    # (int32 offsets from stage and buf).
    m = tl.arange(0, BLOCK_M // 2)[None, :, None]
    row3 = m % 8 + 16 * (m // 8) + 8 * tl.arange(0, 2)[None, None, :]
    # The buffer holds row r in column (r % 2) BLOCK_M / 2 + r // 2 (see _merge).
    prow3 = (row3 % 2) * (BLOCK_M // 2) + row3 // 2
    prow = (tl.arange(0, BLOCK_M) % 2) * (BLOCK_M // 2) + tl.arange(0, BLOCK_M) // 2
    lane = tl.arange(0, 4)[:, None, None]
    # The staged tile (see _stage): the offset of the (row, lane)'s first column; column 16 h + 2 lane + p
    # (p = 8 u + e, bit 4 h + 2 u + e of the mask) is 16 BLOCK_M h + 2 u + e further.
    stage_row = 8 * BLOCK_M * (row3 // 8 % 2) + 128 * (row3 // 16) + 16 * (row3 % 8) + 4 * lane
    slots = (KP + lane * SLOTS) * BLOCK_M + prow3
    # Bit 2 g + e of a group's word (g the 8-column group within the word) for a qualifying entry: summed
    # over the entries one thread holds.
    g = tl.arange(0, PER_WORD)[None, None, :, None, None]
    e = tl.arange(0, 2)[None, None, None, None, :]
    bit = 1 << (2 * g + e)
    tiles = 0
    trips = 0
    full_trips = 0
    merges = 0
    # Persistent: every num_programs-th (row block, split) item in grouped order; the buffer starts each
    # item with every slot -1.
    for item in range(program, row_blocks * S, tl.num_programs(0)):
        pid_m, pid_s = grouped_item(item, row_blocks, S, group_rows)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < B
        rows64 = rows.to(tl.int64)
        row3_mask = pid_m * BLOCK_M + row3 < B
        col_lo = pid_s * cols_per_split
        col_hi = tl.minimum(col_lo + cols_per_split, N)
        thr_key = tl.where(row3_mask, -1, KEY_MAX).to(tl.int64)  # every key qualifies until a row has KP keys
        thr = tl.where(row_mask, -float("inf"), float("inf"))
        fill = tl.zeros([4, BLOCK_M // 2, 2], dtype=tl.int32)
        for n0 in range(col_lo, col_hi, BLOCK_N):
            cols = n0 + tile_cols
            if EVEN_N:
                col_mask = tl.full([BLOCK_N], 1, tl.int1)
            else:
                col_mask = cols < col_hi
            acc = tile_xwT(
                x_ptr, w_ptr, rows64, row_mask, cols.to(tl.int64), col_mask, D, stride_x, stride_w,
                BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
            )  # fmt: skip
            if HAS_BIAS:
                if EVEN_N:
                    acc += tl.load(b_ptr + n0 + tile_cols)[None, :]
                else:
                    acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0)[None, :]
            # Columns past N (only the last tile: cols_per_split is a multiple of BLOCK_N) read z = 0 and may
            # fill a row with fewer than KP columns; their keys rank below every real one (value 0, higher ids),
            # and the splits hold at least k real keys per row, so stage 2 never selects them.
            take = tl.reshape(acc > thr[:, None], [BLOCK_M, WORDS, PER_WORD, 4, 2])
            words = tl.sum(tl.sum(tl.where(take, bit, 0), axis=4), axis=2)  # [BLOCK_M, WORDS, 4]
            if WORDS == 1:
                mask = tl.reshape(words, [BLOCK_M, 4])
            else:
                lo, hi = tl.split(tl.permute(words, [0, 2, 1]))
                mask = lo | (hi << 16)
            mask = _by_lane(mask, BLOCK_M)
            count = _popcount(mask)
            if COUNT:
                tiles += 1
            # One block-wide reduction: the most entries a lane group gains (the trips), and the fullest it gets.
            trip_count, most = tl.reduce((count, fill + count), 2, _max2)
            trip_count, most = tl.reduce((trip_count, most), 1, _max2)
            trip_count, most = tl.reduce((trip_count, most), 0, _max2)
            if trip_count > 0:  # some row gains an entry
                _stage(stage, acc, BLOCK_M, BLOCK_N)
                tl.debug_barrier()  # the staged tile is visible to every thread
                if most <= SLOTS:  # no group fills up: the common tile
                    for _ in range(trip_count):
                        mask, fill = _append(
                            mask, fill, thr_key, stage, stage_row, buf, slots, n0 + 2 * lane, False, BLOCK_M
                        )
                    if COUNT:
                        trips += trip_count
                else:
                    for _ in range(trip_count):
                        if _max3(fill) == SLOTS:
                            thr_key, thr = _merge(
                                buf, row_mask, prow, prow3, row3_mask, buf, 0, 0, KP, CAND, BLOCK_M, MERGE_ROWS,
                                SPREAD, LOG_KP, LOG_CAND, False,
                            )  # fmt: skip
                            fill = tl.zeros([4, BLOCK_M // 2, 2], dtype=tl.int32)
                            if COUNT:
                                merges += 1
                        mask, fill = _append(
                            mask, fill, thr_key, stage, stage_row, buf, slots, n0 + 2 * lane, True, BLOCK_M
                        )
                    if COUNT:
                        full_trips += trip_count
                tl.debug_barrier()  # every load of the staged tile is done before the next tile is staged
        # The item's best KP keys out, the buffer emptied for the next item.
        out = out_ptr + (pid_m * BLOCK_M).to(tl.int64) * (S * KP) + pid_s * KP
        _merge(
            buf, row_mask, prow, prow3, row3_mask, out, S * KP, B - pid_m * BLOCK_M, KP, CAND, BLOCK_M, MERGE_ROWS,
            SPREAD, LOG_KP, LOG_CAND, True,
        )  # fmt: skip
    if COUNT:
        tl.store(stats_ptr + program * 4, tiles)
        tl.store(stats_ptr + program * 4 + 1, trips)
        tl.store(stats_ptr + program * 4 + 2, full_trips)
        tl.store(stats_ptr + program * 4 + 3, merges)


def plan(B: int, n: int, d: int, k: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Tile sizes, KP (k rounded up to a power of two), the candidate slots CAND, the buffer width BUF and
    the column split."""
    KP = max(4, triton.next_power_of_2(k))
    ieee = int(precision(dtype) == "ieee")
    cfg = split_plan("topk_encode", B, n, device, KP=KP, D=d, IEEE=ieee, BYTES=dtype.itemsize)
    if not 16 <= cfg["BLOCK_N"] <= MAX_BLOCK_N or cfg["BLOCK_M"] < 16:
        raise ValueError(f"topk_encode: config needs BLOCK_M >= 16 and 16 <= BLOCK_N <= {MAX_BLOCK_N}, got {cfg}")
    CAND = max(KP, 4 * 8)  # at least 8 slots per lane group
    rows = min(cfg["BLOCK_M"], MERGE_KEYS // CAND)
    return cfg | {
        "KP": KP, "CAND": CAND, "BUF": KP + CAND, "MERGE_ROWS": rows, "LOG_KP": KP.bit_length() - 1,
        "SPREAD": max(1, 32 * cfg["num_warps"] // rows),
        "LOG_CAND": CAND.bit_length() - 1, "EVEN_N": n % cfg["BLOCK_N"] == 0,
    }  # fmt: skip


def topk_select_triton(x, W, b, k: int, stats: torch.Tensor | None = None):
    """x: [B, d], W: [n, d], b: [n] or None -> (values [B, k] x.dtype, indices [B, k] int32).
    stats: None, or an int32 tensor that receives [programs, 4] loop counts: tiles, append trips on tiles where
    no lane group fills up, append trips on the others (which check for a merge before each), merges."""
    B, D = x.shape
    N = W.shape[0]
    cfg = plan(B, N, D, k, x.device, x.dtype)
    KP, S, BM, grid = cfg["KP"], cfg["S"], cfg["BLOCK_M"], cfg["grid"]
    buf = torch.full((grid, cfg["BUF"], BM), -1, device=x.device, dtype=torch.int64)
    stage = torch.empty(grid, BM, cfg["BLOCK_N"], device=x.device, dtype=torch.float32)
    cand = torch.empty(B, S * KP, device=x.device, dtype=torch.int64)
    if stats is not None:
        stats.resize_(grid, 4)
    _topk_encode_kernel[(grid,)](
        x, W, b.float() if b is not None else W, buf, stage, cand, stats if stats is not None else buf, B, N, D,
        cfg["cols_per_split"], cfg["group_rows"], x.stride(0), W.stride(0),
        HAS_BIAS=b is not None, EVEN_N=cfg["EVEN_N"], KP=KP, CAND=cfg["CAND"], BUF=cfg["BUF"],
        MERGE_ROWS=cfg["MERGE_ROWS"], SPREAD=cfg["SPREAD"], LOG_KP=cfg["LOG_KP"], LOG_CAND=cfg["LOG_CAND"], BLOCK_M=BM,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], UPCAST=INTERPRET, PRECISION=precision(x.dtype),
        COUNT=stats is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
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
