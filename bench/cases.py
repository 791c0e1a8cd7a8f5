"""Benchmark cases: shapes, inputs, the ops and their reference checks, the quick and full suites.

A case is (op, shape). Every provider's output is checked against the float64 reference
(`kernels.reference`) before it is timed; a mismatch raises `CheckError`. The check runs the provider at
the case's full n, d, k and dtype on `CHECK_ROWS` rows of the case's batch (the rows are spread over the
batch), and compares in float64 restricted to the latents the selection touched, so the reference never
needs a float64 copy of a whole [n, d] weight.

Selections are checked by rule, not by index equality: in bf16 a dense GEMM rounds z before its top-k, so
near-ties legitimately change places. A selection passes when every chosen latent with a positive value
is within `SELECT_TOL` (relative to the row's largest activation) of the row's true k-th activation,
no latent is chosen twice, its values match the reference at the chosen latents, and its sorted values
match the reference's top-k values. Gradients are then compared with the reference's gradients for that
provider's own selection.

Adding an activation family (e.g. JumpReLU once `kernels.jumprelu_encode` lands): its providers in
providers.py, an `Op` per benchmarked op here ("jumprelu_encode", "jumprelu_step", ...) whose check uses its
own reference activation and selection rule (entries above the threshold instead of the top k), registered
in OPS only when the kernel exists (`hasattr(kernels, "jumprelu_encode")`). Decode ops are shared.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import kernels
from kernels import SparseCode, reference

from .providers import Params, Provider

CHECK_ROWS = 256
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VALUE_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}  # relative error ||a - b|| / ||b||
STEP_TOL = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 3e-2}  # a step chains several roundings
SELECT_TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 1.6e-2}  # a few roundings of z


class CheckError(AssertionError):
    """A provider's output disagrees with the reference: the case fails instead of being timed."""


@dataclass(frozen=True)
class Shape:
    B: int
    d: int
    n: int
    k: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    def label(self) -> str:
        return f"B={self.B} d={self.d} n={self.n} k={self.k} {self.dtype}"

    def asdict(self) -> dict:
        return asdict(self)


@dataclass
class Inputs:
    """What every op of one shape shares.

    x: [B, d]; code: SparseCode [B, k] (the fused encoder's output for x, the decode ops' input);
    g_out: [B, d] (the decode backward's upstream gradient); rows: [R] the checked rows; touched: the
    number of distinct latents in `code` (rows of W a sparse op must read).
    """

    shape: Shape
    params: Params
    x: torch.Tensor
    code: SparseCode
    g_out: torch.Tensor
    rows: torch.Tensor
    touched: int

    @classmethod
    def make(cls, shape: Shape, device, seed: int = 0) -> Inputs:
        dtype = shape.torch_dtype
        params = Params.random(shape.d, shape.n, shape.k, dtype, device, seed)
        g = torch.Generator(device=device).manual_seed(seed + 1)
        x = torch.randn(shape.B, shape.d, generator=g, device=device, dtype=dtype)
        g_out = torch.randn(shape.B, shape.d, generator=g, device=device, dtype=dtype)
        with torch.no_grad():
            code = kernels.topk_encode(x, params.W_enc, params.b_enc, shape.k, b_dec=params.b_dec)
        rows = torch.linspace(0, shape.B - 1, min(shape.B, CHECK_ROWS), device=device).round().long().unique()
        touched = int(torch.unique(code.indices).numel())
        return cls(shape, params, x, code, g_out, rows, touched)

    def nbytes(self) -> int:
        """Bytes of the tensors every provider of this shape shares (weights and inputs)."""
        shared = [*self.params.tensors(), self.x, *self.code, self.g_out]
        return sum(t.numel() * t.element_size() for t in shared)


# ---- float64 reference, restricted to the latents a selection touches ----------------------------------


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def _fail_if(where: str, name: str, err: float, tol: float) -> None:
    if not err <= tol:  # NaN fails too
        raise CheckError(f"{where}: {name} relative error {err:.3g} > {tol:g} (vs the float64 reference)")


def _row_sq_norms(t: torch.Tensor, chunk: int = 1 << 13) -> torch.Tensor:
    """[n] float64 squared row norms of t [n, d], without a float64 copy of t."""
    return torch.cat([t[i : i + chunk].double().pow(2).sum(-1) for i in range(0, t.shape[0], chunk)])


