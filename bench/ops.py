"""The benchmark's registry: every op (how it is set up for timing, how it is checked, the work it cannot
avoid), the selection of cases by name, and the lookup of providers by name.

A case is (op, shape). The TopK ops ("encode", "encode_bwd", "decode", "decode_bwd", "step") are checked in
checks_topk.py; the threshold families' ops ("<family>_encode", "<family>_step") and every `sae` class's
inference forward ("forward_<arch>", one per `sae.registry.ARCHITECTURES` entry) in checks_threshold.py.
`build` checks a provider against the float64 oracle (oracle.py) before anything is timed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from sae.registry import ARCHITECTURES

from .checks_threshold import check_family_encode, check_family_step, check_forward
from .checks_topk import check_decode, check_decode_bwd, check_encode, check_encode_bwd, check_step
from .inputs import CHECK_ROWS, Inputs
from .providers import Provider
from .providers_threshold import FAMILY_PROVIDERS
from .providers_topk import PROVIDERS
from .shapes import Shape

# ---- setups: each returns the function that is timed ---------------------------------------------------


def _grads(out, wrt, grad_out):
    return torch.autograd.grad(out, wrt, grad_out, retain_graph=True)


def _no_grad(fn, arg):
    """The timed call fn(arg), without autograd."""

    def run():
        with torch.no_grad():
            return fn(arg)

    return run


def setup_encode(P: Provider, I: Inputs):
    return _no_grad(P.encode, I.x)


def setup_encode_bwd(P: Provider, I: Inputs):
    x = I.x.detach().requires_grad_()
    out = P.grad_tensor(P.encode(x))
    wrt, g = (x, I.params.W_enc, I.params.b_enc), out.detach()  # upstream = f: the gradient of sum(f^2) / 2
    return lambda: _grads(out, wrt, g)


def setup_decode(P: Provider, I: Inputs):
    return _no_grad(P.decode, P.make_act(I.code.values, I.code.indices))


def setup_decode_bwd(P: Provider, I: Inputs):
    values = I.code.values.detach().clone().requires_grad_()
    x_hat = P.decode(P.make_act(values, I.code.indices))
    wrt = (values, I.params.W_dec, I.params.b_dec)
    return lambda: _grads(x_hat, wrt, I.g_out)


def setup_step(P: Provider, I: Inputs):
    # lr = 0: Adam does all its work, but the weights every later case shares stay as they were.
    opt = torch.optim.Adam(P.params(), lr=0.0, fused=True)  # CPU too: the foreach Adam costs a third of a GEMM

    def run():
        opt.zero_grad(set_to_none=True)
        P.loss(I.x).backward()
        opt.step()

    return run


def setup_forward(P: Provider, I: Inputs):
    return _no_grad(P.forward, I.x)


# ---- work models: (shape, touched rows U) -> FLOPs, or bytes that must move -----------------------------


def _enc_flops(s: Shape, U: int) -> float:
    return 2 * s.B * s.n * s.d


def _dec_flops(s: Shape, U: int) -> float:
    return 2 * s.B * s.k * s.d


def _bwd_flops(s: Shape, U: int) -> float:
    return 4 * s.B * s.k * s.d


def _step_flops(s: Shape, U: int) -> float:
    return 2 * s.B * s.n * s.d + 10 * s.B * s.k * s.d


def _forward_flops(s: Shape, U: int) -> float:
    return _enc_flops(s, U) + _dec_flops(s, U)


def _enc_bytes(s: Shape, U: int) -> float:
    return s.itemsize * (s.B * s.d + s.n * s.d + s.n + s.d) + s.B * s.k * (s.itemsize + 4)


def _dec_bytes(s: Shape, U: int) -> float:
    return s.itemsize * (s.B * s.k + U * s.d + s.d + s.B * s.d) + 4 * s.B * s.k


def _enc_bwd_bytes(s: Shape, U: int) -> float:
    return s.itemsize * (2 * s.B * s.d + s.B * s.k + U * s.d + s.n * s.d + s.n) + 4 * s.B * s.k


def _dec_bwd_bytes(s: Shape, U: int) -> float:
    return s.itemsize * (s.B * s.d + 2 * s.B * s.k + U * s.d + s.n * s.d + s.d) + 4 * s.B * s.k


def _step_bytes(s: Shape, U: int) -> float:
    adam = 7 * s.itemsize * (2 * s.n * s.d + s.n + s.d)  # read p, g, m, v; write p, m, v
    return _enc_bytes(s, U) + _dec_bytes(s, U) + _enc_bwd_bytes(s, U) + _dec_bwd_bytes(s, U) + adam


def _forward_bytes(s: Shape, U: int) -> float:
    return _enc_bytes(s, U) + _dec_bytes(s, U)


# ---- the ops --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One benchmarked operation: how to set it up and check it, and its work model.

    flops / bytes: (shape, touched rows U) -> the work the op cannot avoid: FLOPs, and bytes it must move
    (inputs read once, outputs written once, only the U touched rows of a weight gathered).
    """

    name: str
    doc: str
    setup: Callable[[Provider, Inputs], Callable[[], object]]
    check: Callable[[Provider, Inputs, str], None]
    flops: Callable[[Shape, int], float]
    bytes: Callable[[Shape, int], float]
    weight_grads: int  # [n, d] gradients (and optimizer states) it keeps alive, for the memory estimate
    group: str = "topk"  # "topk", "threshold" (the families' encode and step) or "forward" (model(x))


