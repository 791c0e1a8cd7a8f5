"""Reconstruction and sparsity over a stream of activations, from the sparse codes."""

from __future__ import annotations

import torch

from .. import metrics
from .stream import Acts, encoded


class _Moments:
    """Count, mean [d] and centred sum of squares of a stream of [b, d] batches, merged exactly per batch
    (Chan et al.): sum_t ||x_t - mean||^2 without a second pass. fp64."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        b, mb = x.shape[0], x.mean(0)
        m2b = (x - mb).pow(2).sum().item()
        if self.mean is None:
            self.n, self.mean, self.m2 = b, mb, m2b
            return
        n = self.n + b
        delta = mb - self.mean
        self.m2 += m2b + delta.pow(2).sum().item() * self.n * b / n
        self.mean = self.mean + delta * (b / n)
        self.n = n


@torch.no_grad()
def reconstruction(
    model,
    acts: Acts,
    *,
    targets: Acts | None = None,
    batch_size: int = 4096,
    dense_threshold: float = 0.1,
    bins: int = 20,
    low: float = -8.0,
    progress: bool = False,
) -> dict:
    """Reconstruction and sparsity of `model` on acts ([N, d_in] raw activations, or an iterable of batches).

    mse = (1/N) sum_t ||x_t - x_hat_t||^2 (`sae.metrics.mse`);
    fvu = sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2 (`sae.metrics.fvu`, the mean over the whole
    stream); explained_variance = 1 - sum_j Var(x_j - x_hat_j) / sum_j Var(x_j) (`sae.metrics.explained_variance`);
    l0 = mean active latents per token (`sae.metrics.l0`), l0_histogram[j] = tokens with j active latents;
    dead_fraction = latents that never fired (`sae.metrics.dead_fraction`); dense_fraction = latents firing on
    more than `dense_threshold` of the tokens; density_histogram = `sae.metrics.firing_histogram` of log10
    firing frequency (dead latents in the first bin). firing_counts: [d_sae] int64 tokens per latent.
    targets: [N, d_out] (or batches aligned with acts), what a transcoder's output is compared with instead of x.
    (Gao et al., "Scaling and evaluating sparse autoencoders", and SAELens's evaluations.)
    """
    n = model.d_sae
    counts = torch.zeros(n, dtype=torch.long, device=model.device)
    l0_hist = torch.zeros(1, dtype=torch.long, device=model.device)
    xs, res = _Moments(), _Moments()
    err = l0_sum = 0.0
    if targets is None and model.d_out != model.d_in:
        raise ValueError(f"a transcoder (d_out={model.d_out} != d_in={model.d_in}) is compared with targets: pass them")
    stream = encoded(model, acts, batch_size, decode=True, progress=progress, desc="reconstruction", targets=targets)
    for _, x, code, x_hat, y in stream:
        x = x if y is None else y.to(x.device)
        b = x.shape[0]
        err += metrics.mse(x, x_hat).item() * b
        l0_sum += metrics.l0(code).item() * b
        xs.add(x)
        res.add(x.float() - x_hat.float())
        counts += metrics.firing_counts(code, n)
        per_row = torch.bincount((code.values != 0).sum(-1))
        if per_row.numel() > l0_hist.numel():
            l0_hist = torch.cat([l0_hist, l0_hist.new_zeros(per_row.numel() - l0_hist.numel())])
        l0_hist[: per_row.numel()] += per_row
    N = xs.n
    if N == 0:
        raise ValueError("acts holds no rows")
    ss = max(xs.m2, torch.finfo(torch.float32).tiny)
    hist, edges = metrics.firing_histogram(counts, N, bins=bins, low=low)
    return {
        "tokens": N,
        "mse": err / N,
        "fvu": err / ss,
        "explained_variance": 1 - res.m2 / ss,
        "l0": l0_sum / N,
        "l0_histogram": l0_hist.tolist(),
        "dead_fraction": metrics.dead_fraction(counts),
        "dense_fraction": (counts > dense_threshold * N).float().mean().item(),
        "density_histogram": {"counts": hist.tolist(), "log10_edges": edges.tolist()},
        "firing_counts": counts,
    }