def expect_rows_close(where, name, got, want, touched, tol):
    """got: [n, d] or [n] full gradient; want: the reference for rows `touched` only (all others are 0)."""
    got2 = got.reshape(got.shape[0], -1)
    outside = torch.ones(got2.shape[0], dtype=torch.bool, device=got.device)
    outside[touched] = False
    diff_sq = (got2[touched].double() - want.reshape(len(touched), -1)).pow(2).sum()
    diff_sq += _row_sq_norms(got2)[outside].sum()
    _fail_if(where, name, float(diff_sq.sqrt() / want.double().norm().clamp_min(1e-300)), tol)


def ref_activations(p: Params, x: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
    """f64 = ReLU((x - b_dec) W_enc^T + b_enc) in float64, [R, n], computed over column chunks of W_enc."""
    x64, b_dec = x.double(), p.b_dec.detach().double()
    n = p.W_enc.shape[0]
    out = torch.empty(x.shape[0], n, dtype=torch.float64, device=x.device)
    for c0 in range(0, n, chunk):
        W, b = (t.detach()[c0 : c0 + chunk].double() for t in (p.W_enc, p.b_enc))
        out[:, c0 : c0 + chunk] = reference.preactivations(x64, W, b, b_dec)
    return out.clamp_min_(0)


def expect_topk_selection(where: str, f64: torch.Tensor, values, indices, k: int, dtype: str) -> None:
    """The TopK rule, see the module docstring. f64: [R, n]; values, indices: [R, k]."""
    values, idx = values.detach(), indices.long()
    top = f64.topk(k, dim=1).values
    chosen = f64.gather(1, idx)
    live = values > 0
    slack = SELECT_TOL[dtype] * top[:, :1]
    bad = live & (chosen < top[:, -1:] - slack)
    if bad.any():
        r = int(bad.any(1).nonzero()[0])
        raise CheckError(f"{where}: row {r} selects latents outside its top-{k} (beyond rounding)")
    marked = torch.where(live, idx, -1 - torch.arange(k, device=idx.device))  # dead slots never collide
    if (marked.sort(1).values.diff(dim=1) == 0).any():
        raise CheckError(f"{where}: a row selects the same latent twice")
    tol = VALUE_TOL[dtype]
    _fail_if(where, "values at the chosen latents", rel_err(values, chosen * live), tol)
    _fail_if(where, "sorted top-k values", rel_err(values.sort(1, descending=True).values, top), tol)


def forced_reference(p: Params, x: torch.Tensor, indices: torch.Tensor, values=None):
    """The float64 reference computation for a given selection, on the latents it touches.

    x: [R, d]; indices: [R, k]. Returns (touched [U] ids, leaves dict of float64 tensors requiring grad,
    v64 [R, k] the activations at the selection (or `values` in float64 when given: a decode's input)).
    """
    touched, local = torch.unique(indices.long(), return_inverse=True)
    leaf = lambda t: t.detach().double().requires_grad_()
    L = {
        "x": leaf(x),
        "W_enc": leaf(p.W_enc[touched]),
        "b_enc": leaf(p.b_enc[touched]),
        "W_dec": leaf(p.W_dec[touched]),
        "b_dec": leaf(p.b_dec),
    }
    if values is None:
        z = reference.preactivations(L["x"], L["W_enc"], L["b_enc"], L["b_dec"])
        v64 = torch.relu(z).gather(1, local)
    else:
        L["values"] = leaf(values)
        v64 = L["values"]
    return touched, L, SparseCode(v64, local)


# ---- ops ---------------------------------------------------------------------------------------------


def _grads(out, wrt, grad_out):
    return torch.autograd.grad(out, wrt, grad_out, retain_graph=True)


def setup_encode(P: Provider, I: Inputs):
    def run():
        with torch.no_grad():
            return P.encode(I.x)

    return run


def check_encode(P: Provider, I: Inputs, where: str) -> None:
    x = I.x[I.rows]
    with torch.no_grad():
        values, indices = P.sparse(P.encode(x))
    expect_topk_selection(where, ref_activations(I.params, x), values, indices, I.shape.k, I.shape.dtype)


def setup_encode_bwd(P: Provider, I: Inputs):
    x = I.x.detach().requires_grad_()
    out = P.grad_tensor(P.encode(x))
    wrt, g = (x, I.params.W_enc, I.params.b_enc), out.detach()  # upstream = f: the gradient of sum(f^2) / 2
    return lambda: _grads(out, wrt, g)


def check_encode_bwd(P: Provider, I: Inputs, where: str) -> None:
    p, tol = I.params, VALUE_TOL[I.shape.dtype]
    x = I.x[I.rows].detach().requires_grad_()
    act = P.encode(x)
    out = P.grad_tensor(act)
    values, indices = P.sparse(act)
    expect_topk_selection(where, ref_activations(p, x), values, indices, I.shape.k, I.shape.dtype)
    gx, gW, gb = _grads(out, (x, p.W_enc, p.b_enc), out.detach())
    touched, L, ref = forced_reference(p, x, indices)
    ref_loss = (ref.values * values.detach().double()).sum()
    rx, rW, rb = torch.autograd.grad(ref_loss, [L["x"], L["W_enc"], L["b_enc"]])
    _fail_if(where, "grad x", rel_err(gx, rx), tol)
    expect_rows_close(where, "grad W_enc", gW, rW, touched, tol)
    expect_rows_close(where, "grad b_enc", gb, rb, touched, tol)


def setup_decode(P: Provider, I: Inputs):
    act = P.make_act(I.code.values, I.code.indices)

    def run():
        with torch.no_grad():
            return P.decode(act)

    return run


def check_decode(P: Provider, I: Inputs, where: str) -> None:
    values, indices = I.code.values[I.rows], I.code.indices[I.rows]
    with torch.no_grad():
        x_hat = P.decode(P.make_act(values, indices))
    _, L, code = forced_reference(I.params, I.x[I.rows], indices, values)
    want = reference.sparse_decode(code, L["W_dec"], L["b_dec"])
    _fail_if(where, "x_hat", rel_err(x_hat, want), VALUE_TOL[I.shape.dtype])


def setup_decode_bwd(P: Provider, I: Inputs):
    values = I.code.values.detach().clone().requires_grad_()
    x_hat = P.decode(P.make_act(values, I.code.indices))
    wrt = (values, I.params.W_dec, I.params.b_dec)
    return lambda: _grads(x_hat, wrt, I.g_out)


def check_decode_bwd(P: Provider, I: Inputs, where: str) -> None:
    p, tol = I.params, VALUE_TOL[I.shape.dtype]
    values = I.code.values[I.rows].detach().clone().requires_grad_()
    indices, g_out = I.code.indices[I.rows], I.g_out[I.rows]
    gv, gW, gb = _grads(P.decode(P.make_act(values, indices)), (values, p.W_dec, p.b_dec), g_out)
    touched, L, code = forced_reference(p, I.x[I.rows], indices, values)
    want = reference.sparse_decode(code, L["W_dec"], L["b_dec"])
    rv, rW, rb = torch.autograd.grad(want, [L["values"], L["W_dec"], L["b_dec"]], g_out.double())
    _fail_if(where, "grad values", rel_err(gv, rv), tol)
    expect_rows_close(where, "grad W_dec", gW, rW, touched, tol)
    _fail_if(where, "grad b_dec", rel_err(gb, rb), tol)


def setup_step(P: Provider, I: Inputs):
    opt = torch.optim.Adam(P.params(), lr=1e-4)

    def run():
        opt.zero_grad(set_to_none=True)
        P.loss(I.x).backward()
        opt.step()

    return run


def check_step(P: Provider, I: Inputs, where: str) -> None:
    """Loss and the four weight gradients of one step (the Adam update itself is torch's)."""
    p, tol = I.params, STEP_TOL[I.shape.dtype]
    x = I.x[I.rows]
    act = P.encode(x)
    values, indices = P.sparse(act)
    expect_topk_selection(where, ref_activations(p, x), values, indices, I.shape.k, I.shape.dtype)
    loss = (P.decode(act).float() - x.float()).pow(2).sum(-1).mean()
    grads = torch.autograd.grad(loss, p.tensors())
    touched, L, code = forced_reference(p, x, indices)
    x_hat = reference.sparse_decode(code, L["W_dec"], L["b_dec"])
    ref_loss = (x_hat - L["x"]).pow(2).sum(-1).mean()
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    ref_grads = torch.autograd.grad(ref_loss, [L[k] for k in names])
    _fail_if(where, "loss", rel_err(loss.detach(), ref_loss.detach()), tol)
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        if name == "b_dec":
            _fail_if(where, "grad b_dec", rel_err(got, want), tol)
        else:
            expect_rows_close(where, f"grad {name}", got, want, touched, tol)


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


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("encode", "TopK encode forward: (values, indices) = TopK(ReLU((x - b_dec) W_enc^T + b_enc))",
           setup_encode, check_encode, lambda s, U: 2 * s.B * s.n * s.d, _enc_bytes, 0),
        Op("encode_bwd", "encoder backward: grads of x, W_enc, b_enc from the values' gradient",
           setup_encode_bwd, check_encode_bwd, lambda s, U: 4 * s.B * s.k * s.d, _enc_bwd_bytes, 1),
        Op("decode", "sparse decode: x_hat = b_dec + sum_j values_j W_dec[indices_j]",
           setup_decode, check_decode, lambda s, U: 2 * s.B * s.k * s.d, _dec_bytes, 0),
        Op("decode_bwd", "decode backward: grads of values, W_dec, b_dec from x_hat's gradient",
           setup_decode_bwd, check_decode_bwd, lambda s, U: 4 * s.B * s.k * s.d, _dec_bwd_bytes, 1),
        Op("step", "TopK SAE training step: forward, MSE loss, backward, Adam",
           setup_step, check_step, lambda s, U: 2 * s.B * s.n * s.d + 10 * s.B * s.k * s.d, _step_bytes, 6),
    )
}  # fmt: skip