# the threshold families (keys: their `sae.registry` names) -> their label in the ops' docs
FAMILIES = {"relu": "ReLU", "jumprelu": "JumpReLU", "gated": "gated", "batchtopk": "BatchTopK"}
# every registered architecture -> the selection rule of its eval-mode encoder (checks_threshold.check_forward)
FORWARDS = {"topk": "topk", "batchtopk": "global", "jumprelu": "jumprelu", "gated": "gated", "relu": "relu",
            "matryoshka": "global", "ordered": "global"}  # fmt: skip


def _forward_rule(arch: str) -> str:
    if arch not in FORWARDS:
        raise KeyError(f"bench.ops.FORWARDS has no selection rule for the registered architecture {arch!r}")
    return FORWARDS[arch]


def _ops():
    """The TopK ops; the threshold families' encode and step (L0 ~ k, see inputs.FamilyParams); every
    registered class's forward."""
    yield from (
        Op("encode", "TopK encode forward: (values, indices) = TopK(ReLU((x - b_dec) W_enc^T + b_enc))",
           setup_encode, check_encode, _enc_flops, _enc_bytes, 0),
        Op("encode_bwd", "encoder backward: grads of x, W_enc, b_enc from the values' gradient",
           setup_encode_bwd, check_encode_bwd, _bwd_flops, _enc_bwd_bytes, 1),
        Op("decode", "sparse decode: x_hat = b_dec + sum_j values_j W_dec[indices_j]",
           setup_decode, check_decode, _dec_flops, _dec_bytes, 0),
        Op("decode_bwd", "decode backward: grads of values, W_dec, b_dec from x_hat's gradient",
           setup_decode_bwd, check_decode_bwd, _bwd_flops, _dec_bwd_bytes, 1),
        Op("step", "TopK SAE training step: forward, MSE loss, backward, Adam",
           setup_step, check_step, _step_flops, _step_bytes, 6),
    )  # fmt: skip
    for fam, label in FAMILIES.items():
        doc = f"{label} encode: the fused encoder (dense: z, activation, f [B, n])"
        checker = partial(check_family_encode, fam)
        yield Op(f"{fam}_encode", doc, setup_encode, checker, _enc_flops, _enc_bytes, 0, "threshold")
        doc = f"{label} step: forward, the SAE's loss, backward, Adam"
        checker = partial(check_family_step, fam)
        yield Op(f"{fam}_step", doc, setup_step, checker, _step_flops, _step_bytes, 6, "threshold")
    for arch, cls in ARCHITECTURES.items():
        doc = f"{cls.__name__}(x): inference forward (eval mode)"
        checker = partial(check_forward, _forward_rule(arch))
        yield Op(f"forward_{arch}", doc, setup_forward, checker, _forward_flops, _forward_bytes, 0, "forward")


OPS: dict[str, Op] = {op.name: op for op in _ops()}
LARGEST_N = "largest_n"  # the case of bench.largest (not per shape)


def select_ops(patterns: str | None) -> list[str]:
    """Case names matching any comma-separated fnmatch pattern ("encode*", "step"): ops of OPS, and
    LARGEST_N; all when None."""
    names = [*OPS, LARGEST_N]
    if not patterns:
        return names
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [name for name in names if any(fnmatch.fnmatch(name, p) for p in pats)]
    if not chosen:
        raise ValueError(f"--cases {patterns!r} matches none of {', '.join(names)}")
    return chosen


def providers_named(names) -> list[type[Provider]]:
    """Every provider class (TopK and families) whose name is in `names`; PROVIDERS is read at call time."""
    return [c for c in (*PROVIDERS.values(), *FAMILY_PROVIDERS) if c.name in names]


def check(op: str, P: Provider, I: Inputs) -> None:
    """Check P's output on `op` against the reference; raises CheckError. Leaves no gradients behind."""
    try:
        OPS[op].check(P, I, f"{op} [{I.shape.label()}] provider {P.name}")
    finally:
        I.zero_grad()


def build(op: str, cls: type[Provider], I: Inputs) -> Callable[[], object]:
    """Construct the provider, check it (raises CheckError), and return the function that runs `op`."""
    P = cls(I.params, I.fam)
    P.pinned(lambda: check(op, P, I))()
    setup = P.pinned(lambda: OPS[op].setup(P, I))  # some setups run the forward whose backward is timed
    return P.pinned(setup())


def estimate_bytes(op: str, cls: type[Provider], s: Shape) -> int:
    """A rough estimate of a provider's peak memory on `op`, to skip what cannot fit (CUDA OOM is caught too).

    The larger of the run (weights, their gradients and Adam's moments, inputs, the provider's [B, n] and
    [B*k, d] temporaries) and the check (weights, inputs, a few float64 [CHECK_ROWS, n] matrices).
    """
    params = s.itemsize * (2 * s.n * s.d + 6 * s.n + s.d)
    inputs = s.itemsize * 3 * s.B * s.d
    temps = s.itemsize * s.B * (cls.dense_temps.get(op, 0) * s.n + cls.gather_temps.get(op, 0) * s.k * s.d)
    run = params * (1 + OPS[op].weight_grads / 2) + inputs + temps
    return int(max(run, params + inputs + 3 * CHECK_ROWS * s.n * 8))
