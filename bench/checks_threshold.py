"""Checks of the threshold families' ops ("<family>_encode", "<family>_step") and of every `sae` class's
inference forward ("forward_<arch>") against the float64 oracle.

Threshold families (ReLU, JumpReLU, gated, BatchTopK) and the forwards are checked by their selection rule:
a latent is selected where its score is above 0 (ReLU: z; JumpReLU: z - theta; gated: pi_g; BatchTopK:
ReLU(z) minus the (R k)-th largest of the R checked rows, which the provider encodes as one batch; inference
forwards of BatchTopK, Matryoshka and Ordered: z - q, the global threshold; TopK's forward: the TopK rule of
checks_topk.py). Sets are compared as [R, n] masks, so slot order never matters: every selected latent must
score above -slack, every latent scoring above +slack must be selected (slack = SELECT_TOL x the row's
largest |pre-activation|), and the values at the selected latents must match. Gradients and x_hat are
compared with the reference for the provider's own selection. JumpReLU's threshold gradient (entries inside
the band |z - theta| < eps / 2) is checked as an interval: an entry within rounding (EDGE_TOL) of a band edge
may count or not.
"""

from __future__ import annotations

import torch

from .checks_topk import expect_topk_selection
from .inputs import BANDWIDTH, SPARSITY_COEFF, Inputs
from .oracle import (
    EDGE_TOL,
    SELECT_TOL,
    STEP_TOL,
    VALUE_TOL,
    CheckError,
    expect_rows_close,
    fail_if,
    forced_family,
    forced_reference,
    ref_activations,
    ref_decode,
    ref_full,
    rel_err,
)
from .providers import Provider


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
            fail_if(where, f"{name} at the selected latents", err, VALUE_TOL[dtype])
    return got


def check_family_encode(family: str, P: Provider, I: Inputs, where: str) -> None:
    x = I.x[I.rows]
    with torch.no_grad():
        f, gate = P.dense(P.encode(x))
    expect_threshold_selection(where, family, ref_full(family, P, I, x), f, gate, I.shape.k, I.shape.dtype)


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
    L, f64, gate64, score = forced_family(family, P, I, x, got, touched)
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
    fail_if(where, "loss", rel_err(loss.detach(), ref_loss.detach()), tol)
    got_grads = dict(zip(named, grads, strict=True))
    for name, want in zip(trained, ref_grads, strict=False):
        g = got_grads[name] if got_grads[name] is not None else torch.zeros_like(named[name])
        want = torch.zeros_like(L[name]) if want is None else want
        if name == "b_dec":
            fail_if(where, "grad b_dec", rel_err(g, want), tol)
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
    fail_if(where, "grad threshold (beyond band-edge rounding)", err, tol)


def check_forward(family: str, P: Provider, I: Inputs, where: str) -> None:
    """The selection of `model(x)` and x_hat, against the reference decode of that selection."""
    s, x = I.shape, I.x[I.rows]
    with torch.no_grad():
        act, x_hat = P.run(x)
    if family == "topk":
        values, indices = P.sparse(act)
        expect_topk_selection(where, ref_activations(I.params, x), values, indices, s.k, s.dtype)
        _, L, code = forced_reference(I.params, x, indices)
        want = ref_decode(L, code)
    else:
        got = expect_threshold_selection(where, family, ref_full(family, P, I, x), *P.dense(act), s.k, s.dtype)
        touched = got.any(0).nonzero().squeeze(1)
        L, f64, _, _ = forced_family(family, P, I, x, got, touched)
        want = f64 @ L["W_dec"] + L["b_dec"]
    fail_if(where, "x_hat", rel_err(x_hat, want.detach()), VALUE_TOL[s.dtype])
