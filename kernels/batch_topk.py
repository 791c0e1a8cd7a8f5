"""BatchTopK: the B * k largest entries of ReLU(Z) over the whole batch, and its inference form.

Training form, exact and without a [B, n] temporary:
  1. per-row candidates: the top k' of each row with the fused TopK encoder (topk_select);
  2. a global top-(B * k) of the B * k' candidates, ordered by value, then lower row, then lower id;
  3. a check: a row all of whose k' candidates were kept may hold more entries above the global
     threshold, so the selection runs again with twice the candidates (EncodeHints.candidate_factor
     remembers the factor for the caller's next call; the result does not depend on it).
Per row, the kept entries are a prefix of its candidates (both orders agree within a row), so the
code is the candidates cut to the largest kept count. Gradients flow through topk_select's sparse
backward.

Inference form: a JumpReLU with one global threshold theta (an EMA of the smallest kept value).
"""

from __future__ import annotations

import torch

from . import validate
from .code import SparseCode
from .hints import EncodeHints
from .jumprelu import jumprelu_select
from .threshold import observe
from .topk_encode import topk_select
from .torch_ops import KEY_LOW


def _global_keep(values: torch.Tensor, m: int) -> torch.Tensor:
    """values [B, k'] >= 0, rows sorted descending -> [B, k'] bool: the m largest, ties to the lower
    flat position (lower row, then lower latent id), zeros never kept."""
    flat = values.detach().float().reshape(-1)
    if m < flat.numel():
        pos = torch.arange(flat.numel(), device=flat.device)
        keys = (flat.view(torch.int32).to(torch.int64) << 32) | (KEY_LOW - pos)
        keep = keys >= keys.topk(m, sorted=False).values.min()
    else:
        keep = torch.ones_like(flat, dtype=torch.bool)
    return keep.view_as(values) & (values > 0)


def batch_topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    k: int,
    *,
    b_dec: torch.Tensor | None = None,
    hints: EncodeHints | None = None,
) -> SparseCode:
    """f = BatchTopK_{B k}(ReLU((x - b_dec) W_enc^T + b_enc)) as a padded SparseCode.

    x: [B, d]; W_enc: [n, d]; b_enc: [n] or None; b_dec: [d] or None; k: mean active latents per row.
    Returns values [B, C] (x.dtype) and indices [B, C] int32, C the largest kept count of a row; each row
    by value, descending (equal values by lower id), then empty slots (value 0). Exactly the B * k largest
    entries are kept (fewer when fewer are positive); equal values go to the lower row, then the lower id.
    hints: the caller's EncodeHints (candidate_factor; speed only, updated). Differentiable in x, W_enc, b_enc
    and b_dec.
    """
    hints = validate.hints(hints)
    x = validate.encoder(x, "W_enc", W_enc, [("b_enc", b_enc)], b_dec)
    n = W_enc.shape[0]
    validate.k_of(k, n)
    B = x.shape[0]
    kc = min(n, hints.candidate_factor * k)
    while True:
        values, indices = topk_select(x, W_enc, b_enc, kc)
        keep = _global_keep(values, B * k)
        if kc == n or not bool(keep[:, -1].any()):
            break
        kc = min(n, 2 * kc)
        hints.candidate_factor = max(hints.candidate_factor, -(-kc // k))
    C = max(int(keep.sum(1).max()), 1)
    return SparseCode(torch.where(keep, values, 0.0)[:, :C], indices[:, :C])


def batch_topk_inference(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    threshold: float,
    *,
    b_dec: torch.Tensor | None = None,
    capacity: int | None = None,
    hints: EncodeHints | None = None,
) -> SparseCode:
    """BatchTopK at inference: f = z * H(z - threshold) with one global threshold >= 0 (a JumpReLU).

    Shapes, capacity and hints as in relu_encode (slots by latent id, no dense layout).
    """
    threshold = float(threshold)
    if not 0 <= threshold < float("inf"):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    validate.capacity(capacity)
    hints = validate.hints(hints)
    x = validate.encoder(x, "W_enc", W_enc, [("b_enc", b_enc)], b_dec)
    theta = torch.full((W_enc.shape[0],), threshold, dtype=x.dtype, device=x.device)
    validate.finite("threshold", theta)
    values, indices, _, counts, _ = jumprelu_select(x, W_enc, b_enc, theta, 0.0, capacity or 0, hints.capacity)
    observe(hints, counts, capacity)
    return SparseCode(values, indices)
