"""Providers: the same SAE implemented several ways, all over one set of shared weights (inputs.Params).

A provider wraps the shared `Params` and gives the suite five primitives:
  encode(x) -> act            x: [B, d] -> its native activations (a dense [B, n] matrix, or a code)
  sparse(act) -> (values [B, k], indices [B, k])   the selection; values stay differentiable (for checks)
  grad_tensor(act)            the tensor the encoder's output gradient flows into (values, or the dense f)
  make_act(values, indices)   a given code in the provider's native form
  decode(act) -> x_hat [B, d]
and loss(x) (the training loss), run(x) -> (act, x_hat) (the inference forward with the activations it
used). `ops` lists the benchmark ops a provider runs; `unavailable()` says why it cannot run here (else None).
`name` is what `--providers` selects ("ours", "dense", ...); the TopK and threshold providers share names.
`backend` pins the kernels' backend for a provider's check and timed calls, backward included (None: the
default; "ours" on CPU tensors runs "torch", and its "cpp" twin the C++ kernels of csrc/).

The providers by op family:
  providers_topk.py       TopK: ours (sae.TopKSAE), dense, torch_sparse, chunked, sparsify (`PROVIDERS`)
  providers_threshold.py  ReLU, JumpReLU, gated, BatchTopK, and the inference forward of every other `sae`
                          class (`FAMILY_PROVIDERS`: "ours" and "dense" per family)

Adding an activation family: its providers in providers_threshold.py, its reference in oracle.family_ref, and
its ops in ops.py (the checks in checks_threshold.py apply to every threshold rule). Decode ops are shared.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels

from .inputs import FamilyParams, Params


class Provider:
    name = ""
    ops: tuple[str, ...] = ()
    backend: str | None = None
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
        return mse(self.decode(self.encode(x)), x)

    def run(self, x: torch.Tensor):
        """The inference forward: (act, x_hat [B, d])."""
        act = self.encode(x)
        return act, self.decode(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[1]

    def pinned(self, fn):
        """fn, run on this provider's backend."""
        if self.backend is None:
            return fn

        def run():
            with kernels.use_backend(self.backend):
                return fn()

        return run


def mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ||x - x_hat||^2, in fp32. x_hat, x: [B, d]."""
    return (x_hat.float() - x.float()).pow(2).sum(-1).mean()


def preactivations(p: Params, x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The dense [B, n] matrix (x - b_dec) W_enc^T + b (b: [n], or None for no bias), in x's dtype."""
    u = (x - p.b_dec) @ p.W_enc.T
    return u if b is None else u + b


class SAEProvider(Provider):
    """ "ours": an `sae` class over the shared weights. `make_model` builds it on the meta device; it is then
    given the shared tensors (`named()`, and `buffers()`) by name, so it holds no weights of its own."""

    name = "ours"

    def __init__(self, p: Params, fam: FamilyParams | None = None):
        super().__init__(p, fam)
        if self.backend is None and not p.W_enc.is_cuda:
            self.backend = "torch"  # "ours" on CPU tensors: the kernels' PyTorch path; "cpp" is the C++ twin
        n, d = p.W_enc.shape
        self.model = self.make_model(d, n, p.k, p.W_enc.dtype)
        for name, t in {**self.named(), **self.buffers()}.items():
            setattr(self.model, name, t)

    def make_model(self, d: int, n: int, k: int, dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    def buffers(self) -> dict[str, torch.Tensor]:
        return {}

    def run(self, x):
        return self.model.run(x)

    def forward(self, x):
        return self.model(x)


def cpp_twin(cls: type[SAEProvider]) -> type[SAEProvider]:
    """The provider "cpp": `cls` on the kernels' C++ CPU backend (csrc/)."""

    def unavailable(_cls):
        if torch.cuda.is_available():
            return "the C++ kernels run CPU tensors; this run is on CUDA"
        return None if kernels.backend.cpp_available() else "kernels._C (csrc/) is not built"

    doc = f"{cls.__doc__}\nOn the C++ CPU backend (csrc/)."
    attrs = {"name": "cpp", "backend": "cpp", "unavailable": classmethod(unavailable), "__doc__": doc}
    return type(f"{cls.__name__}Cpp", (cls,), attrs)
