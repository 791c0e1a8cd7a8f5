"""TopK providers (see providers.py for the interface): ours (sae.TopKSAE), dense PyTorch as SAELens runs it,
PyTorch-sparse as sparsify runs it, the chunked baseline, and EleutherAI's sparsify when installed."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

import kernels
from kernels import SparseCode
from sae import TopKSAE

from .inputs import FamilyParams, Params
from .providers import Provider, SAEProvider, cpp_twin, preactivations

TOPK_OPS = ("encode", "encode_bwd", "decode", "decode_bwd", "step")


class Ours(SAEProvider):
    """sae.TopKSAE: the fused Triton encoder and sparse decode (CPU tensors: the kernels' torch backend)."""

    ops = (*TOPK_OPS, "forward_topk")

    def make_model(self, d, n, k, dtype):
        return TopKSAE(d, n, k, dtype=dtype, device="meta")

    def encode(self, x):
        return self.model.encode_sparse(x)

    def sparse(self, code):
        return code.values, code.indices

    def grad_tensor(self, code):
        return code.values

    def make_act(self, values, indices):
        return SparseCode(values, indices)

    def decode(self, act):
        return self.model.decode(act)


class Dense(Provider):
    """Dense PyTorch SAE as SAELens runs it: z [B, n], topk, scatter into a dense f [B, n], f @ W_dec."""

    name = "dense"
    ops = (*TOPK_OPS, "forward_topk")
    dense_temps = {"encode": 3, "encode_bwd": 4, "decode": 1, "decode_bwd": 3, "step": 6, "forward_topk": 3}

    def encode(self, x):
        z = preactivations(self.p, x, self.p.b_enc)
        top = z.topk(self.p.k, dim=-1)
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
    ops = (*TOPK_OPS, "forward_topk")
    dense_temps = {"encode": 2, "encode_bwd": 2, "step": 2, "forward_topk": 2}
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
    ops = TOPK_OPS
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
        if not torch.cuda.is_available() and not hasattr(importlib.import_module("sparsify.utils"), "eager_decode"):
            return "its decode runs Triton kernels, and this version has no eager_decode for the CPU"
        return None

    def __init__(self, p: Params, fam: FamilyParams | None = None):
        super().__init__(p, fam)
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
        if self.p.W_dec.is_cuda:
            return self.coder.decode(*act)
        # CPU: its Triton decode cannot run; sparsify's own eager twin (embedding_bag) does what decode does
        values, indices = act
        eager = importlib.import_module("sparsify.utils").eager_decode
        return eager(indices, values.to(self.p.W_dec.dtype), self.p.W_dec.mT) + self.p.b_dec


PROVIDERS: dict[str, type[Provider]] = {
    c.name: c for c in (Ours, Dense, TorchSparse, Chunked, Sparsify, cpp_twin(Ours))
}
BASELINES = ("dense", "torch_sparse", "chunked", "sparsify")  # the providers speedups are measured against
