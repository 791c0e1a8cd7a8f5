"""Providers: the same TopK SAE implemented several ways, all over one set of shared weights.

A provider wraps the shared `Params` and gives the suite five primitives:
  encode(x) -> act            x: [B, d] -> its native activations (a dense [B, n] matrix or (values, indices))
  sparse(act) -> (values [B, k], indices [B, k])   the selection; values stay differentiable (for checks)
  grad_tensor(act)            the tensor the encoder's output gradient flows into (values, or the dense f)
  make_act(values, indices)   a given code in the provider's native form
  decode(act) -> x_hat [B, d]
`ops` lists the benchmark ops a provider runs; `unavailable()` says why it cannot run here (else None).

Adding an activation family (JumpReLU, gated, ...): write its providers here (the dense one thresholds z, the
ours one calls e.g. kernels.jumprelu_encode) and their ops and checks in cases.py (see its docstring).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import SparseCode
from sae import TopKSAE

ALL_OPS = ("encode", "encode_bwd", "decode", "decode_bwd", "step")


@dataclass
class Params:
    """Shared SAE weights (nn.Parameters, so every provider's module holds the very same tensors).

    W_enc, W_dec: [n, d] latent-major; b_enc: [n]; b_dec: [d].
    """

    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    k: int

    @classmethod
    def random(cls, d: int, n: int, k: int, dtype: torch.dtype, device, seed: int) -> Params:
        """Rows of W_dec near unit norm, W_enc = W_dec (the usual SAE init), small random biases."""
        g = torch.Generator(device=device).manual_seed(seed)
        kw = {"generator": g, "device": device, "dtype": dtype}
        W_dec = torch.randn(n, d, **kw).mul_(d**-0.5)
        return cls(
            W_enc=nn.Parameter(W_dec.clone()),
            b_enc=nn.Parameter(torch.randn(n, **kw).mul_(0.1)),
            W_dec=nn.Parameter(W_dec),
            b_dec=nn.Parameter(torch.randn(d, **kw).mul_(0.1)),
            k=k,
        )

    def tensors(self) -> list[nn.Parameter]:
        return [self.W_enc, self.b_enc, self.W_dec, self.b_dec]

    def zero_grad(self) -> None:
        for p in self.tensors():
            p.grad = None


class Provider:
    name = ""
    ops: tuple[str, ...] = ALL_OPS
    # Live [B, n] and [B*k, d] temporaries per op (for the memory estimate that skips what cannot fit).
    dense_temps: dict[str, int] = {}
    gather_temps: dict[str, int] = {}

    def __init__(self, p: Params):
        self.p = p

    @classmethod
    def unavailable(cls) -> str | None:
        return None

    def params(self) -> list[nn.Parameter]:
        return self.p.tensors()

    def encode(self, x: torch.Tensor):
        raise NotImplementedError

    def sparse(self, act) -> tuple[torch.Tensor, torch.Tensor]:
        return act[0], act[1]

    def grad_tensor(self, act) -> torch.Tensor:
        return act[0]

    def make_act(self, values: torch.Tensor, indices: torch.Tensor):
        return values, indices

    def decode(self, act) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over rows of ||x - x_hat||^2 in fp32 (TopKSAE.loss's "mse")."""
        x_hat = self.decode(self.encode(x))
        return (x_hat.float() - x.float()).pow(2).sum(-1).mean()


class Ours(Provider):
    """sae.TopKSAE: the fused Triton encoder and sparse decode (CPU tensors: the kernels' torch backend)."""

    name = "ours"

    def __init__(self, p: Params):
        super().__init__(p)
        n, d = p.W_enc.shape
        self.model = TopKSAE(d, n, p.k, dtype=p.W_enc.dtype, device="meta")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self.model, name, getattr(p, name))

    def encode(self, x):
        return self.model.encode_sparse(x)

    def make_act(self, values, indices):
        return SparseCode(values, indices)

    def decode(self, act):
        return self.model.decode(act)


