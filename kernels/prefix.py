"""Prefix reconstruction errors (Matryoshka and Ordered SAEs) from cumulative sums, O(K d) per token.

With a row's slots sorted by latent id (i_0 < i_1 < ... ), the reconstruction from the latents below any
prefix size m is a partial sum of its slots, so every prefix error is one of K + 1 values:

    r_t = r0 - sum_{j < t} v_j W[i_j],   E[b, t] = ||r_t||^2        t = 0..K,  r0 = y - b_dec

and a weighted loss over prefix sizes is sum_t omega_t E_t, omega_t the weight of the prefix sizes m with
i_{t-1} < m <= i_t (prefix_losses). Never one decode per prefix.

prefix_norms (a custom op on tensors) computes E; its launchers are prefix_norms_triton / _torch (torch_ops),
and prefix_errors / prefix_losses are the public ops on SparseCodes.

Kernel: a one-warp program per (row, split of d) walks its tiles of d; per tile it gathers all the row's
slots at once as one [SLOTS, BLOCK_D] tile (SLOTS = next_pow2(K); no per-slot round trip) and takes
u_j = v_j W[i_j], r_{j+1} = r0 - C_{j+1} with C_{j+1} = sum_{l <= j} u_l one tl.cumsum along the slots.
The squared norms accumulate over its tiles in registers; partial sums [B, splits, K + 1] are added up
afterwards (a fixed order: deterministic). Backward, with G = dL/dE and S_j = sum_{t > j} G_t r_t:
    dv_j = -2 W[i_j] . S_j,   dr0 = 2 sum_t G_t r_t,   dW[i_j] += -2 v_j S_j
on the same tile: S is a reverse tl.cumsum of G_{j+1} r_{j+1}, one gather of W per tile. K > SLOTS_MAX runs
in chunks of slots (the forward carries r between chunks; the backward walks them from the last, carrying
S, each chunk's r0 from a forward pass over the earlier ones). dW goes through the deterministic row
scatter with the S_j rows as its inputs, in row chunks of bounded size; on Triton each row chunk adds to
the rows of dW it names in place (kernels/scatter.py, `into`), the others untouched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import torch_ops, tuning, validate
from .backend import resolve
from .code import SparseCode
from .scatter import scatter_rows, scatter_rows_triton

BUDGET = 1 << 24  # elements of the backward's [rows, K, d] temporary S
CUDA_BUDGET = 1 << 28  # 1 GiB of fp32 S on a GPU: at B = 8192, k = 64, d = 4096, 8 row chunks


@triton.jit
def _residuals(r0_ptr, w_ptr, row, stride_r, stride_w, v, i, live, d0, D, BLOCK_D: tl.constexpr):
    """The [BLOCK_D] tile of d from column d0 of a row whose slots hold values v and ids i [SLOTS]: (cols,
    col_mask, r0 [BLOCK_D], W[i] [SLOTS, BLOCK_D] fp32, the residuals r_{j+1} = r0 - sum_{t <= j} v_t W[i_t])."""
    cols = d0 + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    r0 = tl.load(r0_ptr + row * stride_r + cols, col_mask, 0.0).to(tl.float32)
    w = tl.load(w_ptr + i[:, None] * stride_w + cols[None, :], live[:, None] & col_mask[None, :], 0.0)
    w = w.to(tl.float32)
    return cols, col_mask, r0, w, r0[None, :] - tl.cumsum(v[:, None] * w, axis=0)


@triton.jit
def _prefix_fwd_kernel(
    val_ptr,  # [B, K]
    idx_ptr,  # [B, K] int32
    w_ptr,  # [n, d]
    r0_ptr,  # [B, d]
    out_ptr,  # [B, SPLITS, K + 1] fp32: partial ||r_t||^2 of split s
    rest_ptr,  # [B, d] fp32 out: r_K (when WRITE_REST)
    K,
    D,
    stride_v,
    stride_i,
    stride_w,
    stride_r,
    stride_ob,
    stride_os,
    stride_rest,
    WRITE_REST: tl.constexpr,
    SLOTS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    slots = tl.arange(0, SLOTS)
    live = slots < K
    v = tl.load(val_ptr + row * stride_v + slots, live, 0.0).to(tl.float32)
    i = tl.load(idx_ptr + row * stride_i + slots, live, 0).to(tl.int64)
    e = tl.zeros([SLOTS], dtype=tl.float32)
    e0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(split * BLOCK_D, D, tl.num_programs(1) * BLOCK_D):  # this split's tiles of d
        cols, col_mask, r0, w, r = _residuals(r0_ptr, w_ptr, row, stride_r, stride_w, v, i, live, d0, D, BLOCK_D)
        e += tl.sum(r * r, axis=1)
        e0 += r0 * r0
        if WRITE_REST:
            tl.store(rest_ptr + row * stride_rest + cols, r0 - tl.sum(v[:, None] * w, axis=0), col_mask)
    out = out_ptr + row * stride_ob + split * stride_os
    tl.store(out, tl.sum(e0, axis=0))
    tl.store(out + 1 + slots, e, live)


@triton.jit
def _prefix_bwd_kernel(
    val_ptr,  # [B, K]
    idx_ptr,  # [B, K] int32
    w_ptr,  # [n, d]
    r0_ptr,  # [B, d]
    g_ptr,  # [B, K + 1] fp32: dL/dE
    after_ptr,  # [B, d] fp32: S of the slots after these (when HAS_AFTER)
    dv_ptr,  # [B, SPLITS, K] fp32 out: partial dv of split s
    dr0_ptr,  # [B, d] out
    s_ptr,  # [B, K, d] fp32 out, row stride stride_s: S_j (when WRITE_S)
    K,
    D,
    stride_v,
    stride_i,
    stride_w,
    stride_r,
    stride_g,
    stride_a,
    stride_db,
    stride_ds,
    stride_dr,
    stride_s,
    HAS_AFTER: tl.constexpr,
    WRITE_S: tl.constexpr,
    SLOTS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    slots = tl.arange(0, SLOTS)
    live = slots < K
    v = tl.load(val_ptr + row * stride_v + slots, live, 0.0).to(tl.float32)
    i = tl.load(idx_ptr + row * stride_i + slots, live, 0).to(tl.int64)
    g = tl.load(g_ptr + row * stride_g + 1 + slots, live, 0.0)  # G_{j+1}
    g0 = tl.load(g_ptr + row * stride_g)
    dv = tl.zeros([SLOTS], dtype=tl.float32)
    for d0 in range(split * BLOCK_D, D, tl.num_programs(1) * BLOCK_D):  # this split's tiles of d
        cols, col_mask, r0, w, r = _residuals(r0_ptr, w_ptr, row, stride_r, stride_w, v, i, live, d0, D, BLOCK_D)
        gr = g[:, None] * r  # G_{j+1} r_{j+1}
        s = tl.cumsum(gr, axis=0, reverse=True)  # S_j = sum_{t > j} G_t r_t
        tail = tl.sum(gr, axis=0)  # S_{-1}: every G_t r_t with t >= 1
        if HAS_AFTER:
            after = tl.load(after_ptr + row * stride_a + cols, col_mask, 0.0)
            s += after[None, :]
            tail += after
        dv += tl.sum(w * s, axis=1)
        if WRITE_S:
            tl.store(s_ptr + row * stride_s + slots[:, None] * D + cols[None, :], s, live[:, None] & col_mask[None, :])
        dr0 = 2.0 * (g0 * r0 + tail)
        tl.store(dr0_ptr + row * stride_dr + cols, dr0.to(dr0_ptr.dtype.element_ty), col_mask)
    tl.store(dv_ptr + row * stride_db + split * stride_ds + slots, -2.0 * dv, live)


def _launch(B: int, K: int, D: int, W, kernel: str) -> tuple[int, tuple, dict]:
    """(chunk, grid, options) of the kernel "fwd" / "bwd": SLOTS = next_pow2(K) up to SLOTS_MAX (larger K runs
    in chunks of slots), a [SLOTS, BLOCK_D] tile of <kernel>_ELEMS elements per warp (BLOCK_D at least MIN_D,
    up to MAX_WARPS warps), enough splits of d for `programs` programs."""
    cfg = tuning.config("prefix_norms", BYTES=W.element_size())
    elems = cfg[f"{kernel.upper()}_ELEMS"]
    chunk = min(max(K, 1), cfg["SLOTS_MAX"])
    slots = triton.next_power_of_2(chunk)
    block_d = max(cfg["MIN_D"], min(elems // slots, triton.next_power_of_2(D)))
    warps = min(cfg["MAX_WARPS"], max(1, slots * block_d // elems))
    splits = max(1, min(triton.cdiv(D, block_d), triton.cdiv(cfg["programs"], max(B, 1))))
    return chunk, (B, splits), {"SLOTS": slots, "BLOCK_D": block_d, "num_warps": warps, "num_stages": 1}


def _fwd(values, indices, W, r0, opts, grid, write_rest: bool):
    """(E [B, K + 1] fp32, r_K [B, d] fp32 or None) of one chunk of slots."""
    B, K = values.shape
    D = r0.shape[1]
    part = torch.empty(B, grid[1], K + 1, device=r0.device, dtype=torch.float32)
    rest = torch.empty(B, D, device=r0.device, dtype=torch.float32) if write_rest else part
    _prefix_fwd_kernel[grid](
        values, indices, W, r0, part, rest, K, D, values.stride(0), indices.stride(0), W.stride(0), r0.stride(0),
        part.stride(0), part.stride(1), rest.stride(0), WRITE_REST=write_rest, **opts,
    )  # fmt: skip
    return part.sum(1), rest if write_rest else None


def prefix_norms_triton(values, indices, W, r0):
    """E [B, K + 1] fp32 (see the module docstring); K > SLOTS_MAX in chunks of slots, r carried."""
    B, K = values.shape
    chunk, grid, opts = _launch(B, K, r0.shape[1], W, "fwd")
    parts = []
    for a in range(0, max(K, 1), chunk):
        b = min(K, a + chunk)
        E, r0 = _fwd(values[:, a:b], indices[:, a:b], W, r0, opts, grid, b < K)
        parts.append(E if a == 0 else E[:, 1:])  # E[:, 0] of a later chunk is the last one's E[:, -1]
    return torch.cat(parts, 1)


def prefix_norms_backward_triton(values, indices, W, r0, grad, write_s: bool):
    """-> (dv [B, K] fp32, dr0 [B, d] r0.dtype, S [B, K, d] fp32 or None). K > SLOTS_MAX in chunks of slots,
    the last first: each chunk's r0 from a forward pass over the earlier ones, S of the later ones carried."""
    B, K = values.shape
    D = r0.shape[1]
    chunk, grid, opts = _launch(B, K, D, W, "bwd")
    starts = list(range(0, max(K, 1), chunk))
    r0s = [r0]
    if len(starts) > 1:
        _, fwd_grid, fwd_opts = _launch(B, K, D, W, "fwd")
        for a in starts[:-1]:
            r0s.append(
                _fwd(values[:, a : a + chunk], indices[:, a : a + chunk], W, r0s[-1], fwd_opts, fwd_grid, True)[1]
            )
    grad = grad.float().contiguous()
    s = torch.empty(B, K, D, device=r0.device, dtype=torch.float32) if write_s else None
    dvs, after = [], None
    for a, r0_c in zip(reversed(starts), reversed(r0s)):
        b = min(K, a + chunk)
        g = grad[:, a : b + 1]
        if a > 0:
            g = g.clone()
            g[:, 0] = 0  # E[:, a] is the earlier chunk's last error
        dv = torch.empty(B, grid[1], b - a, device=r0.device, dtype=torch.float32)
        dr0 = torch.empty(B, D, device=r0.device, dtype=r0.dtype if a == 0 else torch.float32)
        s_c = s[:, a:b] if write_s else dv
        _prefix_bwd_kernel[grid](
            values[:, a:b], indices[:, a:b], W, r0_c, g, after if after is not None else dr0, dv, dr0, s_c, b - a, D,
            values.stride(0), indices.stride(0), W.stride(0), r0_c.stride(0), g.stride(0),
            after.stride(0) if after is not None else 0, dv.stride(0), dv.stride(1), dr0.stride(0), s_c.stride(0),
            HAS_AFTER=after is not None, WRITE_S=write_s, **opts,
        )  # fmt: skip
        dvs.append(dv.sum(1))
        if a > 0:
            after = dr0 / 2  # S of the slots from a on (this chunk's G_0 is 0): the earlier chunk's carry
    return torch.cat(dvs[::-1], 1), dr0, s


