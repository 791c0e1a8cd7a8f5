"""Exact global selections from every shard's candidates (plain tensor functions, the same on every rank).

Each shard's encoder keeps the best entries of its own latents; the global winners are among them, because a
shard's candidates are its best entries under the same order as the global one:
  TopK:      per row, by value (descending), equal values by the lower global latent id;
  BatchTopK: over the batch, by value, then the lower row, then the lower global id (kernels.batch_topk_encode).
Values are ReLU outputs (>= 0); padding slots carry a negative value and never win.
"""

from __future__ import annotations

import torch


def topk_winners(values: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """values, ids: [B, C] candidates (C >= k, ids int64; padding slots, value < 0, may repeat an id) -> [B, k]
    positions of the k best of each row, best first, equal values by the lower id."""
    by_id = ids.argsort(dim=1)
    order = values.gather(1, by_id).sort(dim=1, descending=True, stable=True).indices
    return by_id.gather(1, order[:, :k])


def batch_topk_cut(values: torch.Tensor, keys: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """values [M] (kept candidates > 0, padding < 0), keys [M] int64 (row * n + global id) -> the m-th best entry
    as (value, key), or None when at most m entries are positive (then all are kept). An entry is kept when it
    is not worse: `kept(v, key, cut)`."""
    if int((values > 0).sum()) <= m:
        return None
    by_key = keys.argsort()
    best = by_key[values[by_key].sort(descending=True, stable=True).indices[m - 1]]
    return values[best], keys[best]


def kept(values: torch.Tensor, keys: torch.Tensor, cut) -> torch.Tensor:
    """Bool mask of the entries that are among the selection bounded by `cut` (from batch_topk_cut)."""
    if cut is None:
        return values > 0
    v, key = cut
    return (values > 0) & ((values > v) | ((values == v) & (keys <= key)))
