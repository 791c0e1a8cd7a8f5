"""Prefix reconstruction errors (Matryoshka and Ordered SAEs) from cumulative sums, O(K d) per token.

With a row's slots sorted by latent id (i_0 < i_1 < ... ), the reconstruction from the latents below any
prefix size m is a partial sum of its slots, so every prefix error is one of K + 1 values:

    r_t = r0 - sum_{j < t} v_j W[i_j],   E[b, t] = ||r_t||^2        t = 0..K,  r0 = y - b_dec

and a weighted loss over prefix sizes is sum_t omega_t E_t, omega_t the weight of the prefix sizes m with
i_{t-1} < m <= i_t (prefix_losses). Never one decode per prefix.

prefix_norms (a custom op on tensors) computes E; its launchers are prefix_norms_triton / _torch (torch_ops),
and prefix_errors / prefix_losses are the public ops on SparseCodes.

Kernel: a program per (row, tile of d) walks the slots once, keeping its tile of r in registers and
writing the partial squared norms [B, tiles, K + 1] (summed over tiles afterwards: deterministic).
Backward, with G = dL/dE and S_j = sum_{t > j} G_t r_t:
    dv_j = -2 W[i_j] . S_j,   dr0 = 2 sum_t G_t r_t,   dW[i_j] += -2 v_j S_j
walked from the last slot down (r_{t-1} = r_t + v_{t-1} W[i_{t-1}]). dW goes through the deterministic
row scatter with the S_j rows as its inputs, in row chunks of bounded size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import torch_ops, validate
from .backend import resolve
from .code import SparseCode
from .scatter import scatter_rows

BUDGET = 1 << 24  # elements of the backward's [rows, K, d] temporary S
CUDA_BUDGET = 1 << 28  # 1 GiB of fp32 S on a GPU: at B = 8192, k = 64, d = 4096, 8 row chunks instead of 130
BLOCK_D = 128


@triton.jit
def _prefix_fwd_kernel(
    val_ptr,  # [B, K]
    idx_ptr,  # [B, K] int32
    w_ptr,  # [n, d]
    r0_ptr,  # [B, d]
    out_ptr,  # [B, T, K + 1] fp32: partial ||r_t||^2 of tile T
    K,
    D,
    stride_v,
    stride_i,
    stride_w,
    stride_r,
    stride_ob,
    stride_ot,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    r = tl.load(r0_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + row * stride_ob + tile * stride_ot
    for t in range(0, K):
        tl.store(out + t, tl.sum(r * r, axis=0))
        v = tl.load(val_ptr + row * stride_v + t).to(tl.float32)
        i = tl.load(idx_ptr + row * stride_i + t).to(tl.int64)
        w = tl.load(w_ptr + i * stride_w + cols, mask=mask, other=0.0).to(tl.float32)
        r -= v * w
    tl.store(out + K, tl.sum(r * r, axis=0))


@triton.jit
def _prefix_bwd_kernel(
    val_ptr,  # [B, K]
    idx_ptr,  # [B, K] int32
    w_ptr,  # [n, d]
    r0_ptr,  # [B, d]
    g_ptr,  # [B, K + 1] fp32: dL/dE
    dv_ptr,  # [B, T, K] fp32 out: partial dv of tile T
    dr0_ptr,  # [B, d] out
    s_ptr,  # [B, K, d] fp32 out: S_j (when WRITE_S)
    K,
    D,
    stride_v,
    stride_i,
    stride_w,
    stride_r,
    stride_g,
    stride_db,
    stride_dt,
    stride_dr,
    WRITE_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    r = tl.load(r0_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    for t in range(0, K):  # r_K
        v = tl.load(val_ptr + row * stride_v + t).to(tl.float32)
        i = tl.load(idx_ptr + row * stride_i + t).to(tl.int64)
        r -= v * tl.load(w_ptr + i * stride_w + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.zeros([BLOCK_D], dtype=tl.float32)
    for step in range(0, K):
        j = K - 1 - step
        s += tl.load(g_ptr + row * stride_g + j + 1) * r  # S_j = sum_{t > j} G_t r_t
        v = tl.load(val_ptr + row * stride_v + j).to(tl.float32)
        i = tl.load(idx_ptr + row * stride_i + j).to(tl.int64)
        w = tl.load(w_ptr + i * stride_w + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dv_ptr + row * stride_db + tile * stride_dt + j, -2.0 * tl.sum(w * s, axis=0))
        if WRITE_S:
            tl.store(s_ptr + (row * K + j) * D + cols, s, mask=mask)
        r += v * w
    s += tl.load(g_ptr + row * stride_g) * r
    tl.store(dr0_ptr + row * stride_dr + cols, (2.0 * s).to(dr0_ptr.dtype.element_ty), mask=mask)


def prefix_norms_triton(values, indices, W, r0):
    """E [B, K + 1] fp32 (see the module docstring)."""
    B, K = values.shape
    D = r0.shape[1]
    T = triton.cdiv(D, BLOCK_D)
    part = torch.empty(B, T, K + 1, device=r0.device, dtype=torch.float32)
    _prefix_fwd_kernel[(B, T)](
        values, indices, W, r0, part, K, D, values.stride(0), indices.stride(0), W.stride(0), r0.stride(0),
        part.stride(0), part.stride(1), BLOCK_D=BLOCK_D, num_warps=4,
    )  # fmt: skip
    return part.sum(1)


def prefix_norms_backward_triton(values, indices, W, r0, grad, write_s: bool):
    """-> (dv [B, K] fp32, dr0 [B, d] r0.dtype, S [B, K, d] fp32 or None)."""
    B, K = values.shape
    D = r0.shape[1]
    T = triton.cdiv(D, BLOCK_D)
    dv = torch.empty(B, T, K, device=r0.device, dtype=torch.float32)
    dr0 = torch.empty_like(r0)
    s = torch.empty(B, K, D, device=r0.device, dtype=torch.float32) if write_s else dv
    grad = grad.float().contiguous()
    _prefix_bwd_kernel[(B, T)](
        values, indices, W, r0, grad, dv, dr0, s, K, D, values.stride(0), indices.stride(0), W.stride(0),
        r0.stride(0), grad.stride(0), dv.stride(0), dv.stride(1), dr0.stride(0),
        WRITE_S=write_s, BLOCK_D=BLOCK_D, num_warps=4,
    )  # fmt: skip
    return dv.sum(1), dr0, s if write_s else None


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
    backends = {"triton": prefix_norms_backward_triton, "cpp": prefix_norms_backward_cpp}
    run = backends.get(resolve(W), torch_ops.prefix_norms_backward_torch)
    B, K = values.shape
    n, D = W.shape
    budget = CUDA_BUDGET if W.is_cuda else BUDGET  # few chunks: each adds a whole [n, d] dW
    step = max(1, budget // max(1, (K + 1) * D))
    dvs, dr0s, dW = [], [], None
    for a in range(0, B, step):  # row chunks bound the [rows, K, d] S temporary
        part = slice(a, a + step)
        dv, dr0, s = run(values[part], indices[part], W, r0[part], grad[part], want_W)
        dvs.append(dv)
        dr0s.append(dr0)
        if want_W:
            coef = (-2 * values[part].float()).reshape(-1, 1)
            dW_part, _ = scatter_rows(coef, indices[part].reshape(-1, 1), s.reshape(-1, D), n, False, torch.float32)
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
