"""TopK SAE (Gao et al., "Scaling and evaluating sparse autoencoders") and BatchTopK SAE (Bussmann et al.).

TopK:       f = TopK_k(ReLU(z)),  z = (x - b_dec) W_enc^T + b_enc
BatchTopK:  training: the B k largest entries of ReLU(Z) over the batch; inference: f = z H(z - theta)
            with one global threshold theta, an EMA of the smallest kept value (updated in training mode)
AuxK:       e = sg(y - y_hat); e_hat = TopK_aux(z over the dead latents) W_dec;
            aux = ||e - e_hat||^2 / ||e - mean(e)||^2 (sums over the batch)
rescale_acts_by_decoder_norm (SAELens): z_i is multiplied by ||W_dec,i|| before the selection and f_i divided
            by it before decoding, i.e. the model runs with its decoder norms folded in (`_weights`).
"""

from __future__ import annotations

import torch

import kernels
from kernels import SparseCode, validate

from . import metrics
from .base import SAE


class TopKSAE(SAE):
    """z = (x - b_dec) W_enc^T + b_enc; f = TopK_k(ReLU(z)); x_hat = f W_dec + b_dec.

    Runs the fused encoder, so no [B, d_sae] tensor is ever formed in forward or backward (AuxK included).
    Trainer knobs: aux_k (dead latents per token in AuxK, default d_in // 2), aux_coeff (default 1/32).
    """

    name = "topk"  # the key in sae.registry.ARCHITECTURES
    architecture = "topk"

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        *,
        aux_k: int | None = None,
        aux_coeff: float = 1 / 32,
        rescale_acts_by_decoder_norm: bool = False,
        **kw,
    ):
        super().__init__(d_in, d_sae, **kw)
        validate.k_of(k, d_sae, n_name="d_sae")
        self.k = k
        self.aux_k = max(1, d_in // 2) if aux_k is None else aux_k
        self.aux_coeff = aux_coeff
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(W_enc, b_enc, W_dec) as the kernels see them: with rescale_acts_by_decoder_norm, the decoder
        norms n folded in (W_enc n, b_enc n, W_dec / n), differentiably; else the parameters."""
        if not self.rescale_acts_by_decoder_norm:
            return self.W_enc, self.b_enc, self.W_dec
        norms = self.W_dec.norm(dim=1, keepdim=True)
        b = None if self.b_enc is None else self.b_enc * norms[:, 0]
        return self.W_enc * norms, b, self.W_dec / norms

    def _encode(self, xn: torch.Tensor) -> SparseCode:
        W, b, _ = self._weights()
        return kernels.topk_encode(xn, W, b, self.k, b_dec=self._centre())

    def decode(self, code: SparseCode) -> torch.Tensor:
        return kernels.sparse_decode(code, self._weights()[2], self.b_dec)

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
        W_enc, b_enc, W_dec = self._weights()
        b = None if b_enc is None else b_enc[dead]
        code = kernels.topk_encode(xn, W_enc[dead], b, k_aux, b_dec=self._centre())
        code = SparseCode(code.values, dead[code.indices.long()].to(torch.int32))
        return metrics.fvu(residual, kernels.sparse_decode(code, W_dec, None))

    def saelens_fields(self) -> dict:
        return {"k": self.k, "rescale_acts_by_decoder_norm": self.rescale_acts_by_decoder_norm}

    @classmethod
    def config_from_saelens(cls, cfg: dict) -> dict:
        k = cfg.get("k")
        if not isinstance(k, (int, float)) or isinstance(k, bool) or k != int(k):
            raise ValueError(f"SAELens cfg field k={k!r}: expected a whole number of latents")
        return {"k": int(k), "rescale_acts_by_decoder_norm": bool(cfg.get("rescale_acts_by_decoder_norm", False))}

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """As SAE.fold_decoder_norms; exact under rescale_acts_by_decoder_norm, which it then turns off."""
        super().fold_decoder_norms()
        self.rescale_acts_by_decoder_norm = False

    def config(self) -> dict:
        return {
            **super().config(),
            "k": self.k,
            "aux_k": self.aux_k,
            "aux_coeff": self.aux_coeff,
            "rescale_acts_by_decoder_norm": self.rescale_acts_by_decoder_norm,
        }

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
    file_names = {"threshold": "topk_threshold"}

    def __init__(self, d_in: int, d_sae: int, k: int, *, threshold_beta: float = 0.999, **kw):
        super().__init__(d_in, d_sae, k, **kw)
        self.threshold_beta = threshold_beta
        self.register_buffer("threshold", torch.tensor(-1.0, device=self.device))

    def _encode(self, xn: torch.Tensor) -> SparseCode:
        W, b, _ = self._weights()
        if self.training or float(self.threshold) < 0:
            code = kernels.batch_topk_encode(xn, W, b, self.k, b_dec=self._centre(), hints=self.hints)
            if self.training:
                self._update_threshold(code.values)
            return code
        theta = float(self.threshold)
        return kernels.batch_topk_inference(xn, W, b, theta, b_dec=self._centre(), hints=self.hints)

    @torch.no_grad()
    def _update_threshold(self, values: torch.Tensor) -> None:
        """EMA of the smallest kept value, without a host sync."""
        v = values.detach().float()
        low = torch.where(v > 0, v, float("inf")).min() if v.numel() else v.new_tensor(float("inf"))
        t = self.threshold.float()
        ema = torch.where(t < 0, low, self.threshold_beta * t + (1 - self.threshold_beta) * low)
        self.threshold.copy_(torch.where(torch.isfinite(low), ema, t))

    @torch.no_grad()
    def fold_act_scale(self) -> None:
        """As SAE.fold_act_scale; under rescale_acts_by_decoder_norm the folded decoder norms shrink the
        compared values by act_scale, so a learned threshold shrinks with them."""
        c = self.act_scale
        super().fold_act_scale()
        if self.rescale_acts_by_decoder_norm:
            self.threshold.copy_(torch.where(self.threshold >= 0, self.threshold / c, self.threshold))

    def config(self) -> dict:
        return {**super().config(), "threshold_beta": self.threshold_beta}

    def saelens_fields(self) -> dict:  # SAELens's EMA: t <- (1 - lr) t + lr * smallest kept value
        return {**super().saelens_fields(), "topk_threshold_lr": round(1 - self.threshold_beta, 12)}

    @classmethod
    def config_from_saelens(cls, cfg: dict) -> dict:
        return {**super().config_from_saelens(cfg), "threshold_beta": 1 - float(cfg.get("topk_threshold_lr", 0.01))}