def select_ops(patterns: str | None) -> list[str]:
    """Op names matching any comma-separated fnmatch pattern ("encode*", "step"); all when None."""
    if not patterns:
        return list(OPS)
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [name for name in OPS if any(fnmatch.fnmatch(name, p) for p in pats)]
    if not chosen:
        raise ValueError(f"--cases {patterns!r} matches none of {', '.join(OPS)}")
    return chosen


def check(op: str, P: Provider, I: Inputs) -> None:
    """Check P's output on `op` against the reference; raises CheckError. Leaves no gradients behind."""
    OPS[op].check(P, I, f"{op} [{I.shape.label()}] provider {P.name}")
    I.params.zero_grad()


def build(op: str, cls: type[Provider], I: Inputs) -> Callable[[], object]:
    """Construct the provider, check it (raises CheckError), and return the function that runs `op`."""
    P = cls(I.params)
    check(op, P, I)
    return OPS[op].setup(P, I)


def estimate_bytes(op: str, cls: type[Provider], s: Shape) -> int:
    """A rough estimate of a provider's peak memory on `op`, to skip what cannot fit (CUDA OOM is caught too).

    The larger of the run (weights, their gradients and Adam's moments, inputs, the provider's [B, n] and
    [B*k, d] temporaries) and the check (weights, inputs, a few float64 [CHECK_ROWS, n] matrices).
    """
    params = s.itemsize * (2 * s.n * s.d + s.n + s.d)
    inputs = s.itemsize * 3 * s.B * s.d
    temps = s.itemsize * s.B * (cls.dense_temps.get(op, 0) * s.n + cls.gather_temps.get(op, 0) * s.k * s.d)
    run = params * (1 + OPS[op].weight_grads / 2) + inputs + temps
    return int(max(run, params + inputs + 3 * CHECK_ROWS * s.n * 8))


