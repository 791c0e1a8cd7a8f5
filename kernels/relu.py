"""ReLU encoder: f = ReLU(x W^T + b) as a padded SparseCode, through the fused threshold kernel (threshold.py).

Layout, a function of the inputs only: compact (each row's active latents by id, C the largest row count)
unless a row keeps more than DENSE_FRACTION of the latents (as at init), then dense (C = n, every latent a
slot, from one cuBLAS / BLAS product). A hint (EncodeHints.relu_dense) only chooses which pass runs first.
Backward: sparse and deterministic, through sparse_decode.encoder_grads (gather for x, row scatter for W, b);
in the dense layout every latent is a slot and the gradients are two GEMMs and a column sum (dense_grads).
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from . import validate
from .code import SparseCode
from .hints import EncodeHints
from .sparse_decode import encoder_grads
from .threshold import dynamic_capacity, observe, threshold_select
from .torch_ops import RELU

DENSE_FRACTION = 0.25  # the layout is dense when a row keeps more than this fraction of the latents


def dense_above(n: int) -> int:
    """The largest row count of a compact layout."""
    return int(DENSE_FRACTION * n)


def relu_dense(x, W, b):
    """Every latent a slot: (values [B, n], indices [B, n] int32, z [B, n] fp32, counts [B] int32)."""
    if x.is_cuda:
        z = torch.nn.functional.linear(x, W, b).float()
    else:
        z = torch.nn.functional.linear(x.float(), W.float(), None if b is None else b.float())
    B, n = z.shape
    indices = torch.arange(n, device=x.device, dtype=torch.int32).expand(B, n).contiguous()
    counts = (z > 0).sum(1, dtype=torch.int32)
    return torch.relu(z).to(x.dtype), indices, z, counts


@torch.library.custom_op("sae_kernels::relu_select", mutates_args=())
def relu_select(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, capacity: int, guess: int, dense_first: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ReLU(x W^T + b) as (values [B, C], indices [B, C] int32, z [B, C] fp32, counts [B] int32 active per row).

    capacity > 0: C = capacity (compact). capacity 0: the layout of the module docstring; `guess` (the first
    compact capacity tried) and `dense_first` (run the dense product first) are speed hints only.
    """
    x, W, b = (validate.row_major(t) for t in (x, W, b))
    limit = dense_above(W.shape[0])
    if not capacity and dense_first:
        dense = relu_dense(x, W, b)
        need = int(dense[3].max()) if x.shape[0] else 0
        if need > limit:
            return dense
        guess = need  # compact after all: the fused pass decides the set, as without the hint
    out = threshold_select(RELU, x, W, b, None, None, None, 0.0, capacity, guess, None if capacity else limit)
    if out is None:
        return relu_dense(x, W, b)
    values, _, aux, indices, counts = out
    return values, indices, aux, counts


@relu_select.register_fake
def _(x, W, b, capacity, guess, dense_first):
    B, C = x.shape[0], dynamic_capacity(capacity)
    return (
        x.new_empty(B, C),
        x.new_empty(B, C, dtype=torch.int32),
        x.new_empty(B, C, dtype=torch.float32),
        x.new_empty(B, dtype=torch.int32),
    )


def dense_grads(ctx, dz: torch.Tensor, x: torch.Tensor, W: torch.Tensor):
    """(grad x, grad W, grad b) of the dense layout, dz [B, n] = dL/dz: dz W, dz^T x and the column sums.
    Products in x.dtype on CUDA (cuBLAS, fp32 accumulation), in fp32 on the CPU, as relu_dense's."""
    work = x.dtype if x.is_cuda else torch.float32
    dz = dz.to(work)
    grad_x = (dz @ W.to(work)).to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_W = (dz.T @ x.to(work)).to(W.dtype) if ctx.needs_input_grad[1] else None
    grad_b = dz.sum(0, dtype=torch.float32).to(W.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_W, grad_b


def _setup(ctx, inputs, output):
    x, W, b, capacity, *_ = inputs
    _, indices, aux, _ = output
    ctx.mark_non_differentiable(aux)
    ctx.save_for_backward(x, W, indices, aux)
    ctx.has_bias = b is not None
    # Compact rows hold at most dense_above(n) < n slots unless a capacity was fixed: C = n is the dense layout.
    # While tracing, C is unknown (an unbacked size): the sparse backward is right for either layout.
    ctx.dense = not capacity and guard_or_false(indices.shape[1] == W.shape[0])


def _backward(ctx, grad_values, _gi, _ga, _gc):
    x, W, indices, aux = ctx.saved_tensors
    dz = torch.where(aux > 0, grad_values, 0.0)  # empty slots hold z = 0
    grads = dense_grads(ctx, dz, x, W) if ctx.dense else encoder_grads(ctx, dz, indices, x, W)
    return (*grads, None, None, None)


relu_select.register_autograd(_backward, setup_context=_setup)


def relu_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    *,
    b_dec: torch.Tensor | None = None,
    capacity: int | None = None,
    hints: EncodeHints | None = None,
) -> SparseCode:
    """f = ReLU((x - b_dec) W_enc^T + b_enc) as a padded SparseCode.

    x: [B, d]; W_enc: [n, d]; b_enc: [n] or None; b_dec: [d] or None. Returns values [B, C] (x.dtype) and
    indices [B, C] int32, each row's active latents by id, then empty slots (value 0, index 0).
    capacity=None: C is the largest active count of a row, or C = n with indices 0..n-1 in every row
    (dense, when a row keeps more than DENSE_FRACTION of the latents, as at init). A fixed capacity raises
    ValueError if a row has more active latents. hints: the caller's EncodeHints (speed only; updated).
    Differentiable in x, W_enc, b_enc and b_dec.
    """
    validate.capacity(capacity)
    hints = validate.hints(hints)
    x = validate.encoder(x, "W_enc", W_enc, [("b_enc", b_enc)], b_dec)
    values, indices, _, counts = relu_select(x, W_enc, b_enc, capacity or 0, hints.capacity, hints.relu_dense)
    need = observe(hints, counts, capacity)
    if need is not None:
        hints.relu_dense = need > dense_above(W_enc.shape[0])
    return SparseCode(values, indices)
