"""The small base every SAE class shares: parameters, shapes, decode, forward, loss."""

from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels import SparseCode


class SAE(nn.Module):
    """x_hat = f(x) W_dec + b_dec with latent-major weights: W_enc, W_dec [d_sae, d_in].

    Decoder rows start at unit norm and the encoder starts as the decoder (the transpose, in the usual
    [d_in, d_sae] layout). Subclasses define `encode_sparse`.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        apply_b_dec_to_input: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        for name, value in (("d_in", d_in), ("d_sae", d_sae)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.d_in, self.d_sae = d_in, d_sae
        self.apply_b_dec_to_input = apply_b_dec_to_input
        W_dec = torch.randn(d_sae, d_in, dtype=torch.float32, device=device)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        kw = {"dtype": dtype or torch.float32, "device": device}
        self.W_dec = nn.Parameter(W_dec.to(**kw))
        self.W_enc = nn.Parameter(W_dec.clone().to(**kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [B, d_in] in the parameters' dtype."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x must have last dimension d_in={self.d_in}, got shape {tuple(x.shape)}")
        return x.reshape(-1, self.d_in).to(self.W_enc.dtype)

    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        """x: [..., d_in] -> SparseCode with [B, K] values and indices, B the product of the leading dims."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense activations [..., d_sae] (for compatibility; allocates B x d_sae)."""
        return self.encode_sparse(x).to_dense(self.d_sae).reshape(*x.shape[:-1], self.d_sae)

    def decode(self, code: SparseCode) -> torch.Tensor:
        """[B, d_in] = b_dec + sum of the code's W_dec rows."""
        return kernels.sparse_decode(code, self.W_dec, self.b_dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d_in] -> x_hat: [..., d_in]."""
        return self.decode(self.encode_sparse(x)).reshape(x.shape).to(x.dtype)

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"loss", "mse", "fvu", "l0"}: mse = mean ||x - x_hat||^2; fvu vs the variance about the mean."""
        x2 = self._rows(x)
        code = self.encode_sparse(x2)
        x_hat = self.decode(code)
        err = (x_hat.float() - x2.float()).pow(2).sum(-1)
        var = (x2.float() - x2.float().mean(0)).pow(2).sum(-1)
        mse = err.mean()
        return {
            "loss": mse,
            "mse": mse,
            "fvu": err.sum() / var.sum().clamp_min(torch.finfo(torch.float32).tiny),
            "l0": (code.values != 0).sum(-1).float().mean(),
        }

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, dtype={self.W_enc.dtype}"
