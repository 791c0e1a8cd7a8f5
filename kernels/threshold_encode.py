"""Fused threshold encoders: ReLU, JumpReLU and gated, without ever writing the [B, n] pre-activations.

The GEMM is tiled like the TopK encoder's (a grid of row blocks x column splits, fp32 tl.dot). The
epilogue keeps the entries of each tile that pass the activation's test and compacts them into a padded
code of capacity C per row: a tile reserves its rows' slots with one int32 atomic add per row, and its
entries take consecutive slots from there (a cumulative sum over the tile's mask). Entries beyond C are
counted but not stored. Afterwards each row's slots are sorted by latent id (atomics order them
arbitrarily), so the result is deterministic. If a row kept more than C entries, the op runs again with
the capacity it needs (capacity=None) or raises an error naming the row count (a fixed capacity).

    ReLU:      kept where z > 0;                     f = z
    JumpReLU:  kept where z > theta or |z - theta| < bandwidth / 2 (the gradient band);
               f = z * H(z - theta), so band entries at or below theta are kept with value 0
    gated:     u = x W^T, pi_g = u + b_gate, pi_m = exp(r_mag) * u + b_mag;
               kept where pi_g > 0;                  f = ReLU(pi_m), gate = pi_g (= ReLU(pi_g) there)

Backward passes are sparse and deterministic: gather_matmul for x, scatter_rows_op for weights, biases,
thresholds and r_mag (DESIGN section 5 has the straight-through threshold gradients).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import torch_ops, validate
from .backend import INTERPRET, resolve
from .code import SparseCode
from .gemm import precision, split_plan, tile_xwT
from .scatter import scatter_rows_op
from .sparse_decode import gather_matmul
from .torch_ops import GATED, JUMPRELU, RELU

DEFAULT_CAPACITY = 64  # first guess when the caller fixes none; later calls start from the last need
DENSE_FRACTION = 0.25  # relu_encode turns dense when a row keeps more than this fraction of latents
_state = {"hint": dict.fromkeys((RELU, JUMPRELU, GATED), DEFAULT_CAPACITY), "dense": False}


@triton.jit
def _threshold_encode_kernel(
    x_ptr,  # [B, d]
    w_ptr,  # [n, d]
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
    cols_per_split,
    stride_x,
    stride_w,
    half_band,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
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
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < col_hi
        cols64 = cols.to(tl.int64)
        acc = tile_xwT(
            x_ptr, w_ptr, rows64, row_mask, cols64, col_mask, D, stride_x, stride_w,
            BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
        )  # fmt: skip
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
            scale = tl.exp(tl.load(r_ptr + cols, mask=col_mask, other=0.0).to(tl.float32))
            shift = tl.load(b2_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            aux = scale[None, :] * acc + shift[None, :]
            keep = z > 0
            f = tl.maximum(aux, 0.0)
        keep = keep & row_mask[:, None] & col_mask[None, :]
        flags = keep.to(tl.int32)
        cnt = tl.sum(flags, axis=1)
        if tl.sum(cnt, axis=0) > 0:
            base = tl.atomic_add(count_ptr + rows, cnt, mask=row_mask)
            pos = base[:, None] + tl.cumsum(flags, axis=1) - 1
            store = keep & (pos < C)
            off = rows64[:, None] * C + pos
            tl.store(val_ptr + off, f.to(val_ptr.dtype.element_ty), mask=store)
            tl.store(aux_ptr + off, aux, mask=store)
            tl.store(idx_ptr + off, tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_N)), mask=store)
            if MODE == 2:
                tl.store(gate_ptr + off, z.to(gate_ptr.dtype.element_ty), mask=store)


def threshold_select_triton(mode: int, x, W, b, theta, r_mag, b_mag, half_band: float, capacity: int):
    """The fused kernel, then a sort of each row's slots by latent id. Same contract as
    torch_ops.threshold_select."""
    B, D = x.shape
    N = W.shape[0]
    cfg = split_plan("threshold_encode", B, N, x.device, D=D)
    values = torch.empty(B, capacity, device=x.device, dtype=x.dtype)
    gate = torch.empty_like(values) if mode == GATED else values
    aux = torch.empty(B, capacity, device=x.device, dtype=torch.float32)
    indices = torch.empty(B, capacity, device=x.device, dtype=torch.int32)
    counts = torch.zeros(B, device=x.device, dtype=torch.int32)
    dummy = W
    _threshold_encode_kernel[(triton.cdiv(B, cfg["BLOCK_M"]), cfg["S"])](
        x, W, b if b is not None else dummy, theta if theta is not None else dummy,
        r_mag if r_mag is not None else dummy, b_mag if b_mag is not None else dummy,
        values, gate, aux, indices, counts, B, N, D, capacity, cfg["cols_per_split"],
        x.stride(0), W.stride(0), half_band,
        MODE=mode, HAS_BIAS=b is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], UPCAST=INTERPRET, PRECISION=precision(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    filled = torch.arange(capacity, device=x.device) < counts[:, None]
    ids, perm = torch.where(filled, indices, N).sort(dim=1)  # empty slots (key N) go to the end
    filled = ids < N
    tidy = lambda t: torch.where(filled, t.gather(1, perm), 0)
    gate = tidy(gate) if mode == GATED else None
    return tidy(values), gate, tidy(aux), torch.where(filled, ids, 0).to(torch.int32), counts


def _torch_select(mode, x, W, b, theta, r_mag, b_mag, half_band, capacity):
    values, gate, aux, indices, counts = torch_ops.threshold_select(
        mode, x, W, b, theta, r_mag, b_mag, half_band, capacity
    )
    return values, gate if mode == GATED else None, aux, indices, counts


def _select(mode: int, x, W, b, theta, r_mag, b_mag, half_band: float, capacity: int, dense_above=None):
    """The kept entries with capacity `capacity`; capacity 0: with the capacity the largest row needs.

    -> (values, gate or None, aux, indices [B, C] int32, counts [B] int32), or None when capacity is 0
    and a row keeps more than `dense_above` entries (the caller then runs densely).
    """
    args = (mode, x, W, b, theta, r_mag, b_mag, half_band)
    run = threshold_select_triton if resolve(x) == "triton" else _torch_select
    C = capacity or min(W.shape[0], _state["hint"][mode])
    out = run(*args, C)
    need = int(out[-1].max()) if x.shape[0] else 0
    if capacity:
        if need > capacity:
            raise ValueError(
                f"a row has {need} active latents, more than capacity={capacity}: "
                "raise the capacity, or pass capacity=None to grow it"
            )
        return out
    _state["hint"][mode] = max(DEFAULT_CAPACITY // 4, need + need // 4)
    if dense_above is not None and need > dense_above:
        return None
    if need > C:
        out = run(*args, need)
    elif need < C:
        out = tuple(t if t is None or t.dim() == 1 else t[:, : max(need, 1)].contiguous() for t in out)
    return out


def _filled(counts: torch.Tensor, K: int) -> torch.Tensor:
    """[B, K] bool: the slots that hold an entry."""
    return torch.arange(K, device=counts.device) < counts[:, None]


def _dynamic(capacity: int):
    return capacity or torch.library.get_ctx().new_dynamic_size()


def _latent_sums(cols: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """cols [B, K, m] -> [n, m] fp32: per latent, the sum over the slots naming it (deterministic)."""
    m = cols.shape[-1]
    flat = cols.reshape(-1, m).float().contiguous()
    ones = flat.new_ones(flat.shape[0], 1)
    sums, _ = scatter_rows_op(ones, indices.reshape(-1, 1), flat, n, False, torch.float32)
    return sums


def _input_grads(ctx, dz, indices, x, W):
    """Gradients of x, W and the bias (input 2) from dz [B, K] = dL/d(x W^T + b) on the slots."""
    grad_x = grad_W = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = gather_matmul(dz, indices, W, None).to(x.dtype)
    want_b = ctx.has_bias and ctx.needs_input_grad[2]
    if ctx.needs_input_grad[1] or want_b:
        grad_W, grad_b = scatter_rows_op(dz, indices, x, W.shape[0], want_b, W.dtype)
        grad_b = grad_b if want_b else None
    return grad_x, grad_W, grad_b


# ReLU -----------------------------------------------------------------------------------------------


def _relu_dense(x, W, b):
    """(values [B, n], indices [B, n], aux [B, n] fp32, counts [B]): every latent a slot."""
    if x.is_cuda:
        z = torch.nn.functional.linear(x, W, b).float()
    else:
        z = torch.nn.functional.linear(x.float(), W.float(), None if b is None else b.float())
    B, n = z.shape
    indices = torch.arange(n, device=x.device, dtype=torch.int32).expand(B, n).contiguous()
    counts = torch.full((B,), n, device=x.device, dtype=torch.int32)
    return torch.relu(z).to(x.dtype), indices, z, counts


def _compact_dense(values, aux):
    """The sparse layout (kept entries by latent id, then empty slots) of a dense ReLU result."""
    keep = aux > 0
    counts = keep.sum(1).to(torch.int32)
    K = max(int(counts.max()) if counts.numel() else 0, 1)
    n = aux.shape[1]
    ids = torch.where(keep, torch.arange(n, device=aux.device), n).sort(dim=1).values[:, :K]
    filled = ids < n
    ids = torch.where(filled, ids, 0)
    tidy = lambda t: torch.where(filled, t.gather(1, ids), 0)
    return tidy(values), ids.to(torch.int32), tidy(aux), counts


@torch.library.custom_op("sae_kernels::relu_select", mutates_args=())
def relu_select(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ReLU(x W^T + b) as (values [B, C], indices [B, C] int32, z [B, C] fp32, counts [B] int32).

    capacity 0 chooses C, and returns every latent (C = n) when a row keeps more than DENSE_FRACTION of
    them; that choice is remembered, and re-measured on the dense result of the next call.
    """
    x, W, b = (validate.row_major(t) for t in (x, W, b))
    dense_above = int(DENSE_FRACTION * W.shape[0])
    if not capacity and _state["dense"]:
        values, indices, aux, counts = _relu_dense(x, W, b)
        if int((aux > 0).sum(1).max()) > dense_above // 2:
            return values, indices, aux, counts
        _state["dense"] = False
        return _compact_dense(values, aux)
    out = _select(RELU, x, W, b, None, None, None, 0.0, capacity, None if capacity else dense_above)
    if out is None:
        _state["dense"] = True
        return _relu_dense(x, W, b)
    values, _, aux, indices, counts = out
    return values, indices, aux, counts


