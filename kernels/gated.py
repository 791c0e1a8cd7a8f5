"""Gated encoder: one matrix product serves both paths, through the fused threshold kernel (threshold.py).

    u = x W^T,  pi_g = u + b_gate,  pi_m = exp(r_mag) * u + b_mag,  f = 1[pi_g > 0] ReLU(pi_m)

Slots are the set pi_g > 0; the code carries f and gate = ReLU(pi_g) on the same slots. The Heaviside passes
no gradient; every term of the gated loss lives on the slots, so the backward is sparse and deterministic.
"""

from __future__ import annotations

import torch

from . import validate
from .code import GatedCode
from .hints import EncodeHints
from .sparse_decode import encoder_grads
from .threshold import dynamic_capacity, filled, latent_sums, observe, threshold_select
from .torch_ops import GATED


@torch.library.custom_op("sae_kernels::gated_select", mutates_args=())
def gated_select(
    x: torch.Tensor,
    W: torch.Tensor,
    b_gate: torch.Tensor,
    r_mag: torch.Tensor,
    b_mag: torch.Tensor,
    capacity: int,
    guess: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gated encoder on the set pi_g > 0: (f [B, C], pi_g [B, C], indices [B, C] int32,
    pi_m [B, C] fp32, counts [B] int32), slots by latent id. capacity and guess as in jumprelu_select."""
    x, W, b_gate, r_mag, b_mag = (validate.row_major(t) for t in (x, W, b_gate, r_mag, b_mag))
    values, gate, aux, indices, counts = threshold_select(GATED, x, W, b_gate, None, r_mag, b_mag, 0.0, capacity, guess)
    return values, gate, indices, aux, counts


@gated_select.register_fake
def _(x, W, b_gate, r_mag, b_mag, capacity, guess):
    B, C = x.shape[0], dynamic_capacity(capacity)
    return (
        x.new_empty(B, C),
        x.new_empty(B, C),
        x.new_empty(B, C, dtype=torch.int32),
        x.new_empty(B, C, dtype=torch.float32),
        x.new_empty(B, dtype=torch.int32),
    )


def _setup(ctx, inputs, output):
    x, W, b_gate, r_mag, b_mag, *_ = inputs
    _, _, indices, aux, counts = output
    ctx.mark_non_differentiable(aux)
    ctx.save_for_backward(x, W, r_mag, b_mag, indices, aux, counts)
    ctx.has_bias = False  # b_gate's gradient is not du's sum


def _backward(ctx, grad_f, grad_gate, _gi, _ga, _gc):
    """With u = x W^T: df/du = exp(r_mag) 1[pi_m > 0], df/dr_mag = (pi_m - b_mag) 1[pi_m > 0],
    df/db_mag = 1[pi_m > 0], dgate/du = dgate/db_gate = 1 (pi_g > 0 on every kept slot)."""
    x, W, r_mag, b_mag, indices, aux, counts = ctx.saved_tensors
    slots = filled(counts, aux.shape[1])
    ids = indices.long()
    zero = torch.zeros_like(aux)
    g_m = torch.where(slots & (aux > 0), zero if grad_f is None else grad_f.float(), 0.0)  # dL/dpi_m
    g_g = torch.where(slots, zero if grad_gate is None else grad_gate.float(), 0.0)  # dL/dpi_g
    du = g_m * torch.exp(r_mag[ids].float()) + g_g
    grad_x, grad_W, _ = encoder_grads(ctx, du, indices, x, W)
    grad_b_gate = grad_r = grad_b_mag = None
    if any(ctx.needs_input_grad[2:5]):
        cols = torch.stack([g_g, g_m * (aux - b_mag[ids].float()), g_m], -1)
        sums = latent_sums(cols, indices, W.shape[0])
        grad_b_gate, grad_r, grad_b_mag = (s.to(r_mag.dtype) for s in sums.unbind(1))
    return grad_x, grad_W, grad_b_gate, grad_r, grad_b_mag, None, None


gated_select.register_autograd(_backward, setup_context=_setup)


def gated_encode(
    x: torch.Tensor,
    W_gate: torch.Tensor,
    b_gate: torch.Tensor,
    r_mag: torch.Tensor,
    b_mag: torch.Tensor,
    *,
    b_dec: torch.Tensor | None = None,
    capacity: int | None = None,
    hints: EncodeHints | None = None,
) -> GatedCode:
    """The gated SAE encoder, one matrix product for both paths (x' = x - b_dec):

        pi_g = x' W_gate^T + b_gate,  pi_m = exp(r_mag) * (x' W_gate^T) + b_mag,  f = 1[pi_g > 0] ReLU(pi_m)

    x: [B, d]; W_gate: [n, d]; b_gate, r_mag, b_mag: [n]; b_dec: [d] or None. Returns GatedCode(values = f,
    indices, gate = ReLU(pi_g)), each [B, C], on the slots pi_g > 0 by latent id. The Heaviside passes no
    gradient (f reaches the gate only through the losses on `gate`). capacity and hints as in relu_encode
    (no dense layout).
    """
    vectors = [("b_gate", b_gate), ("r_mag", r_mag), ("b_mag", b_mag)]
    for name, t in vectors:
        if t is None:
            raise TypeError(f"{name} must be a torch.Tensor, got None")
    validate.capacity(capacity)
    hints = validate.hints(hints)
    x = validate.encoder(x, "W_gate", W_gate, vectors, b_dec)
    values, gate, indices, _, counts = gated_select(x, W_gate, b_gate, r_mag, b_mag, capacity or 0, hints.capacity)
    observe(hints, counts, capacity)
    return GatedCode(values, indices, gate)