def prefix_norms_cpp(values, indices, W, r0):
    """csrc/sparse.cpp: E [B, K + 1] fp32, one row per thread step."""
    E = r0.new_empty(values.shape[0], values.shape[1] + 1, dtype=torch.float32)
    torch.ops.sae_kernels_cpp.prefix_norms(values, indices, W, r0, E)
    return E


def prefix_norms_backward_cpp(values, indices, W, r0, grad, write_s: bool):
    """csrc/sparse.cpp: -> (dv [B, K] fp32, dr0 [B, d] r0.dtype, S [B, K, d] fp32 or None)."""
    B, K = values.shape
    dv = r0.new_empty(B, K, dtype=torch.float32)
    dr0 = r0.new_empty(r0.shape, dtype=torch.float32)
    s = r0.new_empty((B, K, r0.shape[1]) if write_s else (0,), dtype=torch.float32)
    torch.ops.sae_kernels_cpp.prefix_norms_backward(values, indices, W, r0, grad, dv, dr0, s)
    return dv, dr0.to(r0.dtype), s if write_s else None


@torch.library.custom_op("sae_kernels::prefix_norms", mutates_args=())
def prefix_norms(values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor, r0: torch.Tensor) -> torch.Tensor:
    """E [B, K + 1] fp32: E[b, t] = ||r0[b] - sum_{j < t} values[b, j] W[indices[b, j]]||^2."""
    values, indices, W, r0 = (validate.row_major(t) for t in (values, indices, W, r0))
    run = {"triton": prefix_norms_triton, "cpp": prefix_norms_cpp}.get(resolve(W), torch_ops.prefix_norms_torch)
    return run(values, indices, W, r0)


