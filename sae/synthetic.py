"""Ground truth: activations built from known features in superposition, and how well an SAE recovers them.

x = sum_i a_i F_i + noise, with F: [n_features, d] random unit vectors (n_features > d: superposition),
a_i > 0 when feature i fires. Feature i fires with probability p_i (sum_i p_i = the true L0); firing is
correlated through a Gaussian copula: z = sqrt(1 - c) e + sqrt(c) G u with G [n_features, rank] of unit
rows, and feature i fires when z_i > Phi^-1(1 - p_i), so the marginals, and so the true L0, stay exact.
"""

from __future__ import annotations

import torch

from .data import Source


class SyntheticActivations:
    """A fixed random generator of activations with known features.

    d: dimension; n_features: number of true features; l0: expected active features per token;
    correlation: c in [0, 1), how strongly the features of a random low-rank structure co-fire;
    magnitude_std: a_i ~ |N(1, magnitude_std)|; noise: std of isotropic Gaussian noise per dimension;
    decay: firing probabilities fall linearly from `decay` times the smallest to the smallest;
    exact_l0: every token has exactly round(l0) active features (those with the largest z_i - Phi^-1(1 - p_i));
    orthogonal: orthonormal features (needs n_features <= d; no superposition, the dictionary's c_dec is 0).
    """

    def __init__(
        self,
        d: int,
        n_features: int,
        l0: float,
        *,
        correlation: float = 0.0,
        rank: int | None = None,
        magnitude_std: float = 0.2,
        noise: float = 0.0,
        decay: float = 3.0,
        exact_l0: bool = False,
        orthogonal: bool = False,
        seed: int = 0,
    ):
        if not 0 < l0 < n_features:
            raise ValueError(f"l0 must be in (0, n_features={n_features}), got {l0}")
        if not 0 <= correlation < 1:
            raise ValueError(f"correlation must be in [0, 1), got {correlation}")
        g = torch.Generator().manual_seed(seed)
        self.d, self.n_features, self.l0 = d, n_features, l0
        self.correlation, self.magnitude_std, self.noise = correlation, magnitude_std, noise
        self.exact_l0 = round(l0) if exact_l0 else None
        if orthogonal and n_features > d:
            raise ValueError(f"orthogonal features need n_features <= d, got {n_features} > {d}")
        F = torch.randn(n_features, d, generator=g)
        F = torch.linalg.qr(F.T).Q.T if orthogonal else F
        self.features = F / F.norm(dim=1, keepdim=True)
        p = torch.linspace(decay, 1.0, n_features)
        self.probs = (p * l0 / p.sum()).clamp(max=0.99)
        self.thresholds = torch.special.ndtri(1 - self.probs)
        G = torch.randn(n_features, rank or max(1, n_features // 8), generator=g)
        self.G = G / G.norm(dim=1, keepdim=True)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n tokens -> (x [n, d], true activations [n, n_features]), fp32 on CPU."""
        c = self.correlation
        z = torch.randn(n, self.n_features, generator=generator) * (1 - c) ** 0.5
        if c > 0:
            z += c**0.5 * torch.randn(n, self.G.shape[1], generator=generator) @ self.G.T
        mags = (1 + self.magnitude_std * torch.randn(n, self.n_features, generator=generator)).abs()
        if self.exact_l0 is None:
            fire = z > self.thresholds
        else:
            top = (z - self.thresholds).topk(self.exact_l0, dim=1).indices
            fire = torch.zeros_like(z, dtype=torch.bool).scatter_(1, top, True)
        acts = torch.where(fire, mags, 0.0)
        x = acts @ self.features
        if self.noise > 0:
            x += self.noise * torch.randn(n, self.d, generator=generator)
        return x, acts


class SyntheticSource(Source):
    """An endless stream of [batch_size, d] batches from a SyntheticActivations; batch i depends only on
    (seed, i), so the position is one integer and a resumed stream continues exactly."""

    def __init__(self, generator: SyntheticActivations, batch_size: int, *, seed: int = 0):
        self.gen, self.batch_size, self.seed = generator, batch_size, seed
        self.d_in = generator.d
        self.batch = 0

    def _rng(self, i: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + i)

    def next_batch(self) -> torch.Tensor:
        x, _ = self.gen.sample(self.batch_size, self._rng(self.batch))
        self.batch += 1
        return x

    def sample(self, n: int) -> torch.Tensor:
        return self.gen.sample(n, self._rng(-1 - self.seed))[0]

    def state_dict(self) -> dict:
        return {"batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.batch = state["batch"]


@torch.no_grad()
def feature_recovery(W_dec: torch.Tensor, features: torch.Tensor, *, one_to_one: bool = False) -> float:
    """Mean over true features of the best |cos| with a learned decoder row (MMCS).

    W_dec: [n, d]; features: [n_features, d]. With one_to_one, rows are matched greedily (highest |cos|
    pair first, each row and feature used once) before averaging, so one row cannot explain two features.
    """
    A = W_dec.detach().float().cpu()
    A = A / A.norm(dim=1, keepdim=True).clamp_min(1e-12)
    Fn = features.float() / features.float().norm(dim=1, keepdim=True)
    cos = (Fn @ A.T).abs()  # [n_features, n]
    if not one_to_one:
        return cos.max(dim=1).values.mean().item()
    order = cos.reshape(-1).argsort(descending=True)
    used_f, used_r, total = set(), set(), 0.0
    for flat in order.tolist():
        f, r = divmod(flat, cos.shape[1])
        if f in used_f or r in used_r:
            continue
        used_f.add(f)
        used_r.add(r)
        total += cos[f, r].item()
        if len(used_f) == min(cos.shape):
            break
    return total / cos.shape[0]
