"""Threshold-activation SAEs: ReLU (with L_p penalty, p-annealing), JumpReLU (Rajamanoharan et al., 2024)
and gated (Rajamanoharan et al., 2024). DESIGN section 5 has the math.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels import SparseCode

from .base import SAE


class ReLUSAE(SAE):
    """f = ReLU(z); loss = ||y - y_hat||^2 + l1_coeff * sum_i f_i^p ||W_dec,i|| (mean over tokens).

    Trainer knobs: l1_coeff, p (the penalty exponent, for p-annealing). While most latents fire (as at
    init) the encoder returns every latent (code.k == d_sae) and decode is a dense matmul.
    """

    name = "relu"
    architecture = "standard"
    saelens_aliases = ("transcoder", "skip_transcoder")

    def __init__(self, d_in: int, d_sae: int, *, l1_coeff: float = 1.0, p: float = 1.0, **kw):
        super().__init__(d_in, d_sae, **kw)
        self.l1_coeff = l1_coeff
        self.p = p

    def _encode(self, xn: torch.Tensor) -> SparseCode:
        return kernels.relu_encode(xn, self.W_enc, self.b_enc, b_dec=self._centre(), hints=self.hints)

    def decode(self, code: SparseCode) -> torch.Tensor:
        if code.k != self.d_sae:
            return super().decode(code)
        # The dense layout (every latent a slot): one matmul.
        return torch.addmm(self.b_dec, code.to_dense(self.d_sae).to(self.dtype), self.W_dec)

    def penalty(self, code: SparseCode, p: float) -> torch.Tensor:
        """Un-scaled L_p penalty: mean over tokens of sum_i f_i^p ||W_dec,i|| (fp32 scalar)."""
        v = code.values.float()
        active = v > 0
        powered = torch.where(active, torch.where(active, v, 1.0) ** p, 0.0)  # no inf gradient at 0 for p < 1
        norms = self.W_dec.float().norm(dim=1)[code.indices.long()]
        return (powered * norms).sum(-1).mean()

    def _add_losses(self, parts, *, code, **_):
        pen = self.penalty(code, self.p)
        parts["penalty"] = pen
        parts["loss"] = parts["loss"] + self.l1_coeff * pen

    def config(self) -> dict:
        return {**super().config(), "l1_coeff": self.l1_coeff, "p": self.p}

    def saelens_architecture(self) -> str:
        if self.W_skip is not None:
            return "skip_transcoder"
        return "transcoder" if self.d_out != self.d_in else "standard"


class JumpReLUSAE(SAE):
    """f = z H(z - threshold); loss = ||y - y_hat||^2 + l0_coeff * L0, with straight-through gradients of
    the rectangle kernel of width `bandwidth` for the thresholds (a parameter, >= 0).

    Trainer knobs: l0_coeff, bandwidth.
    """

    name = "jumprelu"
    architecture = "jumprelu"
    saelens_aliases = ("jumprelu_transcoder", "jumprelu_skip_transcoder")

    def __init__(
        self, d_in: int, d_sae: int, *, l0_coeff: float = 1.0, bandwidth: float = 0.001, init_threshold=0.001, **kw
    ):
        super().__init__(d_in, d_sae, **kw)
        self.l0_coeff = l0_coeff
        self.bandwidth = bandwidth
        self.init_threshold = float(init_threshold)
        self.threshold = nn.Parameter(torch.full((d_sae,), float(init_threshold), dtype=self.dtype, device=self.device))

    def _encode_info(self, xn: torch.Tensor):
        out = kernels.jumprelu_encode(
            xn, self.W_enc, self.b_enc, self.threshold, bandwidth=self.bandwidth, b_dec=self._centre(), hints=self.hints
        )
        return out, out.l0

    def _encode(self, xn: torch.Tensor) -> SparseCode:
        return self._encode_info(xn)[0]

    def _add_losses(self, parts, *, info, **_):
        l0 = info.mean()
        parts["l0"] = l0
        parts["loss"] = parts["loss"] + self.l0_coeff * l0

    def _scale_latents(self, s):
        super()._scale_latents(s)
        self.threshold.copy_(self.threshold.float() * s)

    def config(self) -> dict:
        return {
            **super().config(),
            "l0_coeff": self.l0_coeff,
            "bandwidth": self.bandwidth,
            "init_threshold": self.init_threshold,
        }

    def saelens_architecture(self) -> str:
        if self.W_skip is not None:
            return "jumprelu_skip_transcoder"
        return "jumprelu_transcoder" if self.d_out != self.d_in else "jumprelu"


class GatedSAE(SAE):
    """pi_g = x' W_enc^T + b_gate; pi_m = exp(r_mag) (x' W_enc^T) + b_mag; f = 1[pi_g > 0] ReLU(pi_m).

    loss = ||y - y_hat||^2 + l1_coeff ||ReLU(pi_g)||_1 + ||y - (ReLU(pi_g) sg(W_dec) + sg(b_dec))||^2
    ("l1" and "aux" parts, means over tokens). Trainer knob: l1_coeff.
    """

    has_b_enc = False
    name = "gated"
    architecture = "gated"

    def __init__(self, d_in: int, d_sae: int, *, l1_coeff: float = 1.0, **kw):
        super().__init__(d_in, d_sae, **kw)
        self.l1_coeff = l1_coeff
        kw = {"dtype": self.dtype, "device": self.device}
        self.b_gate = nn.Parameter(torch.zeros(d_sae, **kw))
        self.r_mag = nn.Parameter(torch.zeros(d_sae, **kw))
        self.b_mag = nn.Parameter(torch.zeros(d_sae, **kw))

    def _encode_info(self, xn: torch.Tensor):
        out = kernels.gated_encode(
            xn, self.W_enc, self.b_gate, self.r_mag, self.b_mag, b_dec=self._centre(), hints=self.hints
        )
        return out, SparseCode(out.gate, out.indices)

    def _encode(self, xn: torch.Tensor) -> SparseCode:
        return self._encode_info(xn)[0]

    def _add_losses(self, parts, *, xn, y, info, **_):
        gate = info
        l1 = gate.values.float().sum(-1).mean()
        recon = kernels.sparse_decode(gate, self.W_dec.detach(), self.b_dec.detach())
        if self.W_skip is not None:
            recon = recon + xn @ self.W_skip.detach().T
        aux = (recon.float() - y.float()).pow(2).sum(-1).mean()
        parts["l1"], parts["aux"] = l1, aux
        parts["loss"] = parts["loss"] + self.l1_coeff * l1 + aux

    def _scale_latents(self, s):
        self.b_gate.copy_(self.b_gate.float() * s)
        self.b_mag.copy_(self.b_mag.float() * s)

    def config(self) -> dict:
        return {**super().config(), "l1_coeff": self.l1_coeff}