@relu_select.register_fake
def _(x, W, b, capacity):
    B, C = x.shape[0], _dynamic(capacity)
    f32, i32 = torch.float32, torch.int32
    return (
        x.new_empty(B, C),
        x.new_empty(B, C, dtype=i32),
        x.new_empty(B, C, dtype=f32),
        x.new_empty(B, dtype=i32),
    )


def _relu_setup(ctx, inputs, output):
    x, W, b, _ = inputs
    _, indices, aux, counts = output
    ctx.mark_non_differentiable(aux)
    ctx.save_for_backward(x, W, indices, aux, counts)
    ctx.has_bias = b is not None


def _relu_backward(ctx, grad_values, _gi, _ga, _gc):
    x, W, indices, aux, counts = ctx.saved_tensors
    dz = torch.where(_filled(counts, aux.shape[1]) & (aux > 0), grad_values, 0.0)
    return (*_input_grads(ctx, dz, indices, x, W), None)


relu_select.register_autograd(_relu_backward, setup_context=_relu_setup)


# JumpReLU -------------------------------------------------------------------------------------------


@torch.library.custom_op("sae_kernels::jumprelu_select", mutates_args=())
def jumprelu_select(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    theta: torch.Tensor,
    bandwidth: float,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """JumpReLU(x W^T + b) with its gradient band: (values [B, C], indices [B, C] int32, z [B, C] fp32,
    counts [B] int32, l0 [B] fp32). Slots hold the entries with z > theta (value z) and those with
    |z - theta| < bandwidth / 2 (value 0 when z <= theta), by latent id; l0 counts z > theta per row."""
    x, W, b, theta = (validate.row_major(t) for t in (x, W, b, theta))
    values, _, aux, indices, counts = _select(JUMPRELU, x, W, b, theta, None, None, bandwidth / 2, capacity)
    active = _filled(counts, aux.shape[1]) & (aux > theta[indices.long()].float())
    return values, indices, aux, counts, active.sum(1, dtype=torch.float32)


@jumprelu_select.register_fake
def _(x, W, b, theta, bandwidth, capacity):
    B, C = x.shape[0], _dynamic(capacity)
    f32, i32 = torch.float32, torch.int32
    return (
        x.new_empty(B, C),
        x.new_empty(B, C, dtype=i32),
        x.new_empty(B, C, dtype=f32),
        x.new_empty(B, dtype=i32),
        x.new_empty(B, dtype=f32),
    )


def _jumprelu_setup(ctx, inputs, output):
    x, W, b, theta, bandwidth, _ = inputs
    _, indices, aux, counts, _ = output
    ctx.mark_non_differentiable(aux)
    ctx.save_for_backward(x, W, theta, indices, aux, counts)
    ctx.has_bias = b is not None
    ctx.bandwidth = bandwidth


def _jumprelu_backward(ctx, grad_values, _gi, _ga, _gc, grad_l0):
    """df/dz = H(z - theta); df/dtheta = -(theta / eps) K; dl0/dtheta = -(1 / eps) K;
    K = 1[|z - theta| < eps / 2]."""
    x, W, theta, indices, aux, counts = ctx.saved_tensors
    eps = ctx.bandwidth
    filled = _filled(counts, aux.shape[1])
    th = theta[indices.long()].float()
    grad_values = torch.zeros_like(aux) if grad_values is None else grad_values
    dz = torch.where(filled & (aux > th), grad_values, 0.0)
    grad_x, grad_W, grad_b = _input_grads(ctx, dz, indices, x, W)
    grad_theta = None
    if ctx.needs_input_grad[3]:
        band = filled & ((aux - th).abs() < eps / 2)
        dtheta = -(th / eps) * grad_values.float()
        if grad_l0 is not None:
            dtheta = dtheta - grad_l0.float()[:, None] / eps
        dtheta = torch.where(band, dtheta, 0.0)
        grad_theta = _latent_sums(dtheta[..., None], indices, W.shape[0])[:, 0].to(theta.dtype)
    return grad_x, grad_W, grad_b, grad_theta, None, None


jumprelu_select.register_autograd(_jumprelu_backward, setup_context=_jumprelu_setup)


# Gated ----------------------------------------------------------------------------------------------


@torch.library.custom_op("sae_kernels::gated_select", mutates_args=())
def gated_select(
    x: torch.Tensor,
    W: torch.Tensor,
    b_gate: torch.Tensor,
    r_mag: torch.Tensor,
    b_mag: torch.Tensor,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gated encoder on the set pi_g > 0: (f [B, C], pi_g [B, C], indices [B, C] int32,
    pi_m [B, C] fp32, counts [B] int32), slots by latent id."""
    x, W, b_gate, r_mag, b_mag = (validate.row_major(t) for t in (x, W, b_gate, r_mag, b_mag))
    values, gate, aux, indices, counts = _select(GATED, x, W, b_gate, None, r_mag, b_mag, 0.0, capacity)
    return values, gate, indices, aux, counts


@gated_select.register_fake
def _(x, W, b_gate, r_mag, b_mag, capacity):
    B, C = x.shape[0], _dynamic(capacity)
    i32 = torch.int32
    return (
        x.new_empty(B, C),
        x.new_empty(B, C),
        x.new_empty(B, C, dtype=i32),
        x.new_empty(B, C, dtype=torch.float32),
        x.new_empty(B, dtype=i32),
    )


def _gated_setup(ctx, inputs, output):
    x, W, b_gate, r_mag, b_mag, _ = inputs
    _, _, indices, aux, counts = output
    ctx.mark_non_differentiable(aux)
    ctx.save_for_backward(x, W, r_mag, b_mag, indices, aux, counts)
    ctx.has_bias = False  # b_gate's gradient is not du's sum


def _gated_backward(ctx, grad_f, grad_gate, _gi, _ga, _gc):
    """With u = x W^T: df/du = exp(r_mag) 1[pi_m > 0], df/dr_mag = (pi_m - b_mag) 1[pi_m > 0],
    df/db_mag = 1[pi_m > 0], dgate/du = dgate/db_gate = 1 (pi_g > 0 on every kept slot)."""
    x, W, r_mag, b_mag, indices, aux, counts = ctx.saved_tensors
    filled = _filled(counts, aux.shape[1])
    ids = indices.long()
    zero = torch.zeros_like(aux)
    g_m = torch.where(filled & (aux > 0), zero if grad_f is None else grad_f.float(), 0.0)  # dL/dpi_m
    g_g = torch.where(filled, zero if grad_gate is None else grad_gate.float(), 0.0)  # dL/dpi_g
    du = g_m * torch.exp(r_mag[ids].float()) + g_g
    grad_x, grad_W, _ = _input_grads(ctx, du, indices, x, W)
    grad_b_gate = grad_r = grad_b_mag = None
    if any(ctx.needs_input_grad[2:5]):
        cols = torch.stack([g_g, g_m * (aux - b_mag[ids].float()), g_m], -1)
        sums = _latent_sums(cols, indices, W.shape[0])
        grad_b_gate, grad_r, grad_b_mag = (s.to(r_mag.dtype) for s in sums.unbind(1))
    return grad_x, grad_W, grad_b_gate, grad_r, grad_b_mag, None


gated_select.register_autograd(_gated_backward, setup_context=_gated_setup)


# Public encoders ------------------------------------------------------------------------------------


class JumpReLUCode(NamedTuple):
    """code: values [B, C], indices [B, C] (slots by latent id): the active latents (z > theta) and the
    inactive ones inside the gradient band (value 0), so a loss on the code reaches the thresholds.
    l0: [B] fp32, active latents per row, differentiable in the thresholds (the L0 penalty)."""

    code: SparseCode
    l0: torch.Tensor


class GatedCode(NamedTuple):
    """code: f = ReLU(pi_m) on the set pi_g > 0; gate: ReLU(pi_g) on the same slots (same indices), for
    the L1 penalty and the auxiliary reconstruction. Both [B, C], slots by latent id."""

    code: SparseCode
    gate: SparseCode


def _check_encoder(x, W_name, W, vectors, capacity, b_dec):
    """The threshold encoders' checks; returns x - b_dec."""
    validate.capacity(capacity)
    return validate.encoder(x, W_name, W, vectors, b_dec)


def relu_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    *,
    b_dec: torch.Tensor | None = None,
    capacity: int | None = None,
) -> SparseCode:
    """f = ReLU((x - b_dec) W_enc^T + b_enc) as a padded SparseCode.

    x: [B, d]; W_enc: [n, d]; b_enc: [n] or None; b_dec: [d] or None. Returns values [B, C] (x.dtype) and
    indices [B, C] int32, each row's active latents by id, then empty slots (value 0, index 0).
    capacity=None: C is the largest active count of a row, or C = n with indices 0..n-1 in every row
    (the dense path, taken while a row keeps more than DENSE_FRACTION of the latents, as at init).
    A fixed capacity raises ValueError if a row has more active latents. Differentiable in x, W_enc,
    b_enc and b_dec.
    """
    x = _check_encoder(x, "W_enc", W_enc, [("b_enc", b_enc)], capacity, b_dec)
    values, indices, _, _ = relu_select(x, W_enc, b_enc, capacity or 0)
    return SparseCode(values, indices)


def jumprelu_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    threshold: torch.Tensor,
    *,
    bandwidth: float,
    b_dec: torch.Tensor | None = None,
    capacity: int | None = None,
) -> JumpReLUCode:
    """f = z * H(z - threshold), z = (x - b_dec) W_enc^T + b_enc, with straight-through threshold gradients.

    x: [B, d]; W_enc: [n, d]; b_enc: [n] or None; threshold: [n]; b_dec: [d] or None; bandwidth: the
    rectangle kernel's width eps > 0. Returns JumpReLUCode(code [B, C], l0 [B]); C counts active and band
    entries. Gradients: df/dz = H(z - theta), df/dtheta = -(theta/eps) 1[|z - theta| < eps/2],
    dl0/dtheta = -(1/eps) 1[|z - theta| < eps/2]. capacity as in relu_encode (no dense path).
    """
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not 0 < bandwidth < 1e30:
        raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}")
    if not isinstance(threshold, torch.Tensor):
        raise TypeError(f"threshold must be a torch.Tensor, got {type(threshold).__name__}")
    x = _check_encoder(x, "W_enc", W_enc, [("b_enc", b_enc), ("threshold", threshold)], capacity, b_dec)
    values, indices, _, _, l0 = jumprelu_select(x, W_enc, b_enc, threshold, float(bandwidth), capacity or 0)
    return JumpReLUCode(SparseCode(values, indices), l0)