# ---- suites (DESIGN section 7) ------------------------------------------------------------------------

GPU_REFERENCE = Shape(B=8192, d=4096, n=131072, k=64, dtype="bfloat16")
CPU_TARGET = Shape(B=2048, d=768, n=24576, k=32, dtype="float32")


def suite_shapes(suite: str, device: str, dtype: str | None, overrides: dict) -> list[Shape]:
    """The shapes of `suite` ("quick" or "full") on `device`; overrides: {"B"|"d"|"n"|"k": [ints]}.

    quick, CUDA: the reference shape (B=8192, d=4096, k=64, bf16) with n = 2^14 .. 2^17 (2^17 is the
    reference). quick, CPU: the DESIGN's CPU target (B=2048, d=768, k=32, fp32) with n = 4096, 8192, 24576
    (24576 is the target), sized to finish within the 5-minute CPU budget.
    full: n = 2^14 .. 2^20 x d in 768, 2304, 4096 x k in 32, 64, 128.
    """
    base = GPU_REFERENCE if device == "cuda" else CPU_TARGET
    if suite == "quick":
        ns = [2**e for e in range(14, 18)] if device == "cuda" else [4096, 8192, 24576]
        axes = {"B": [base.B], "d": [base.d], "n": ns, "k": [base.k]}
    else:
        axes = {"B": [base.B], "d": [768, 2304, 4096], "n": [2**e for e in range(14, 21)], "k": [32, 64, 128]}
    axes.update({key: v for key, v in overrides.items() if v})
    dtype = dtype or base.dtype
    return [
        Shape(B, d, n, k, dtype) for d in axes["d"] for k in axes["k"] for n in axes["n"] for B in axes["B"] if k <= n
    ]
