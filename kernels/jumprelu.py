"""JumpReLU encoder: f = z * H(z - theta) with its gradient band, through the fused threshold kernel
(threshold.py), and straight-through threshold gradients without dense tensors (DESIGN section 5):

    df/dz = H(z - theta);  df/dtheta = -(theta / eps) K;  dl0/dtheta = -(1 / eps) K;  K = 1[|z - theta| < eps / 2]

The code keeps the active entries (z > theta) and the band's (value 0 at or below theta), so the threshold
gradient is a sum over slots (a deterministic row scatter).
"""

from __future__ import annotations

import torch

from . import validate
from .code import JumpReLUCode
from .hints import EncodeHints
from .sparse_decode import encoder_grads
from .threshold import dynamic_capacity, filled, latent_sums, observe, threshold_select
from .torch_ops import JUMPRELU


@torch.library.custom_op("sae_kernels::jumprelu_select", mutates_args=())
def jumprelu_select(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    theta: torch.Tensor,
    bandwidth: float,
    capacity: int,
    guess: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """JumpReLU(x W^T + b) with its gradient band: (values [B, C], indices [B, C] int32, z [B, C] fp32,
    counts [B] int32, l0 [B] fp32). Slots hold the entries with z > theta (value z) and those with
    |z - theta| < bandwidth / 2 (value 0 when z <= theta), by latent id; l0 counts z > theta per row.
    capacity 0 chooses C (the largest row count); `guess` is the first C tried (speed only)."""
    x, W, b, theta = (validate.row_major(t) for t in (x, W, b, theta))
    values, _, aux, indices, counts = threshold_select(
        JUMPRELU, x, W, b, theta, None, None, bandwidth / 2, capacity, guess
    )
    active = filled(counts, aux.shape[1]) & (aux > theta[indices.long()].float())
    return values, indices, aux, counts, active.sum(1, dtype=torch.float32)


@jumprelu_select.register_fake
def _(x, W, b, theta, bandwidth, capacity, guess):
    B, C = x.shape[0], dynamic_capacity(capacity)
    f32, i32 = torch.float32, torch.int32
    return (
        x.new_empty(B, C),
        x.new_empty(B, C, dtype=i32),
        x.new_empty(B, C, dtype=f32),
        x.new_empty(B, dtype=i32),
        x.new_empty(B, dtype=f32),
    )


def _setup(ctx, inputs, output):
    x, W, b, theta, bandwidth, *_ = inputs
    _, indices, aux, counts, _ = output
    ctx.mark_non_differentiable(aux)
    ctx.save_for_backward(x, W, theta, indices, aux, counts)
    ctx.has_bias = b is not None
    ctx.bandwidth = bandwidth


def _backward(ctx, grad_values, _gi, _ga, _gc, grad_l0):
    x, W, theta, indices, aux, counts = ctx.saved_tensors
    eps = ctx.bandwidth
    slots = filled(counts, aux.shape[1])
    th = theta[indices.long()].float()
    grad_values = torch.zeros_like(aux) if grad_values is None else grad_values
    dz = torch.where(slots & (aux > th), grad_values, 0.0)
    grad_x, grad_W, grad_b = encoder_grads(ctx, dz, indices, x, W)
    grad_theta = None
    if ctx.needs_input_grad[3]:
        band = slots & ((aux - th).abs() < eps / 2)
        dtheta = -(th / eps) * grad_values.float()
        if grad_l0 is not None:
            dtheta = dtheta - grad_l0.float()[:, None] / eps
        dtheta = torch.where(band, dtheta, 0.0)
        grad_theta = latent_sums(dtheta[..., None], indices, W.shape[0])[:, 0].to(theta.dtype)
    return grad_x, grad_W, grad_b, grad_theta, None, None, None


jumprelu_select.register_autograd(_backward, setup_context=_setup)


def jumprelu_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    threshold: torch.Tensor,
    *,
    bandwidth: float,
    b_dec: torch.Tensor | None = None,
    capacity: int | None = None,
    hints: EncodeHints | None = None,
) -> JumpReLUCode:
    """f = z * H(z - threshold), z = (x - b_dec) W_enc^T + b_enc, with straight-through threshold gradients.

    x: [B, d]; W_enc: [n, d]; b_enc: [n] or None; threshold: [n]; b_dec: [d] or None; bandwidth: the
    rectangle kernel's width eps > 0. Returns JumpReLUCode(values [B, C], indices [B, C], l0 [B]); C counts
    active and band entries (slots by latent id, then empty ones). capacity and hints as in relu_encode
    (no dense layout). Differentiable in x, W_enc, b_enc, threshold and b_dec.
    """
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not 0 < bandwidth < 1e30:
        raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}")
    if not isinstance(threshold, torch.Tensor):
        raise TypeError(f"threshold must be a torch.Tensor, got {type(threshold).__name__}")
    validate.capacity(capacity)
    hints = validate.hints(hints)
    x = validate.encoder(x, "W_enc", W_enc, [("b_enc", b_enc), ("threshold", threshold)], b_dec)
    values, indices, _, counts, l0 = jumprelu_select(
        x, W_enc, b_enc, threshold, float(bandwidth), capacity or 0, hints.capacity
    )
    observe(hints, counts, capacity)
    return JumpReLUCode(values, indices, l0)
