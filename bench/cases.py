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

Threshold families (ReLU, JumpReLU, gated, BatchTopK; ops "<family>_encode", "<family>_step") and the
inference forwards of every `sae` class ("forward_<class>") are checked by their selection rule: a latent
is selected where its score is above 0 (ReLU: z; JumpReLU: z - theta; gated: pi_g; BatchTopK: ReLU(z) minus
the (R k)-th largest of the R checked rows, which the provider encodes as one batch; inference forwards of
BatchTopK, Matryoshka and Ordered: z - q, the global threshold). Sets are compared as [R, n] masks, so slot
order never matters: every selected latent must score above -slack, every latent scoring above +slack must
be selected (slack = SELECT_TOL x the row's largest |pre-activation|), and the values at the selected latents
must match. Gradients and x_hat are compared with the reference for the provider's own selection. JumpReLU's
threshold gradient (entries inside the band |z - theta| < eps / 2) is checked as an interval: an entry within
rounding (EDGE_TOL) of a band edge may count or not.

Adding an activation family: its providers in providers.py (see its docstring), its reference in
`family_ref`, and an `Op` per benchmarked op in `_family_ops`. Decode ops are shared.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch

import kernels
from kernels import SparseCode, reference

from .providers import BANDWIDTH, SPARSITY_COEFF, FamilyParams, Params, Provider

CHECK_ROWS = 256
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VALUE_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}  # relative error ||a - b|| / ||b||
STEP_TOL = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 3e-2}  # a step chains several roundings
SELECT_TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 1.6e-2}  # a few roundings of z
EDGE_TOL = {**SELECT_TOL, "float32": 1e-5}  # z's rounding near a JumpReLU band edge (fp32: GEMM accumulation)


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
    number of distinct latents in `code` (rows of W a sparse op must read); fam: the threshold families'
    parameters, calibrated on the checked rows.
    """

    shape: Shape
    params: Params
    fam: FamilyParams
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
        fam = FamilyParams.calibrate(params, x[rows], seed)
        return cls(shape, params, fam, x, code, g_out, rows, touched)

    def nbytes(self) -> int:
        """Bytes of the tensors every provider of this shape shares (weights and inputs)."""
        shared = [*self.params.tensors(), *self.fam.tensors(), self.x, *self.code, self.g_out]
        return sum(t.numel() * t.element_size() for t in shared)

    def zero_grad(self) -> None:
        self.params.zero_grad()
        self.fam.zero_grad()


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
    # lr = 0: Adam does all its work, but the weights every later case shares stay as they were.
    opt = torch.optim.Adam(P.params(), lr=0.0, fused=I.x.is_cuda or None)

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


# ---- threshold families and forwards ---------------------------------------------------------------


def family_ref(family: str, L: dict, x64: torch.Tensor, q: float) -> dict:
    """The float64 reference of a family on the latents whose per-latent tensors L holds ([U] rows).

    L: the provider's named tensors in float64 (b_dec [d]); x64: [R, d]. Returns [R, U] tensors: "score"
    (selected where > 0; BatchTopK: ReLU(z), its global cut comes later), "value" (f where selected),
    "pre" (u = (x - b_dec) W_enc^T: a low-precision GEMM rounds relative to its magnitude), and for gated
    "gate" (ReLU(pi_g) where selected) and "score_f" (where f itself is nonzero: pi_g > 0 and pi_m > 0).
    """
    u = (x64 - L["b_dec"]) @ L["W_enc"].T
    if family == "gated":
        pi_g = u + L["b_gate"]
        pi_m = torch.exp(L["r_mag"]) * u + L["b_mag"]
        return {
            "score": pi_g,
            "value": torch.relu(pi_m),
            "pre": u,
            "gate": pi_g,
            "score_f": torch.minimum(pi_g, pi_m),
        }
    z = u + L["b_enc"]
    score = {"jumprelu": lambda: z - L["threshold"], "global": lambda: z - q, "batchtopk": lambda: torch.relu(z)}
    return {"score": score.get(family, lambda: z)(), "value": z, "pre": u}


def _per_latent(named: dict, n: int) -> list[str]:
    return [k for k, t in named.items() if k != "b_dec" and t.dim() >= 1 and t.shape[0] == n]


def ref_full(family: str, P: Provider, I: Inputs, x: torch.Tensor, chunk: int = 1 << 14) -> dict:
    """family_ref over all n latents ([R, n] float64 tensors, computed over column chunks) plus "scale"
    [R, 1], the row's largest |pre-activation|. BatchTopK's score becomes ReLU(z) - t, t the (R k)-th largest."""
    named = {k: t.detach() for k, t in P.named().items()}
    n = I.shape.n
    per = _per_latent(named, n)
    parts = []
    for c0 in range(0, n, chunk):
        L = {k: (t[c0 : c0 + chunk] if k in per else t).double() for k, t in named.items()}
        parts.append(family_ref(family, L, x.double(), I.fam.q))
    out = {k: torch.cat([p[k] for p in parts], 1) for k in parts[0]}
    out["scale"] = out["pre"].abs().amax(1, keepdim=True)
    if family == "batchtopk":
        t = out["score"].reshape(-1).topk(min(out["score"].numel(), x.shape[0] * I.shape.k)).values[-1]
        out["score"] = out["score"] - t if t > 0 else out["score"]
    return out


def expect_threshold_selection(where: str, family: str, ref: dict, f, gate, k: int, dtype: str) -> torch.Tensor:
    """The threshold rule, see the module docstring. f, gate: [R, n] (gate None but for gated encoders).
    Returns the selection [R, n] bool."""
    got = (gate if gate is not None else f).detach() != 0
    score = ref["score_f"] if family == "gated" and gate is None else ref["score"]
    slack = SELECT_TOL[dtype] * ref["scale"]
    for bad, what in (
        (got & (score < -slack), "selects a latent below"),
        (~got & (score > slack), "misses a latent above"),
    ):
        if bad.any():
            r = int(bad.any(1).nonzero()[0])
            raise CheckError(f"{where}: row {r} {what} its threshold (beyond rounding)")
    if family == "batchtopk":
        R, sure = f.shape[0], int((score > slack).sum())
        if not min(R * k, sure) <= int(got.sum()) <= R * k:
            raise CheckError(f"{where}: selects {int(got.sum())} entries, not the batch's {R * k}")
    for name, vals, want in (("values", f, ref["value"]), ("ReLU(pi_g)", gate, ref.get("gate"))):
        if vals is not None:  # relative to the magnitude the GEMM rounded (values are z minus a threshold)
            want = torch.where(got, want, 0.0)
            scale = torch.where(got, torch.maximum(ref["pre"].abs(), want.abs()), 0.0).norm().clamp_min(1e-300)
            err = float((vals.detach().double() - want).norm() / scale)
            _fail_if(where, f"{name} at the selected latents", err, VALUE_TOL[dtype])
    return got


def check_family_encode(family: str, P: Provider, I: Inputs, where: str) -> None:
    x = I.x[I.rows]
    with torch.no_grad():
        f, gate = P.dense(P.encode(x))
    expect_threshold_selection(where, family, ref_full(family, P, I, x), f, gate, I.shape.k, I.shape.dtype)


def _forced_family(family: str, P: Provider, I: Inputs, x, got, touched):
    """Leaves (float64, per-latent tensors on `touched`), the reference for the selection `got` [R, n]:
    (L, f64 [R, U] (the activations, differentiable), gate64 or None, score [R, U])."""
    named = P.named()
    per = _per_latent(named, I.shape.n)
    L = {k: (t[touched] if k in per else t).detach().double().requires_grad_() for k, t in named.items()}
    r = family_ref(family, L, x.double(), I.fam.q)
    sel = got[:, touched]
    gate = torch.where(sel, r["gate"], 0.0) if family == "gated" else None
    return L, torch.where(sel, r["value"], 0.0), gate, r["score"].detach()


def check_family_step(family: str, P: Provider, I: Inputs, where: str) -> None:
    """The selection, the loss and every parameter's gradient of one step (the Adam update is torch's)."""
    s, x = I.shape, I.x[I.rows]
    act = P.encode(x)
    ref = ref_full(family, P, I, x)
    got = expect_threshold_selection(where, family, ref, *P.dense(act), s.k, s.dtype)
    named = P.named()
    loss = P.loss(x)
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    keep = got.any(0)
    edge = EDGE_TOL[s.dtype] * ref["scale"]
    if family == "jumprelu":  # the threshold gradient reaches the band's latents too
        keep |= ((ref["score"].abs() - BANDWIDTH / 2) < edge).any(0)
    touched = keep.nonzero().squeeze(1)
    L, f64, gate64, score = _forced_family(family, P, I, x, got, touched)
    x64 = x.detach().double()
    ref_loss = (f64 @ L["W_dec"] + L["b_dec"] - x64).pow(2).sum(-1).mean()
    if family == "relu":
        ref_loss = ref_loss + SPARSITY_COEFF * (f64 * L["W_dec"].norm(dim=1)).sum(-1).mean()
    elif family == "jumprelu":
        ref_loss = ref_loss + SPARSITY_COEFF * got.sum(1).double().mean()
    elif family == "gated":
        aux = (gate64 @ L["W_dec"].detach() + L["b_dec"].detach() - x64).pow(2).sum(-1).mean()
        ref_loss = ref_loss + SPARSITY_COEFF * gate64.sum(-1).mean() + aux
    trained = [k for k in named if k != "threshold"]
    ref_grads = torch.autograd.grad(ref_loss, [L[k] for k in trained] + [f64], allow_unused=True)
    tol = STEP_TOL[s.dtype]
    _fail_if(where, "loss", rel_err(loss.detach(), ref_loss.detach()), tol)
    got_grads = dict(zip(named, grads, strict=True))
    for name, want in zip(trained, ref_grads, strict=False):
        g = got_grads[name] if got_grads[name] is not None else torch.zeros_like(named[name])
        want = torch.zeros_like(L[name]) if want is None else want
        if name == "b_dec":
            _fail_if(where, "grad b_dec", rel_err(g, want), tol)
        else:
            expect_rows_close(where, f"grad {name}", g, want, touched, tol)
    if family == "jumprelu":
        expect_threshold_grad(where, got_grads["threshold"], L["threshold"].detach(), score, ref_grads[-1],
                              edge, touched, x.shape[0], tol)  # fmt: skip


def expect_threshold_grad(where, got, theta, s, g, edge, touched, R: int, tol: float) -> None:
    """JumpReLU's threshold gradient as an interval. got: [n]; theta: [U]; s: [R, U] = z - theta;
    g: [R, U] dL/df of the reference. Each band entry adds -(theta / eps) g - coeff / (R eps); entries within
    `edge` [R, 1] of a band edge may or may not, so the gradient must lie between the sums of the sure
    entries plus those uncertain ones of either sign."""
    eps = BANDWIDTH
    terms = -(theta / eps) * g - SPARSITY_COEFF / (R * eps)
    unsure = ((s.abs() - eps / 2).abs() <= edge).double()
    sure = ((s.abs() < eps / 2) & ((s.abs() - eps / 2).abs() > edge)).double()
    lo = (sure * terms + unsure * terms.clamp(max=0)).sum(0)
    hi = (sure * terms + unsure * terms.clamp(min=0)).sum(0)
    got = torch.zeros(got.shape[0], dtype=torch.float64, device=theta.device) if got is None else got.double()
    inside = got[touched]
    outside = got.index_fill(0, touched, 0.0)
    miss = (lo - inside).clamp_min(0) + (inside - hi).clamp_min(0)
    err = float(torch.cat([miss, outside]).norm() / torch.maximum(lo.norm(), hi.norm()).clamp_min(1e-300))
    _fail_if(where, "grad threshold (beyond band-edge rounding)", err, tol)


def setup_forward(P: Provider, I: Inputs):
    def run():
        with torch.no_grad():
            return P.forward(I.x)

    return run


def check_forward(family: str, P: Provider, I: Inputs, where: str) -> None:
    """The selection of `model(x)` and x_hat, against the reference decode of that selection."""
    s, x = I.shape, I.x[I.rows]
    with torch.no_grad():
        act, x_hat = P.run(x)
    if family == "topk":
        values, indices = P.sparse(act)
        expect_topk_selection(where, ref_activations(I.params, x), values, indices, s.k, s.dtype)
        _, L, code = forced_reference(I.params, x, indices)
        want = reference.sparse_decode(code, L["W_dec"], L["b_dec"])
    else:
        got = expect_threshold_selection(where, family, ref_full(family, P, I, x), *P.dense(act), s.k, s.dtype)
        touched = got.any(0).nonzero().squeeze(1)
        L, f64, _, _ = _forced_family(family, P, I, x, got, touched)
        want = f64 @ L["W_dec"] + L["b_dec"]
    _fail_if(where, "x_hat", rel_err(x_hat, want.detach()), VALUE_TOL[s.dtype])


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

FAMILIES = {"relu": "ReLU", "jumprelu": "JumpReLU", "gated": "gated", "batchtopk": "BatchTopK"}
# inference forward per sae class -> the selection rule of its eval-mode encoder
FORWARDS = {"topk": "topk", "batchtopk": "global", "jumprelu": "jumprelu", "gated": "gated", "relu": "relu",
            "matryoshka": "global", "ordered": "global"}  # fmt: skip
CLASSES = {"topk": "TopKSAE", "batchtopk": "BatchTopKSAE", "jumprelu": "JumpReLUSAE", "gated": "GatedSAE",
           "relu": "ReLUSAE", "matryoshka": "MatryoshkaSAE", "ordered": "OrderedSAE"}  # fmt: skip


def _family_ops():
    """The threshold families' encode and step (L0 ~ k, see FamilyParams), and every class's forward."""
    enc_flops = lambda s, U: 2 * s.B * s.n * s.d
    step_flops = lambda s, U: 2 * s.B * s.n * s.d + 10 * s.B * s.k * s.d
    for fam, label in FAMILIES.items():
        yield Op(
            f"{fam}_encode",
            f"{label} encode: the fused encoder (dense: z, activation, f [B, n])",
            setup_encode,
            partial(check_family_encode, fam),
            enc_flops,
            _enc_bytes,
            0,
            "threshold",
        )
        yield Op(
            f"{fam}_step",
            f"{label} step: forward, the SAE's loss, backward, Adam",
            setup_step,
            partial(check_family_step, fam),
            step_flops,
            _step_bytes,
            6,
            "threshold",
        )
    for arch, rule in FORWARDS.items():
        yield Op(
            f"forward_{arch}",
            f"{CLASSES[arch]}(x): inference forward (eval mode)",
            setup_forward,
            partial(check_forward, rule),
            lambda s, U: 2 * s.B * s.n * s.d + 2 * s.B * s.k * s.d,
            lambda s, U: _enc_bytes(s, U) + _dec_bytes(s, U),
            0,
            "forward",
        )


OPS.update((op.name, op) for op in _family_ops())  # fmt: skip


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


def check(op: str, P: Provider, I: Inputs) -> None:
    """Check P's output on `op` against the reference; raises CheckError. Leaves no gradients behind."""
    try:
        OPS[op].check(P, I, f"{op} [{I.shape.label()}] provider {P.name}")
    finally:
        I.zero_grad()


def build(op: str, cls: type[Provider], I: Inputs) -> Callable[[], object]:
    """Construct the provider, check it (raises CheckError), and return the function that runs `op`."""
    P = cls(I.params, I.fam)
    check(op, P, I)
    return OPS[op].setup(P, I)


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


# ---- suites (DESIGN section 7) ------------------------------------------------------------------------

GPU_REFERENCE = Shape(B=8192, d=4096, n=131072, k=64, dtype="bfloat16")
CPU_TARGET = Shape(B=2048, d=768, n=24576, k=32, dtype="float32")
FAMILY_N = {"cuda": GPU_REFERENCE.n, "cpu": 4096}  # the quick suite's n for the threshold and forward ops


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


def family_shapes(suite: str, device: str, shapes: list[Shape]) -> list[Shape]:
    """Where the threshold-family and forward ops run: every shape of the full suite; in the quick suite the
    shapes whose n is nearest FAMILY_N[device] (CPU: what fits its time budget; CUDA: the reference n)."""
    if suite == "full" or not shapes:
        return list(shapes)
    n = min({s.n for s in shapes}, key=lambda n: (abs(n - FAMILY_N[device]), n))
    return [s for s in shapes if s.n == n]
