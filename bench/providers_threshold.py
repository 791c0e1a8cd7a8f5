"""Threshold-family providers (see providers.py for the interface): ReLU, JumpReLU, gated and BatchTopK (their
encode and training step) and the inference forward `model(x)` of every `sae` class but TopK (whose forward
the TopK providers run). Each family has an "ours" provider (its `sae` class over the shared weights: the
fused encoder, the class's loss) and a "dense" one, as SAELens runs it (dense pre-activations, dense
activation, dense decode).

Beyond the TopK primitives a family provider gives `dense(act) -> (f [B, n], gate [B, n] or None)` for the
checks. A PyTorch-sparse variant of a threshold family would still form the dense pre-activations to select
and would decode like the TopK torch_sparse provider, which the TopK decode cases measure already, so the
families have none.
"""

from __future__ import annotations

import torch

import kernels
from kernels import SparseCode, reference
from sae import BatchTopKSAE, GatedSAE, JumpReLUSAE, MatryoshkaSAE, OrderedSAE, ReLUSAE

from .inputs import BANDWIDTH, SPARSITY_COEFF, FamilyParams, Params
from .providers import Provider, SAEProvider, cpp_twin, mse, preactivations


def _densify(code: SparseCode, n: int) -> torch.Tensor:
    """[B, n] from a padded code; a latent held twice in a row (with a nonzero value) is an error."""
    held = (code.values != 0).to(torch.int32)
    twice = held.new_zeros(held.shape[0], n).scatter_add_(1, code.indices.long(), held).amax() > 1
    if twice:
        raise ValueError("a row holds the same latent twice")
    return code.to_dense(n)


class _OursFamily(SAEProvider):
    """An `sae` class over the shared weights: its fused encoder, its loss, and `model(x)`. The encode cases
    call the op with the class's EncodeHints, carried from call to call as the class does: the capacity
    learnt from the warm-up call, not a first guess that a row may overflow (a second pass)."""

    def dense(self, code):
        n = self.p.W_enc.shape[0]
        gated = isinstance(code, kernels.GatedCode)
        return _densify(code, n), _densify(SparseCode(code.gate, code.indices), n) if gated else None

    def decode(self, code):
        return self.model.decode(code)

    def loss(self, x):
        return self.model.loss(x)["loss"]


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
        return kernels.relu_encode(x, self.p.W_enc, self.fam.b_relu, b_dec=self.p.b_dec, hints=self.model.hints)


class OursJumpReLU(_JumpReLUParams, _OursFamily):
    """sae.JumpReLUSAE (L0 penalty, straight-through threshold gradients); kernels.jumprelu_encode."""

    def make_model(self, d, n, k, dtype):
        return JumpReLUSAE(d, n, l0_coeff=SPARSITY_COEFF, bandwidth=BANDWIDTH, dtype=dtype, device="meta")

    def encode(self, x):
        p = self.p
        h, th = self.model.hints, self.fam.threshold
        return kernels.jumprelu_encode(x, p.W_enc, p.b_enc, th, bandwidth=BANDWIDTH, b_dec=p.b_dec, hints=h)


class OursGated(_GatedParams, _OursFamily):
    """sae.GatedSAE (L1 on ReLU(pi_g), auxiliary reconstruction); kernels.gated_encode."""

    def make_model(self, d, n, k, dtype):
        return GatedSAE(d, n, l1_coeff=SPARSITY_COEFF, dtype=dtype, device="meta")

    def encode(self, x):
        f, h = self.fam, self.model.hints
        return kernels.gated_encode(x, self.p.W_enc, f.b_gate, f.r_mag, f.b_mag, b_dec=self.p.b_dec, hints=h)


