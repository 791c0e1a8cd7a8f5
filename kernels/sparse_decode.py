"""Sparse decode: a gather-matmul over the latent-major decoder, and its sparse backward.

    out[b]   = bias + sum_j values[b, j] * W[indices[b, j]]        (decode; also the encoder's x gradient)
    dval[b,j] = g[b] . W[indices[b, j]]                            (gather-dot: the value gradient)
    dW        = scatter_rows(values, indices, g)                   (deterministic, see scatter.py)

encoder_grads turns an encoder's slot gradients into those of x, W_enc and b_enc with the same two pieces.

Memory bound: each program owns a few rows and one tile of d, reads whole W rows (contiguous in the
latent-major layout) and accumulates in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import torch_ops, tuning, validate
from .backend import resolve
from .code import SparseCode
from .scatter import scatter_rows


@triton.jit
def _gather_matmul_kernel(
    val_ptr,  # [B, K]
    idx_ptr,  # [B, K] int32
    w_ptr,  # [n, d]
    bias_ptr,  # [d]
    out_ptr,  # [B, d]
    B,
    K,
    D,
    stride_v,
    stride_i,
    stride_w,
    stride_out,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r in range(ROWS):
        row = (pid_b * ROWS + r).to(tl.int64)
        if row < B:
            acc = bias
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < K
                v = tl.load(val_ptr + row * stride_v + ks, mask=k_mask, other=0.0).to(tl.float32)
                i = tl.load(idx_ptr + row * stride_i + ks, mask=k_mask, other=0).to(tl.int64)
                w = tl.load(
                    w_ptr + i[:, None] * stride_w + cols[None, :],
                    mask=k_mask[:, None] & col_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum(v[:, None] * w, axis=0)
            tl.store(out_ptr + row * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _gather_dot_kernel(
    g_ptr,  # [B, d]
    idx_ptr,  # [B, K] int32
    w_ptr,  # [n, d]
    out_ptr,  # [B, K]
    K,
    D,
    stride_g,
    stride_i,
    stride_w,
    stride_out,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    i = tl.load(idx_ptr + row * stride_i + ks, mask=k_mask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        g = tl.load(g_ptr + row * stride_g + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + i[:, None] * stride_w + cols[None, :],
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(out_ptr + row * stride_out + ks, acc.to(out_ptr.dtype.element_ty), mask=k_mask)


def gather_matmul_triton(values, indices, W, bias):
    B, K = values.shape
    D = W.shape[1]
    out = torch.empty(B, D, device=W.device, dtype=W.dtype)
    cfg = tuning.config("gather", D=D)
    grid = (triton.cdiv(B, cfg["ROWS"]), triton.cdiv(D, cfg["BLOCK_D"]))
    _gather_matmul_kernel[grid](
        values, indices, W, bias if bias is not None else W, out, B, K, D,
        values.stride(0), indices.stride(0), W.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, ROWS=cfg["ROWS"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


def gather_dot_triton(g, indices, W):
    B, K = indices.shape
    D = W.shape[1]
    out = torch.empty(B, K, device=g.device, dtype=g.dtype)
    cfg = tuning.config("gather", D=D)
    grid = (B, triton.cdiv(K, cfg["BLOCK_K"]))
    _gather_dot_kernel[grid](
        g, indices, W, out, K, D, g.stride(0), indices.stride(0), W.stride(0), out.stride(0),
        BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


def gather_matmul_cpp(values, indices, W, bias):
    """csrc/sparse.cpp: [B, d] W.dtype."""
    out = W.new_empty(values.shape[0], W.shape[1])
    torch.ops.sae_kernels_cpp.gather_matmul(values, indices, W, bias, out)
    return out


def gather_dot_cpp(g, indices, W):
    """csrc/sparse.cpp: [B, K] g.dtype (fp32 accumulation)."""
    out = g.new_empty(indices.shape, dtype=torch.float32)
    torch.ops.sae_kernels_cpp.gather_dot(g, indices, W, out)
    return out.to(g.dtype)


@torch.library.custom_op("sae_kernels::gather_matmul", mutates_args=())
def gather_matmul(
    values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """[B, d] = bias + sum_j values[b, j] * W[indices[b, j]]."""
    values, indices, W = (validate.row_major(t) for t in (values, indices, W))
    backend = resolve(W)
    if backend == "triton":
        return gather_matmul_triton(values, indices, W, validate.row_major(bias))
    if backend == "cpp":
        return gather_matmul_cpp(values, indices, W, bias)
    return torch_ops.gather_matmul_torch(values, indices, W, bias)


@gather_matmul.register_fake
def _(values, indices, W, bias):
    return W.new_empty(values.shape[0], W.shape[1])


@torch.library.custom_op("sae_kernels::gather_dot", mutates_args=())
def gather_dot(g: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """[B, K] = g[b] . W[indices[b, j]]."""
    g, indices, W = (validate.row_major(t) for t in (g, indices, W))
    backend = resolve(W)
    if backend == "triton":
        return gather_dot_triton(g, indices, W)
    if backend == "cpp":
        return gather_dot_cpp(g, indices, W)
    return torch_ops.gather_dot_torch(g, indices, W)


@gather_dot.register_fake
def _(g, indices, W):
    return g.new_empty(indices.shape)


def _setup(ctx, inputs, output):
    values, indices, W, bias = inputs
    ctx.save_for_backward(values, indices, W)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    values, indices, W = ctx.saved_tensors
    grad_values = grad_W = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_values = gather_dot(grad, indices, W).to(values.dtype)
    if ctx.needs_input_grad[2]:
        grad_W, _ = scatter_rows(values, indices, grad, W.shape[0], False, W.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.sum(0)
    return grad_values, None, grad_W, grad_bias


gather_matmul.register_autograd(_backward, setup_context=_setup)


def sparse_decode(code: SparseCode, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """x_hat = b_dec + sum_j code.values[:, j] * W_dec[code.indices[:, j]].

    code: any SparseCode (every encoder's output: SparseCode, JumpReLUCode, GatedCode) with values [B, K] and
    indices [B, K] in [0, n); W_dec: [n, d]; b_dec: [d] or None. Returns [B, d] in W_dec.dtype.
    Differentiable in code.values, W_dec and b_dec.
    """
    validate.code("code", code, W_dec)
    validate.vector("b_dec", b_dec, W_dec.shape[1], W_dec)
    return gather_matmul(code.values, code.indices.to(torch.int32), W_dec, b_dec)


def encoder_grads(ctx, dz: torch.Tensor, indices: torch.Tensor, x: torch.Tensor, W: torch.Tensor):
    """An encoder's (grad x, grad W, grad b) from dz [B, K] = dL/dz on its slots, z = x W^T + b (x, W and b
    are the encoder's inputs 0, 1 and 2; ctx.has_bias says whether b was given). None where not needed."""
    grad_x = grad_W = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = gather_matmul(dz, indices, W, None).to(x.dtype)
    want_b = ctx.has_bias and ctx.needs_input_grad[2]
    if ctx.needs_input_grad[1] or want_b:
        grad_W, grad_b = scatter_rows(dz, indices, x, W.shape[0], want_b, W.dtype)
        grad_b = grad_b if want_b else None
    return grad_x, grad_W, grad_b
