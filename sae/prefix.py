"""Nested-prefix SAEs on a BatchTopK encoder: Matryoshka (Bussmann et al.; Nabeshima) and Ordered
("Enforcing Orderedness to Improve Feature Consistency").

    loss = sum over prefix sizes m of w_m ||y - x_hat_m||^2 (mean over tokens) [+ aux_coeff AuxK],
    x_hat_m the reconstruction from the latents i < m

All prefix reconstructions come from cumulative sums over each token's active latents (kernels.prefix_losses),
O(k d) per token, never one decode per prefix.
"""

from __future__ import annotations

import torch

import kernels

from .topk import BatchTopKSAE


class _PrefixSAE(BatchTopKSAE):
    """BatchTopK encoder, prefix loss; subclasses give the weight of every prefix size (`_size_weights`)."""

    def _size_weights(self) -> torch.Tensor:
        """[d_sae] fp32: the weight of prefix size m at m - 1."""
        raise NotImplementedError

    def _add_losses(self, parts, *, xn, y, code, **ctx):
        target = y if self.W_skip is None else y - xn @ self.W_skip.T
        weights = self._size_weights().to(self.device)
        W_dec = self._weights()[2]
        prefix = kernels.prefix_losses(code, W_dec, self.b_dec, target.to(self.dtype), weights).mean()
        parts["prefix"] = prefix
        parts["loss"] = prefix
        super()._add_losses(parts, xn=xn, y=y, code=code, **ctx)


class MatryoshkaSAE(_PrefixSAE):
    """Nested dictionaries: prefix sizes `prefixes` (increasing, the last = d_sae) with `prefix_weights`
    (default: equal weights summing to 1). Both plain attributes a trainer may change between steps."""

    name = "matryoshka"
    architecture = "matryoshka_batchtopk"

    def __init__(self, d_in: int, d_sae: int, k: int, *, prefixes, prefix_weights=None, **kw):
        super().__init__(d_in, d_sae, k, **kw)
        self.prefixes = [int(m) for m in prefixes]
        self.prefix_weights = (
            [1.0 / len(self.prefixes)] * len(self.prefixes) if prefix_weights is None else list(prefix_weights)
        )
        self._size_weights()  # validates

    def _size_weights(self) -> torch.Tensor:
        p, w = self.prefixes, self.prefix_weights
        if not p or p[-1] != self.d_sae or any(a >= b for a, b in zip(p, p[1:])) or p[0] < 1:
            raise ValueError(f"prefixes must increase from >= 1 to d_sae={self.d_sae}, got {p}")
        if len(w) != len(p):
            raise ValueError(f"prefix_weights needs one weight per prefix ({len(p)}), got {len(w)}")
        out = torch.zeros(self.d_sae, dtype=torch.float32)
        out[torch.tensor(p) - 1] = torch.tensor(w, dtype=torch.float32)
        return out

    def config(self) -> dict:
        return {**super().config(), "prefixes": self.prefixes, "prefix_weights": self.prefix_weights}

    def saelens_fields(self) -> dict:
        return {**super().saelens_fields(), "matryoshka_widths": self.prefixes}

    @classmethod
    def config_from_saelens(cls, cfg: dict) -> dict:
        """SAELens adds every level's loss with weight 1 and appends d_sae as the last width if missing."""
        widths = [int(w) for w in cfg.get("matryoshka_widths", [])]
        if not widths or widths[-1] != cfg["d_sae"]:
            widths.append(int(cfg["d_sae"]))
        return {**super().config_from_saelens(cfg), "prefixes": widths, "prefix_weights": [1.0] * len(widths)}


class OrderedSAE(_PrefixSAE):
    """Every prefix size m = 1..d_sae, with weights `prefix_weights` ([d_sae] fp32 buffer, p(m) at m - 1;
    default uniform 1 / d_sae), so that earlier latents carry the coarser features in a fixed order. The
    weights are a tensor, so they travel with the model's tensors, not with config()."""

    name = "ordered"
    architecture = "ordered"  # SAELens has no ordered SAE: saved in our layout

    def __init__(self, d_in: int, d_sae: int, k: int, *, prefix_weights=None, **kw):
        super().__init__(d_in, d_sae, k, **kw)
        w = torch.full((d_sae,), 1.0 / d_sae) if prefix_weights is None else torch.as_tensor(prefix_weights)
        if w.shape != (d_sae,):
            raise ValueError(f"prefix_weights must have shape ({d_sae},), got {tuple(w.shape)}")
        self.register_buffer("prefix_weights", w.to(torch.float32).to(self.device))

    def _size_weights(self) -> torch.Tensor:
        return self.prefix_weights