class Dense(Provider):
    """Dense PyTorch SAE as SAELens runs it: z [B, n], topk, scatter into a dense f [B, n], f @ W_dec."""

    name = "dense"
    dense_temps = {"encode": 3, "encode_bwd": 4, "decode": 1, "decode_bwd": 3, "step": 6}

    def encode(self, x):
        p = self.p
        z = (x - p.b_dec) @ p.W_enc.T + p.b_enc
        top = z.topk(p.k, dim=-1)
        return torch.zeros_like(z).scatter(-1, top.indices, torch.relu(top.values))

    def sparse(self, f):
        idx = f.detach().topk(self.p.k, dim=-1).indices
        return f.gather(1, idx), idx

    def grad_tensor(self, f):
        return f

    def make_act(self, values, indices):
        f = values.new_zeros(values.shape[0], self.p.W_dec.shape[0])
        return f.scatter(1, indices.long(), values)

    def decode(self, f):
        return f @ self.p.W_dec + self.p.b_dec


class _SparseEncode(torch.autograd.Function):
    """Dense GEMM + torch.topk forward; sparse backward with embedding_bag and index_add_ (as sparsify does).

    x: [B, d] (centred), W: [n, d], b: [n] -> values [B, k], indices [B, k] int64.
    """

    @staticmethod
    def forward(ctx, x, W, b, k):
        values, indices = torch.relu(F.linear(x, W, b)).topk(k, dim=-1)
        ctx.save_for_backward(x, W, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        x, W, values, indices = ctx.saved_tensors
        g = torch.where(values > 0, grad_values, 0.0)  # slots clamped by the ReLU pass no gradient
        flat = indices.reshape(-1)
        grad_x = F.embedding_bag(indices, W, per_sample_weights=g, mode="sum")
        rows = x.repeat_interleave(indices.shape[1], dim=0)  # [B*k, d]
        grad_W = torch.zeros_like(W).index_add_(0, flat, g.reshape(-1, 1) * rows)
        grad_b = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device).index_add_(0, flat, g.reshape(-1))
        return grad_x, grad_W, grad_b, None


class TorchSparse(Provider):
    """PyTorch-sparse: GEMM + torch.topk + F.embedding_bag decode + index_add_ weight gradients."""

    name = "torch_sparse"
    dense_temps = {"encode": 2, "encode_bwd": 2, "step": 2}
    gather_temps = {"encode_bwd": 2, "step": 2}

    def encode(self, x):
        p = self.p
        return _SparseEncode.apply(x - p.b_dec, p.W_enc, p.b_enc, p.k)

    def decode(self, act):
        values, indices = act
        return F.embedding_bag(indices, self.p.W_dec, per_sample_weights=values, mode="sum") + self.p.b_dec


class Chunked(Provider):
    """kernels.chunked_topk_select: torch mm on column chunks + exact top-k merge. Forward only."""

    name = "chunked"
    ops = ("encode",)

    def encode(self, x):
        p = self.p
        return kernels.chunked_topk_select(x - p.b_dec, p.W_enc, p.b_enc, p.k)


class Sparsify(Provider):
    """EleutherAI sparsify's SparseCoder (pip package eai-sparsify; the `peers` extra)."""

    name = "sparsify"
    dense_temps = {"encode": 2, "encode_bwd": 2, "step": 2}
    gather_temps = {"encode_bwd": 2, "step": 2}

    @classmethod
    def _module(cls):
        return importlib.import_module("sparsify")

    @classmethod
    def unavailable(cls):
        try:
            mod = cls._module()
        except Exception as e:  # absent, or present but broken: either way it cannot run
            return f"not importable ({type(e).__name__}: {e}); install it with `pip install eai-sparsify`"
        if not hasattr(mod, "SparseCoder") and not hasattr(mod, "Sae"):
            return f"sparsify {getattr(mod, '__version__', '?')} has neither SparseCoder nor Sae"
        return None

    def __init__(self, p: Params):
        super().__init__(p)
        mod = self._module()
        coder = getattr(mod, "SparseCoder", None) or mod.Sae
        config = getattr(mod, "SparseCoderConfig", None) or mod.SaeConfig
        n, d = p.W_enc.shape
        self.coder = coder(d, config(num_latents=n, k=p.k), device="meta", dtype=p.W_enc.dtype)
        self.coder.encoder.weight, self.coder.encoder.bias = p.W_enc, p.b_enc
        self.coder.W_dec, self.coder.b_dec = p.W_dec, p.b_dec

    def encode(self, x):
        out = self.coder.encode(x)
        return out[0], out[1]

    def decode(self, act):
        return self.coder.decode(*act)


PROVIDERS: dict[str, type[Provider]] = {c.name: c for c in (Ours, Dense, TorchSparse, Chunked, Sparsify)}
BASELINES = ("dense", "torch_sparse", "chunked", "sparsify")
