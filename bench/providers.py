"""Providers: the same SAE implemented several ways, all over one set of shared weights.

A provider wraps the shared `Params` and gives the suite five primitives:
  encode(x) -> act            x: [B, d] -> its native activations (a dense [B, n] matrix or (values, indices))
  sparse(act) -> (values [B, k], indices [B, k])   the selection; values stay differentiable (for checks)
  grad_tensor(act)            the tensor the encoder's output gradient flows into (values, or the dense f)
  make_act(values, indices)   a given code in the provider's native form
  decode(act) -> x_hat [B, d]
`ops` lists the benchmark ops a provider runs; `unavailable()` says why it cannot run here (else None).

The threshold families (ReLU, JumpReLU, gated, BatchTopK) and the inference forwards of every `sae` class
have their own providers (`FAMILY_PROVIDERS`, named "ours" and "dense" like the TopK ones): `encode(x)`,
`decode(act)`, `loss(x)` (the architecture's whole training loss), `run(x) -> (act, x_hat)` (the forward,
with the activations it used) and `dense(act) -> (f [B, n], gate [B, n] or None)` for the checks. Each
provider class serves one family; `ops` says which. The dense ones are what SAELens runs (dense
pre-activations, dense activation, dense decode). A PyTorch-sparse variant of a threshold family would still
form the dense pre-activations to select and would decode like the TopK torch_sparse provider, which the
TopK decode cases measure already, so the families have none.

Adding an activation family: its providers here and their ops and checks in cases.py (see its docstring).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import SparseCode, reference
from sae import BatchTopKSAE, GatedSAE, JumpReLUSAE, MatryoshkaSAE, OrderedSAE, ReLUSAE, TopKSAE

ALL_OPS = ("encode", "encode_bwd", "decode", "decode_bwd", "step")
BANDWIDTH = 1e-3  # JumpReLU's rectangle-kernel width (SAELens' default; inputs have ||x|| ~ sqrt(d))
SPARSITY_COEFF = 1.0  # ReLU's L1, JumpReLU's L0 and the gated L1 coefficient


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


@dataclass
class FamilyParams:
    """The threshold families' parameters beside the shared weights, set so that about k latents fire per row
    (a trained SAE's L0): q is the (1 - k/n) quantile of sample pre-activations z = (x - b_dec) W_enc^T + b_enc.

    threshold: [n] JumpReLU thresholds, all q (also BatchTopK's global inference threshold); b_relu: [n] the
    ReLU SAE's bias b_enc - q (z - q > 0 iff z > q); gated: b_gate = b_enc - q (pi_g > 0 iff z > q),
    r_mag small random, b_mag = b_enc, all [n].
    """

    threshold: nn.Parameter
    b_relu: nn.Parameter
    b_gate: nn.Parameter
    r_mag: nn.Parameter
    b_mag: nn.Parameter
    q: float

    @classmethod
    def calibrate(cls, p: Params, x: torch.Tensor, seed: int) -> FamilyParams:
        """x: [S, d] sample rows (setup, not timed)."""
        with torch.no_grad():
            z = F.linear(x - p.b_dec, p.W_enc, p.b_enc).float().reshape(-1)
            q = max(float(z.topk(x.shape[0] * p.k).values[-1]), 0.0)
            g = torch.Generator(device=x.device).manual_seed(seed + 2)
            r_mag = torch.randn(p.b_enc.shape, generator=g, device=x.device, dtype=x.dtype).mul_(0.1)
            b = p.b_enc.detach()
            par = lambda t: nn.Parameter(t.to(x.dtype).clone())
            return cls(par(torch.full_like(b, q)), par(b - q), par(b - q), par(r_mag), par(b), q)

    def tensors(self) -> list[nn.Parameter]:
        return [self.threshold, self.b_relu, self.b_gate, self.r_mag, self.b_mag]

    def zero_grad(self) -> None:
        for p in self.tensors():
            p.grad = None


class Provider:
    name = ""
    ops: tuple[str, ...] = ALL_OPS
    # Live [B, n] and [B*k, d] temporaries per op (for the memory estimate that skips what cannot fit).
    dense_temps: dict[str, int] = {}
    gather_temps: dict[str, int] = {}

    def __init__(self, p: Params, fam: FamilyParams | None = None):
        self.p, self.fam = p, fam

    @classmethod
    def unavailable(cls) -> str | None:
        return None

    def named(self) -> dict[str, nn.Parameter]:
        """The parameters a training step updates, by their reference names."""
        return dict(zip(("W_enc", "b_enc", "W_dec", "b_dec"), self.p.tensors(), strict=True))

    def params(self) -> list[nn.Parameter]:
        return list(self.named().values())

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
        return _mse(self.decode(self.encode(x)), x)

    def run(self, x: torch.Tensor):
        """The inference forward: (act, x_hat [B, d])."""
        act = self.encode(x)
        return act, self.decode(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[1]


def _mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x_hat.float() - x.float()).pow(2).sum(-1).mean()


def _bind(model: nn.Module, tensors: dict) -> nn.Module:
    """A model built on the meta device, given the shared tensors (parameters and buffers) by name."""
    for name, t in tensors.items():
        setattr(model, name, t)
    return model


class Ours(Provider):
    """sae.TopKSAE: the fused Triton encoder and sparse decode (CPU tensors: the kernels' torch backend)."""

    name = "ours"
    ops = (*ALL_OPS, "forward_topk")

    def __init__(self, p: Params, fam: FamilyParams | None = None):
        super().__init__(p, fam)
        n, d = p.W_enc.shape
        self.model = _bind(TopKSAE(d, n, p.k, dtype=p.W_enc.dtype, device="meta"), self.named())

    def run(self, x):
        return self.model.run(x)

    def forward(self, x):
        return self.model(x)

    def encode(self, x):
        return self.model.encode_sparse(x)

    def make_act(self, values, indices):
        return SparseCode(values, indices)

    def decode(self, act):
        return self.model.decode(act)


class Dense(Provider):
    """Dense PyTorch SAE as SAELens runs it: z [B, n], topk, scatter into a dense f [B, n], f @ W_dec."""

    name = "dense"
    ops = (*ALL_OPS, "forward_topk")
    dense_temps = {"encode": 3, "encode_bwd": 4, "decode": 1, "decode_bwd": 3, "step": 6, "forward_topk": 3}

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
    ops = (*ALL_OPS, "forward_topk")
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
        if not torch.cuda.is_available():
            return "its decode runs Triton kernels: CUDA only"
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
        return self.coder.decode(*act)


# ---- threshold families and inference forwards ------------------------------------------------------


class _Family(Provider):
    """A provider of the threshold families or of a forward; `dense` gives its activations for the checks."""

    ops: tuple[str, ...] = ()

    def dense(self, act) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(f [B, n], the gated SAE's ReLU(pi_g) [B, n] or None), differentiable in the values."""
        raise NotImplementedError


def _densify(code: SparseCode, n: int) -> torch.Tensor:
    """[B, n] from a padded code; a latent held twice in a row (with a nonzero value) is an error."""
    held = (code.values != 0).to(torch.int32)
    twice = held.new_zeros(held.shape[0], n).scatter_add_(1, code.indices.long(), held).amax() > 1
    if twice:
        raise ValueError("a row holds the same latent twice")
    return code.to_dense(n)


class _OursFamily(_Family):
    """An `sae` class over the shared weights: its fused encoder, its loss, and `model(x)`."""

    name = "ours"

    def __init__(self, p: Params, fam: FamilyParams | None = None):
        super().__init__(p, fam)
        n, d = p.W_enc.shape
        self.model = _bind(self.make_model(d, n, p.k, p.W_enc.dtype), {**self.named(), **self.buffers()})

    def make_model(self, d: int, n: int, k: int, dtype: torch.dtype):
        raise NotImplementedError

    def buffers(self) -> dict[str, torch.Tensor]:
        return {}

    def dense(self, act):
        n = self.p.W_enc.shape[0]
        if isinstance(act, kernels.GatedCode):
            return _densify(act.code, n), _densify(act.gate, n)
        return _densify(act.code if isinstance(act, kernels.JumpReLUCode) else act, n), None

    def decode(self, act):
        return self.model.decode(act.code if isinstance(act, (kernels.JumpReLUCode, kernels.GatedCode)) else act)

    def loss(self, x):
        return self.model.loss(x)["loss"]

    def run(self, x):
        return self.model.run(x)

    def forward(self, x):
        return self.model(x)


class _ReLUParams:
    ops = ("relu_encode", "relu_step", "forward_relu")

    def named(self):
        return {**super().named(), "b_enc": self.fam.b_relu}


class _JumpReLUParams:
    ops = ("jumprelu_encode", "jumprelu_step", "forward_jumprelu")

    def named(self):
        return {**super().named(), "threshold": self.fam.threshold}


class _GatedParams:
    ops = ("gated_encode", "gated_step", "forward_gated")

    def named(self):
        p, f = self.p, self.fam
        return {"W_enc": p.W_enc, "b_gate": f.b_gate, "r_mag": f.r_mag, "b_mag": f.b_mag, "W_dec": p.W_dec,
                "b_dec": p.b_dec}  # fmt: skip


class OursReLU(_ReLUParams, _OursFamily):
    """sae.ReLUSAE (L1 penalty weighted by decoder norms, p = 1); kernels.relu_encode."""

    def make_model(self, d, n, k, dtype):
        return ReLUSAE(d, n, l1_coeff=SPARSITY_COEFF, dtype=dtype, device="meta")

    def encode(self, x):
        return kernels.relu_encode(x, self.p.W_enc, self.fam.b_relu, b_dec=self.p.b_dec)


class OursJumpReLU(_JumpReLUParams, _OursFamily):
    """sae.JumpReLUSAE (L0 penalty, straight-through threshold gradients); kernels.jumprelu_encode."""

    def make_model(self, d, n, k, dtype):
        return JumpReLUSAE(d, n, l0_coeff=SPARSITY_COEFF, bandwidth=BANDWIDTH, dtype=dtype, device="meta")

    def encode(self, x):
        p = self.p
        return kernels.jumprelu_encode(x, p.W_enc, p.b_enc, self.fam.threshold, bandwidth=BANDWIDTH, b_dec=p.b_dec)


class OursGated(_GatedParams, _OursFamily):
    """sae.GatedSAE (L1 on ReLU(pi_g), auxiliary reconstruction); kernels.gated_encode."""

    def make_model(self, d, n, k, dtype):
        return GatedSAE(d, n, l1_coeff=SPARSITY_COEFF, dtype=dtype, device="meta")

    def encode(self, x):
        f = self.fam
        return kernels.gated_encode(x, self.p.W_enc, f.b_gate, f.r_mag, f.b_mag, b_dec=self.p.b_dec)


class OursBatchTopK(_OursFamily):
    """sae.BatchTopKSAE in training mode (the batch-wide selection); kernels.batch_topk_encode."""

    ops = ("batchtopk_encode", "batchtopk_step")

    def make_model(self, d, n, k, dtype):
        return BatchTopKSAE(d, n, k, dtype=dtype, device="meta")

    def buffers(self):
        return {"threshold": torch.tensor(-1.0, device=self.p.W_enc.device)}  # no EMA yet: it starts now

    def encode(self, x):
        p = self.p
        return kernels.batch_topk_encode(x, p.W_enc, p.b_enc, p.k, b_dec=p.b_dec)


class _OursGlobal(_OursFamily):
    """A BatchTopK-encoded class in eval mode: a JumpReLU with the global threshold q."""

    def __init__(self, p: Params, fam: FamilyParams | None = None):
        super().__init__(p, fam)
        self.model.eval()

    def buffers(self):
        return {"threshold": torch.tensor(self.fam.q, device=self.p.W_enc.device)}


class OursBatchTopKEval(_OursGlobal):
    ops = ("forward_batchtopk",)

    def make_model(self, d, n, k, dtype):
        return BatchTopKSAE(d, n, k, dtype=dtype, device="meta")


class OursMatryoshka(_OursGlobal):
    ops = ("forward_matryoshka",)

    def make_model(self, d, n, k, dtype):
        return MatryoshkaSAE(d, n, k, prefixes=[n // 8, n // 2, n], dtype=dtype, device="meta")


class OursOrdered(_OursGlobal):
    ops = ("forward_ordered",)

    def make_model(self, d, n, k, dtype):
        return OrderedSAE(d, n, k, dtype=dtype, device="meta")


class _DenseFamily(_Family):
    """Dense PyTorch, as SAELens runs it: z [B, n], the activation on z, f [B, n] @ W_dec.

    act = (f [B, n], extra): extra is the gated SAE's ReLU(pi_g), JumpReLU's l0 [B], else None."""

    name = "dense"
    TEMPS = {"encode": 3, "step": 6, "forward": 3}  # live [B, n] temporaries by the kind of op

    def __init_subclass__(cls):
        kind = lambda op: "forward" if op.startswith("forward") else op.rsplit("_", 1)[1]
        cls.dense_temps = {op: cls.TEMPS[kind(op)] for op in cls.ops}

    def z(self, x, b):
        return (x - self.p.b_dec) @ self.p.W_enc.T + b

    def dense(self, act):
        return act[0], None

    def decode(self, act):
        return act[0] @ self.p.W_dec + self.p.b_dec


class DenseReLU(_ReLUParams, _DenseFamily):
    def encode(self, x):
        return torch.relu(self.z(x, self.fam.b_relu)), None

    def loss(self, x):
        act = self.encode(x)
        penalty = (act[0].float() * self.p.W_dec.float().norm(dim=1)).sum(-1).mean()
        return _mse(self.decode(act), x) + SPARSITY_COEFF * penalty


class DenseJumpReLU(_JumpReLUParams, _DenseFamily):
    def encode(self, x):
        p = self.p
        return reference.jumprelu(x, p.W_enc, p.b_enc, self.fam.threshold, BANDWIDTH, b_dec=p.b_dec)

    def loss(self, x):
        act = self.encode(x)
        return _mse(self.decode(act), x) + SPARSITY_COEFF * act[1].float().mean()


class DenseGated(_GatedParams, _DenseFamily):
    def encode(self, x):
        f = self.fam
        u = (x - self.p.b_dec) @ self.p.W_enc.T
        pi_g = u + f.b_gate
        return (pi_g > 0) * torch.relu(torch.exp(f.r_mag) * u + f.b_mag), torch.relu(pi_g)

    def dense(self, act):
        return act

    def loss(self, x):
        act = self.encode(x)
        l1 = act[1].float().sum(-1).mean()
        aux = _mse(act[1] @ self.p.W_dec.detach() + self.p.b_dec.detach(), x)
        return _mse(self.decode(act), x) + SPARSITY_COEFF * l1 + aux


class DenseBatchTopK(_DenseFamily):
    ops = OursBatchTopK.ops

    def encode(self, x):
        f = torch.relu(self.z(x, self.p.b_enc))
        top = f.reshape(-1).topk(x.shape[0] * self.p.k)
        return torch.zeros_like(f).reshape(-1).scatter(0, top.indices, top.values).view_as(f), None


class DenseGlobal(_DenseFamily):
    """The inference forward of BatchTopK, Matryoshka and Ordered SAEs: z H(z - q), one global threshold."""

    ops = ("forward_batchtopk", "forward_matryoshka", "forward_ordered")

    def encode(self, x):
        z = self.z(x, self.p.b_enc)
        return z * (z > self.fam.q), None


FAMILY_PROVIDERS: tuple[type[_Family], ...] = (
    OursReLU, DenseReLU, OursJumpReLU, DenseJumpReLU, OursGated, DenseGated, OursBatchTopK, DenseBatchTopK,
    OursBatchTopKEval, OursMatryoshka, OursOrdered, DenseGlobal,
)  # fmt: skip


PROVIDERS: dict[str, type[Provider]] = {c.name: c for c in (Ours, Dense, TorchSparse, Chunked, Sparsify)}
BASELINES = ("dense", "torch_sparse", "chunked", "sparsify")


def providers_named(names) -> list[type[Provider]]:
    """Every provider class (TopK and families) whose name is in `names`; PROVIDERS is read at call time."""
    return [c for c in (*PROVIDERS.values(), *FAMILY_PROVIDERS) if c.name in names]
