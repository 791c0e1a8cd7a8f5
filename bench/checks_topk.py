"""Checks of the TopK ops (encode, encode_bwd, decode, decode_bwd, step) against the float64 oracle.

Selections are checked by rule, not by index equality: in bf16 a dense GEMM rounds z before its top-k, so
near-ties legitimately change places. A selection passes when every chosen latent with a positive value
is within `SELECT_TOL` (relative to the row's largest activation) of the row's true k-th activation,
no latent is chosen twice, its values match the reference at the chosen latents, and its sorted values
match the reference's top-k values. Gradients are then compared with the reference's gradients for that
provider's own selection.

Each check_<op>(P, I, where) raises oracle.CheckError on a mismatch; `where` names the case in the message.
"""

from __future__ import annotations

import torch

from .inputs import Inputs
from .oracle import (
    SELECT_TOL,
    STEP_TOL,
    VALUE_TOL,
    CheckError,
    expect_rows_close,
    fail_if,
    forced_reference,
    ref_activations,
    ref_decode,
    rel_err,
)
from .providers import Provider, mse


def expect_topk_selection(where: str, f64: torch.Tensor, values, indices, k: int, dtype: str) -> None:
    """The TopK rule, see the module docstring. f64: [R, n] the reference ReLU(z); values, indices: [R, k]."""
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
    fail_if(where, "values at the chosen latents", rel_err(values, chosen * live), tol)
    fail_if(where, "sorted top-k values", rel_err(values.sort(1, descending=True).values, top), tol)


def check_encode(P: Provider, I: Inputs, where: str) -> None:
    x = I.x[I.rows]
    with torch.no_grad():
        values, indices = P.sparse(P.encode(x))
    expect_topk_selection(where, ref_activations(I.params, x), values, indices, I.shape.k, I.shape.dtype)


def check_encode_bwd(P: Provider, I: Inputs, where: str) -> None:
    """The selection, then the gradients of sum(f^2) / 2 with respect to x, W_enc and b_enc."""
    p, tol = I.params, VALUE_TOL[I.shape.dtype]
    x = I.x[I.rows].detach().requires_grad_()
    act = P.encode(x)
    out = P.grad_tensor(act)
    values, indices = P.sparse(act)
    expect_topk_selection(where, ref_activations(p, x), values, indices, I.shape.k, I.shape.dtype)
    gx, gW, gb = torch.autograd.grad(out, (x, p.W_enc, p.b_enc), out.detach())
    touched, L, ref = forced_reference(p, x, indices)
    ref_loss = (ref.values * values.detach().double()).sum()
    rx, rW, rb = torch.autograd.grad(ref_loss, [L["x"], L["W_enc"], L["b_enc"]])
    fail_if(where, "grad x", rel_err(gx, rx), tol)
    expect_rows_close(where, "grad W_enc", gW, rW, touched, tol)
    expect_rows_close(where, "grad b_enc", gb, rb, touched, tol)


def check_decode(P: Provider, I: Inputs, where: str) -> None:
    values, indices = I.code.values[I.rows], I.code.indices[I.rows]
    with torch.no_grad():
        x_hat = P.decode(P.make_act(values, indices))
    _, L, code = forced_reference(I.params, I.x[I.rows], indices, values)
    fail_if(where, "x_hat", rel_err(x_hat, ref_decode(L, code)), VALUE_TOL[I.shape.dtype])


def check_decode_bwd(P: Provider, I: Inputs, where: str) -> None:
    p, tol = I.params, VALUE_TOL[I.shape.dtype]
    values = I.code.values[I.rows].detach().clone().requires_grad_()
    indices, g_out = I.code.indices[I.rows], I.g_out[I.rows]
    x_hat = P.decode(P.make_act(values, indices))
    gv, gW, gb = torch.autograd.grad(x_hat, (values, p.W_dec, p.b_dec), g_out)
    touched, L, code = forced_reference(p, I.x[I.rows], indices, values)
    rv, rW, rb = torch.autograd.grad(ref_decode(L, code), [L["values"], L["W_dec"], L["b_dec"]], g_out.double())
    fail_if(where, "grad values", rel_err(gv, rv), tol)
    expect_rows_close(where, "grad W_dec", gW, rW, touched, tol)
    fail_if(where, "grad b_dec", rel_err(gb, rb), tol)


def check_step(P: Provider, I: Inputs, where: str) -> None:
    """Loss and the four weight gradients of one step (the Adam update itself is torch's)."""
    p, tol = I.params, STEP_TOL[I.shape.dtype]
    x = I.x[I.rows]
    act = P.encode(x)
    values, indices = P.sparse(act)
    expect_topk_selection(where, ref_activations(p, x), values, indices, I.shape.k, I.shape.dtype)
    loss = mse(P.decode(act), x)
    grads = torch.autograd.grad(loss, p.tensors())
    touched, L, code = forced_reference(p, x, indices)
    ref_loss = (ref_decode(L, code) - L["x"]).pow(2).sum(-1).mean()
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    ref_grads = torch.autograd.grad(ref_loss, [L[k] for k in names])
    fail_if(where, "loss", rel_err(loss.detach(), ref_loss.detach()), tol)
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        if name == "b_dec":
            fail_if(where, "grad b_dec", rel_err(got, want), tol)
        else:
            expect_rows_close(where, f"grad {name}", got, want, touched, tol)
