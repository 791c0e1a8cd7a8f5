"""SAE metrics (DESIGN section 5): reconstruction, sparsity, dead latents and decoder geometry.

Everything that scales with the dictionary size n works from the sparse code or in blocks of latents, so
2^20 latents fit: no [B, n] or [n, n] tensor is formed.
"""

from __future__ import annotations

import torch

from kernels import SparseCode

_TINY = torch.finfo(torch.float32).tiny


def l0(code: SparseCode) -> torch.Tensor:
    """Mean active latents per row (nonzero values; empty capacity slots hold 0)."""
    return (code.values != 0).sum(-1).float().mean()


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ||x - x_hat||^2. x, x_hat: [B, d]."""
    return (x_hat.float() - x.float()).pow(2).sum(-1).mean()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2. x, x_hat: [B, d]."""
    x = x.float()
    err = (x_hat.float() - x).pow(2).sum()
    return err / (x - x.mean(0)).pow(2).sum().clamp_min(_TINY)


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """1 - sum_j Var(x_j - x_hat_j) / sum_j Var(x_j): like 1 - FVU, but blind to a constant offset."""
    x, r = x.float(), x.float() - x_hat.float()
    return 1 - (r - r.mean(0)).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(_TINY)


def firing_counts(code: SparseCode, n: int) -> torch.Tensor:
    """[n] int64: how many rows of the code each latent is active in."""
    active = code.values != 0
    return torch.bincount(code.indices[active].long(), minlength=n)


def dead_fraction(counts: torch.Tensor) -> float:
    """Fraction of latents that never fired. counts: [n] from `firing_counts` (summed over batches)."""
    return (counts == 0).float().mean().item()


def firing_histogram(
    counts: torch.Tensor, tokens: int, bins: int = 20, low: float = -8.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of log10 firing frequency (counts / tokens) over [low, 0]; dead latents fall in the first bin.

    Returns (hist [bins] int64, edges [bins + 1]).
    """
    freq = (counts.double() / max(tokens, 1)).clamp_min(10**low)
    hist = torch.histc(freq.log10().float(), bins=bins, min=low, max=0.0).long()
    return hist, torch.linspace(low, 0.0, bins + 1)


def c_dec_latents(n: int, max_latents: int, seed: int = 0) -> torch.Tensor:
    """The latent ids [min(n, max_latents)] on which c_dec estimates its mean: all n, or a seeded random subset."""
    if n <= max_latents:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_latents]


def c_dec(W_dec: torch.Tensor, *, block: int = 4096, max_latents: int | None = None, seed: int = 0) -> float:
    """Mean over pairs i < j of |cos(W_dec,i, W_dec,j)| ("Sparse but Wrong"), in blocks of `block` latents.

    W_dec: [n, d]. Memory is O(block^2 + n d). With max_latents < n, the mean is estimated on a random subset.
    """
    W = W_dec.detach().float()
    if max_latents is not None and W.shape[0] > max_latents:
        W = W[c_dec_latents(W.shape[0], max_latents, seed).to(W.device)]
    n = W.shape[0]
    if n < 2:
        raise ValueError(f"c_dec needs at least 2 decoder rows, got {n}")
    W = W / W.norm(dim=1, keepdim=True).clamp_min(_TINY)
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    for a in range(0, n, block):
        Wa = W[a : a + block]
        for b in range(a, n, block):
            cos = (Wa @ W[b : b + block].T).abs()
            if a == b:  # pairs i < j inside the diagonal block
                cos = cos.triu(1)
            total += cos.sum(dtype=torch.float64)
    return (total / (n * (n - 1) / 2)).item()


def nth_decoder_projection(
    x: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None, n: int, *, block: int = 8192
) -> float:
    """ "Sparse but Wrong"'s n-th decoder projection score.

    The projections (x - b_dec) W_dec^T [B, n_latents] are ranked over the whole batch, and the score is the
    (n B)-th largest (0-based), i.e. the value above which each row has n entries on average. Computed in
    blocks of latents with a running top-(n B + 1), so no [B, n_latents] tensor is formed.
    x: [B, d]; W_dec: [n_latents, d]; b_dec: [d] or None.
    """
    B, m = x.shape[0], W_dec.shape[0]
    if not 0 <= n < m:
        raise ValueError(f"n must be in [0, n_latents={m}), got {n}")
    xc = x.detach().float() - (0 if b_dec is None else b_dec.detach().float())
    keep = n * B + 1
    best = xc.new_empty(0)
    for a in range(0, m, block):
        proj = (xc @ W_dec[a : a + block].detach().float().T).reshape(-1)
        both = torch.cat([best, proj])
        best = both.topk(min(keep, both.numel())).values
    return best.min().item()


@torch.no_grad()
def evaluate(model, x: torch.Tensor, *, target: torch.Tensor | None = None, batch_size: int = 4096) -> dict[str, float]:
    """Reconstruction and sparsity of `model` (an SAE, through `model.run`) on x [N, d_in], in batches; the
    reconstruction is measured against target [N, d_out] (transcoders) or x.

    Returns mse, fvu, explained_variance, l0 and dead_fraction (latents that never fired on x).
    """
    x = x.reshape(-1, model.d_in)
    y = x if target is None else target.reshape(-1, model.d_out)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"target must have one row per row of x ({x.shape[0]}), got shape {tuple(target.shape)}")
    counts = torch.zeros(model.d_sae, dtype=torch.long, device=x.device)
    mean = y.float().mean(0)
    err = sq = l0_sum = res_sq = 0.0
    res_sum = torch.zeros(y.shape[1], dtype=torch.float64, device=x.device)
    for a in range(0, x.shape[0], batch_size):
        xb, yb = x[a : a + batch_size], y[a : a + batch_size]
        code, x_hat = model.run(xb)
        r = yb.float() - x_hat.float()
        err += r.pow(2).sum().item()
        sq += (yb.float() - mean).pow(2).sum().item()
        res_sum += r.sum(0, dtype=torch.float64)
        res_sq += r.double().pow(2).sum().item()
        l0_sum += (code.values != 0).sum().item()
        counts += firing_counts(code, model.d_sae)
    N = x.shape[0]
    res_var = res_sq - res_sum.pow(2).sum().item() / N
    sq = max(sq, _TINY)
    return {
        "mse": err / N,
        "fvu": err / sq,
        "explained_variance": 1 - res_var / sq,
        "l0": l0_sum / N,
        "dead_fraction": dead_fraction(counts),
    }


def geometric_median(x: torch.Tensor, *, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: argmin_m sum_i ||x_i - m||. x: [N, d] -> [d] (fp32)."""
    x = x.float()
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        done = (new - m).norm() <= tol * max(m.norm().item(), 1.0)
        m = new
        if done:
            break
    return m


__all__ = [
    "c_dec",
    "dead_fraction",
    "evaluate",
    "explained_variance",
    "firing_counts",
    "firing_histogram",
    "fvu",
    "geometric_median",
    "l0",
    "mse",
    "nth_decoder_projection",
]