class OursBatchTopK(_OursFamily):
    """sae.BatchTopKSAE in training mode (the batch-wide selection); kernels.batch_topk_encode."""

    ops = ("batchtopk_encode", "batchtopk_step")

    def make_model(self, d, n, k, dtype):
        return BatchTopKSAE(d, n, k, dtype=dtype, device="meta")

    def buffers(self):
        return {"threshold": torch.tensor(-1.0, device=self.p.W_enc.device)}  # no EMA yet: it starts now

    def encode(self, x):
        p = self.p
        return kernels.batch_topk_encode(x, p.W_enc, p.b_enc, p.k, b_dec=p.b_dec, hints=self.model.hints)


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


class _DenseFamily(Provider):
    """Dense PyTorch, as SAELens runs it: z [B, n], the activation on z, f [B, n] @ W_dec.

    act = (f [B, n], extra): extra is the gated SAE's ReLU(pi_g), JumpReLU's l0 [B], else None."""

    name = "dense"
    TEMPS = {"encode": 3, "step": 6, "forward": 3}  # live [B, n] temporaries by the kind of op

    def __init_subclass__(cls):
        kind = lambda op: "forward" if op.startswith("forward") else op.rsplit("_", 1)[1]
        cls.dense_temps = {op: cls.TEMPS[kind(op)] for op in cls.ops}

    def dense(self, act):
        return act[0], None

    def decode(self, act):
        return act[0] @ self.p.W_dec + self.p.b_dec


class DenseReLU(_ReLUParams, _DenseFamily):
    def encode(self, x):
        return torch.relu(preactivations(self.p, x, self.fam.b_relu)), None

    def loss(self, x):
        act = self.encode(x)
        penalty = (act[0].float() * self.p.W_dec.float().norm(dim=1)).sum(-1).mean()
        return mse(self.decode(act), x) + SPARSITY_COEFF * penalty


class DenseJumpReLU(_JumpReLUParams, _DenseFamily):
    def encode(self, x):
        p = self.p
        return reference.jumprelu(x, p.W_enc, p.b_enc, self.fam.threshold, BANDWIDTH, b_dec=p.b_dec)

    def loss(self, x):
        act = self.encode(x)
        return mse(self.decode(act), x) + SPARSITY_COEFF * act[1].float().mean()


class DenseGated(_GatedParams, _DenseFamily):
    def encode(self, x):
        f = self.fam
        u = preactivations(self.p, x, None)
        pi_g = u + f.b_gate
        return (pi_g > 0) * torch.relu(torch.exp(f.r_mag) * u + f.b_mag), torch.relu(pi_g)

    def dense(self, act):
        return act

    def loss(self, x):
        act = self.encode(x)
        l1 = act[1].float().sum(-1).mean()
        aux = mse(act[1] @ self.p.W_dec.detach() + self.p.b_dec.detach(), x)
        return mse(self.decode(act), x) + SPARSITY_COEFF * l1 + aux


class DenseBatchTopK(_DenseFamily):
    ops = OursBatchTopK.ops

    def encode(self, x):
        f = torch.relu(preactivations(self.p, x, self.p.b_enc))
        top = f.reshape(-1).topk(x.shape[0] * self.p.k)
        return torch.zeros_like(f).reshape(-1).scatter(0, top.indices, top.values).view_as(f), None


class DenseGlobal(_DenseFamily):
    """The inference forward of BatchTopK, Matryoshka and Ordered SAEs: z H(z - q), one global threshold."""

    ops = ("forward_batchtopk", "forward_matryoshka", "forward_ordered")

    def encode(self, x):
        z = preactivations(self.p, x, self.p.b_enc)
        return z * (z > self.fam.q), None


FAMILY_PROVIDERS: tuple[type[Provider], ...] = (
    OursReLU, DenseReLU, OursJumpReLU, DenseJumpReLU, OursGated, DenseGated, OursBatchTopK, DenseBatchTopK,
    OursBatchTopKEval, OursMatryoshka, OursOrdered, DenseGlobal,
    *(cpp_twin(c) for c in (OursReLU, OursJumpReLU, OursGated, OursBatchTopK, OursBatchTopKEval, OursMatryoshka,
                            OursOrdered)),
)  # fmt: skip
