"""TopK SAE (Gao et al., "Scaling and evaluating sparse autoencoders") and BatchTopK SAE (Bussmann et al.).

TopK:       f = TopK_k(ReLU(z)),  z = (x - b_dec) W_enc^T + b_enc
BatchTopK:  training: the B k largest entries of ReLU(Z) over the batch; inference: f = z H(z - theta)
            with one global threshold theta, an EMA of the smallest kept value (updated in training mode)
AuxK:       e = sg(y - y_hat); e_hat = TopK_aux(z over the dead latents) W_dec;
            aux = ||e - e_hat||^2 / ||e - mean(e)||^2 (sums over the batch)
"""

from __future__ import annotations

import torch

import kernels
from kernels import SparseCode

from .base import SAE


def _check_k(k, d_sae: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= d_sae:
        raise ValueError(f"k must be an int in [1, d_sae={d_sae}], got {k!r}")


class TopKSAE(SAE):
    """z = (x - b_dec) W_enc^T + b_enc; f = TopK_k(ReLU(z)); x_hat = f W_dec + b_dec.

    Runs the fused encoder, so no [B, d_sae] tensor is ever formed in forward or backward (AuxK included).
    Trainer knobs: aux_k (dead latents per token in AuxK, default d_in // 2), aux_coeff (default 1/32).
    """

    name = "topk"  # the key in sae.registry.ARCHITECTURES
    architecture = "topk"

    def __init__(self, d_in: int, d_sae: int, k: int, *, aux_k: int | None = None, aux_coeff: float = 1 / 32, **kw):
        super().__init__(d_in, d_sae, **kw)
        _check_k(k, d_sae)
        self.k = k
        self.aux_k = max(1, d_in // 2) if aux_k is None else aux_k
        self.aux_coeff = aux_coeff

    def _encode(self, xn: torch.Tensor) -> SparseCode:
        return kernels.topk_encode(xn, self.W_enc, self.b_enc, self.k, b_dec=self._centre())

    def _add_losses(self, parts, *, xn, y, y_hat, dead_mask, **_):
        if dead_mask is None:
            return
        aux = self.aux_loss(xn, (y - y_hat).detach(), dead_mask)
        parts["aux"] = aux
        parts["loss"] = parts["loss"] + self.aux_coeff * aux

    def aux_loss(self, xn: torch.Tensor, residual: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor:
        """AuxK: the top aux_k dead latents of each token reconstruct `residual` [B, d_out].

        The fused encoder runs on the dead latents' encoder rows only (selected by index), so no
        [B, d_sae] tensor is formed. 0 when no latent is dead.
        """
        if not isinstance(dead_mask, torch.Tensor) or dead_mask.shape != (self.d_sae,):
            raise ValueError(f"dead_mask must be a [d_sae={self.d_sae}] bool tensor")
        dead = dead_mask.to(self.device).nonzero().squeeze(1)
        if dead.numel() == 0:
            return residual.new_zeros((), dtype=torch.float32)
        k_aux = min(self.aux_k, dead.numel())
        b = None if self.b_enc is None else self.b_enc[dead]
        code = kernels.topk_encode(xn, self.W_enc[dead], b, k_aux, b_dec=self._centre())
        code = SparseCode(code.values, dead[code.indices.long()].to(torch.int32))
        e_hat = kernels.sparse_decode(code, self.W_dec, None)
        return (e_hat.float() - residual.float()).pow(2).sum() / self._variance(residual)

    def config(self) -> dict:
        return {**super().config(), "k": self.k}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


class BatchTopKSAE(TopKSAE):
    """BatchTopK: the B k largest entries of ReLU(z) over the batch in training mode; in eval mode a
    JumpReLU with the global `threshold` buffer (an EMA of the smallest kept value, momentum
    threshold_beta, updated by every training-mode encode). Until a threshold is learned (threshold < 0)
    eval mode also selects per batch.
    """

    name = "batchtopk"
    architecture = "batchtopk"

    def __init__(self, d_in: int, d_sae: int, k: int, *, threshold_beta: float = 0.999, **kw):
        super().__init__(d_in, d_sae, k, **kw)
        self.threshold_beta = threshold_beta
        self.register_buffer("threshold", torch.tensor(-1.0, device=self.device))

    def _encode(self, xn: torch.Tensor) -> SparseCode:
        if self.training or float(self.threshold) < 0:
            code = kernels.batch_topk_encode(xn, self.W_enc, self.b_enc, self.k, b_dec=self._centre())
            if self.training:
                self._update_threshold(code.values)
            return code
        return kernels.batch_topk_inference(xn, self.W_enc, self.b_enc, float(self.threshold), b_dec=self._centre())

    @torch.no_grad()
    def _update_threshold(self, values: torch.Tensor) -> None:
        """EMA of the smallest kept value, without a host sync."""
        v = values.detach().float()
        low = torch.where(v > 0, v, float("inf")).min() if v.numel() else v.new_tensor(float("inf"))
        t = self.threshold.float()
        ema = torch.where(t < 0, low, self.threshold_beta * t + (1 - self.threshold_beta) * low)
        self.threshold.copy_(torch.where(torch.isfinite(low), ema, t))

    def config(self) -> dict:
        return {**super().config(), "threshold_beta": self.threshold_beta}