def gated_encode(
    x: torch.Tensor,
    W_gate: torch.Tensor,
    b_gate: torch.Tensor,
    r_mag: torch.Tensor,
    b_mag: torch.Tensor,
    *,
    b_dec: torch.Tensor | None = None,
    capacity: int | None = None,
) -> GatedCode:
    """The gated SAE encoder, one matrix product for both paths (x' = x - b_dec):

        pi_g = x' W_gate^T + b_gate,  pi_m = exp(r_mag) * (x' W_gate^T) + b_mag,  f = 1[pi_g > 0] ReLU(pi_m)

    x: [B, d]; W_gate: [n, d]; b_gate, r_mag, b_mag: [n]; b_dec: [d] or None. Returns GatedCode(code, gate)
    on the slots pi_g > 0: code.values = f, gate.values = ReLU(pi_g), both [B, C] with the same indices.
    The Heaviside passes no gradient (f reaches the gate only through the losses on `gate`).
    capacity as in relu_encode (no dense path).
    """
    vectors = [("b_gate", b_gate), ("r_mag", r_mag), ("b_mag", b_mag)]
    for name, t in vectors:
        if t is None:
            raise TypeError(f"{name} must be a torch.Tensor, got None")
    x = _check_encoder(x, "W_gate", W_gate, vectors, capacity, b_dec)
    values, gate, indices, _, _ = gated_select(x, W_gate, b_gate, r_mag, b_mag, capacity or 0)
    return GatedCode(SparseCode(values, indices), SparseCode(gate, indices))
