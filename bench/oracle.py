"""The float64 oracle every provider is checked against before it is timed, and the tolerances.

A check runs the provider at the case's full n, d, k and dtype on `CHECK_ROWS` rows of the case's batch
(spread over the batch) and compares with `kernels.reference` in float64, restricted to the latents the
selection touched, so the reference never needs a float64 copy of a whole [n, d] weight. Errors are
relative: ||got - want|| / ||want||. A mismatch raises `CheckError`. The selection rules that use these
references are in checks_topk.py and checks_threshold.py.
"""

from __future__ import annotations

import torch

from kernels import SparseCode, reference

from .inputs import Inputs, Params
from .providers import Provider

VALUE_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}  # relative error ||a - b|| / ||b||
STEP_TOL = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 3e-2}  # a step chains several roundings
SELECT_TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 1.6e-2}  # a few roundings of z
EDGE_TOL = {**SELECT_TOL, "float32": 1e-5}  # z's rounding near a JumpReLU band edge (fp32: GEMM accumulation)


class CheckError(AssertionError):
    """A provider's output disagrees with the reference: the case fails instead of being timed."""


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def fail_if(where: str, name: str, err: float, tol: float) -> None:
    """CheckError unless err <= tol (NaN fails too)."""
    if not err <= tol:
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
    fail_if(where, name, float(diff_sq.sqrt() / want.double().norm().clamp_min(1e-300)), tol)


# ---- TopK: ReLU(z) and a given selection --------------------------------------------------------------


def ref_activations(p: Params, x: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
    """f64 = ReLU((x - b_dec) W_enc^T + b_enc) in float64, [R, n], computed over column chunks of W_enc."""
    x64, b_dec = x.double(), p.b_dec.detach().double()
    n = p.W_enc.shape[0]
    out = torch.empty(x.shape[0], n, dtype=torch.float64, device=x.device)
    for c0 in range(0, n, chunk):
        W, b = (t.detach()[c0 : c0 + chunk].double() for t in (p.W_enc, p.b_enc))
        out[:, c0 : c0 + chunk] = reference.preactivations(x64, W, b, b_dec)
    return out.clamp_min_(0)


def forced_reference(p: Params, x: torch.Tensor, indices: torch.Tensor, values=None):
    """The float64 reference computation for a given selection, on the latents it touches.

    x: [R, d]; indices: [R, k]. Returns (touched [U] ids, leaves dict of float64 tensors requiring grad,
    SparseCode of the activations at the selection [R, k] (or `values` in float64 when given: a decode's
    input) with indices local to `touched`).
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


def ref_decode(L: dict, code: SparseCode) -> torch.Tensor:
    """x_hat [R, d] of forced_reference's code, from its leaves L."""
    return reference.sparse_decode(code, L["W_dec"], L["b_dec"])


# ---- threshold families: score, value, gate ------------------------------------------------------------


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


def forced_family(family: str, P: Provider, I: Inputs, x, got, touched):
    """Leaves (float64, per-latent tensors on `touched`), the reference for the selection `got` [R, n]:
    (L, f64 [R, U] (the activations, differentiable), gate64 or None, score [R, U])."""
    named = P.named()
    per = _per_latent(named, I.shape.n)
    L = {k: (t[touched] if k in per else t).detach().double().requires_grad_() for k, t in named.items()}
    r = family_ref(family, L, x.double(), I.fam.q)
    sel = got[:, touched]
    gate = torch.where(sel, r["gate"], 0.0) if family == "gated" else None
    return L, torch.where(sel, r["value"], 0.0), gate, r["score"].detach()