@prefix_norms.register_fake
def _(values, indices, W, r0):
    return r0.new_empty(values.shape[0], values.shape[1] + 1, dtype=torch.float32)


@torch.library.custom_op("sae_kernels::prefix_norms_backward", mutates_args=())
def prefix_norms_backward(
    values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor, r0: torch.Tensor, grad: torch.Tensor, want_W: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dv [B, K] values.dtype, dr0 [B, d], dW [n, d] W.dtype, or [0, d] when not want_W)."""
    values, indices, W, r0 = (validate.row_major(t) for t in (values, indices, W, r0))
    backend = resolve(W)
    backends = {"triton": prefix_norms_backward_triton, "cpp": prefix_norms_backward_cpp}
    run = backends.get(backend, torch_ops.prefix_norms_backward_torch)
    B, K = values.shape
    n, D = W.shape
    step = max(1, (CUDA_BUDGET if W.is_cuda else BUDGET) // max(1, (K + 1) * D))
    dvs, dr0s, dW = [], [], None
    for a in range(0, B, step):  # row chunks bound the [rows, K, d] S temporary
        part = slice(a, a + step)
        dv, dr0, s = run(values[part], indices[part], W, r0[part], grad[part], want_W)
        dvs.append(dv)
        dr0s.append(dr0)
        if want_W:
            coef = (-2 * values[part].float()).reshape(-1, 1)
            ids, s = indices[part].reshape(-1, 1), s.reshape(-1, D)
            if backend == "triton":  # a later chunk adds to the rows it names in place, in fp32 if there are several
                dW_dtype = W.dtype if step >= B else torch.float32
                dW, _ = scatter_rows_triton(coef, ids, s, n, False, dW_dtype, into=dW)
            else:
                dW_part, _ = scatter_rows(coef, ids, s, n, False, torch.float32)
                dW = dW_part if dW is None else dW.add_(dW_part)
    dv = torch.cat(dvs) if dvs else values.new_zeros(0, K, dtype=torch.float32)
    dr0 = torch.cat(dr0s) if dr0s else r0.new_zeros(0, D)
    if dW is None:
        dW = W.new_zeros(n, D) if want_W else W.new_zeros(0, D)
    return dv.to(values.dtype), dr0, dW.to(W.dtype)


@prefix_norms_backward.register_fake
def _(values, indices, W, r0, grad, want_W):
    return values.new_empty(values.shape), r0.new_empty(r0.shape), W.new_empty(W.shape[0] if want_W else 0, W.shape[1])


def _setup(ctx, inputs, output):
    values, indices, W, r0 = inputs
    ctx.save_for_backward(values, indices, W, r0)


def _backward(ctx, grad):
    values, indices, W, r0 = ctx.saved_tensors
    want_W = ctx.needs_input_grad[2]
    dv, dr0, dW = prefix_norms_backward(values, indices, W, r0, grad, want_W)
    return (
        dv if ctx.needs_input_grad[0] else None,
        None,
        dW if want_W else None,
        dr0 if ctx.needs_input_grad[3] else None,
    )


prefix_norms.register_autograd(_backward, setup_context=_setup)


def prefix_errors(code: SparseCode, W_dec: torch.Tensor, r0: torch.Tensor) -> torch.Tensor:
    """E [B, K + 1] fp32: E[b, t] = ||r0[b] - sum_{j < t} code.values[b, j] W_dec[code.indices[b, j]]||^2.

    code: any SparseCode, values / indices [B, K] in slot order (sort by latent id first for prefix losses);
    W_dec: [n, d]; r0: [B, d] (the target minus b_dec). Differentiable in code.values, W_dec and r0.
    """
    validate.code("code", code, W_dec)
    values, indices = code.values, code.indices
    validate.matrix("r0", r0, cols=W_dec.shape[1])
    validate.floating("r0", r0, W_dec.dtype)
    validate.same_device("r0", r0, W_dec)
    if r0.shape[0] != values.shape[0]:
        raise ValueError(f"r0 must have {values.shape[0]} rows (the code's), got shape {tuple(r0.shape)}")
    return prefix_norms(values, indices.to(torch.int32), W_dec, r0)


def prefix_losses(
    code: SparseCode,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    target: torch.Tensor,
    prefix_weights: torch.Tensor,
) -> torch.Tensor:
    """Per-token weighted prefix loss [B] fp32: sum over prefix sizes m = 1..n of
    prefix_weights[m - 1] * ||target - (b_dec + sum_{i < m} f_i W_dec,i)||^2, in O(K d) per token.

    code: SparseCode [B, K] (any slot order; distinct ids per row, empty slots of value 0 allowed);
    W_dec: [n, d]; b_dec: [d] or None; target: [B, d]; prefix_weights: [n] (Matryoshka: nonzero at its
    prefix sizes; Ordered: every size). Differentiable in code.values, W_dec, b_dec and target.
    """
    n = W_dec.shape[0]
    if not isinstance(prefix_weights, torch.Tensor) or prefix_weights.shape != (n,):
        raise ValueError(f"prefix_weights must be a tensor of shape ({n},)")
    ids, order = code.indices.long().sort(dim=1, stable=True)
    values = code.values.gather(1, order)
    r0 = target if b_dec is None else target - b_dec
    E = prefix_errors(SparseCode(values, ids.to(torch.int32)), W_dec, r0)
    cum = torch.cat([prefix_weights.new_zeros(1), prefix_weights.float().cumsum(0)])  # P[a] = sum_{m <= a} w_m
    bounds = torch.cat([ids.new_zeros(ids.shape[0], 1), ids, ids.new_full((ids.shape[0], 1), n)], 1)
    omega = cum[bounds[:, 1:]] - cum[bounds[:, :-1]]  # [B, K + 1]: weight of the sizes in (i_{t-1}, i_t]
    return (omega.detach() * E).sum(1)
