"""Concept-cone containment (Rocchi--Henry, Fel and Franchi, "A Geometric Unification of Concept Learning with
Concept Cones"): how well the cone of nonnegative combinations of an SAE's decoder rows contains reference concept
directions (a concept-bottleneck model's or a probe's weights).

For a unit direction u and a set S of at most s decoder atoms, the projection onto cone(S) is
p = W_S^T c*, c* = argmin_{c >= 0} ||u - W_S^T c|| (nonnegative least squares); containment at s is
cos(u, p) = <u, p> / ||p|| (= ||p||, the projection being orthogonal), 0 when p = 0. S is grown by nonnegative
orthogonal matching pursuit: add the atom most positively aligned with the residual u - p, re-solve the NNLS.
When no atom is positively aligned with the residual, p is the projection onto the whole decoder cone (the NNLS
optimality conditions hold for every atom) and larger s change nothing.
"""

from __future__ import annotations

import numpy as np
import torch

SIZES = (1, 2, 4, 8, 16, 32)


def _decoder(model_or_W) -> torch.Tensor:
    W = model_or_W.W_dec if hasattr(model_or_W, "W_dec") else model_or_W
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise TypeError(f"expected an SAE or a decoder matrix [n, d], got {type(model_or_W).__name__}")
    return W.detach()


@torch.no_grad()
def cone_containment(
    model, directions: torch.Tensor, *, sizes=SIZES, contained: float = 0.9, block: int = 1 << 16
) -> dict:
    """Containment of each reference direction [C, d] in the cone of the decoder rows (`model` an SAE, or W_dec
    [n, d]), with at most s atoms for every s in `sizes`.

    Returns sizes, cos [C, len(sizes)] (fp64), mean [len(sizes)], contained_fraction [len(sizes)] (directions with
    cos >= `contained`) and atoms [C, max(sizes)] (the chosen rows in order, -1 past the end).
    """
    from scipy.optimize import nnls

    W = _decoder(model)
    if not isinstance(directions, torch.Tensor) or directions.dim() != 2 or directions.shape[1] != W.shape[1]:
        shape = tuple(directions.shape) if isinstance(directions, torch.Tensor) else type(directions).__name__
        raise ValueError(f"directions must be [C, d={W.shape[1]}], got {shape}")
    sizes = sorted({int(s) for s in sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"sizes must be positive ints, got {sizes}")
    norms = directions.double().norm(dim=1)
    if (norms == 0).any() or not torch.isfinite(norms).all():
        raise ValueError("directions must be finite and nonzero")
    U = (directions.double() / norms[:, None]).cpu().numpy()
    Wf = W.float()
    Wn = Wf / Wf.norm(dim=1, keepdim=True).clamp_min(1e-30)  # zero rows stay zero: never aligned
    C, s_max = U.shape[0], min(sizes[-1], W.shape[0])
    atoms = torch.full((C, sizes[-1]), -1, dtype=torch.long)
    cos = np.zeros((C, s_max))
    R = U.copy()
    live = np.ones(C, dtype=bool)
    for step in range(s_max):
        if step:
            cos[:, step] = cos[:, step - 1]  # a stopped direction keeps its value
        if not live.any():
            continue
        Rt = torch.from_numpy(R[live]).to(Wn.device, torch.float32)
        best_val = torch.full((Rt.shape[0],), -float("inf"), device=Wn.device)
        best_idx = torch.zeros(Rt.shape[0], dtype=torch.long, device=Wn.device)
        taken = atoms[torch.from_numpy(live)][:, :step].to(Wn.device)
        for a in range(0, W.shape[0], block):
            scores = Rt @ Wn[a : a + block].T
            mine = (taken >= a) & (taken < a + scores.shape[1])
            scores[mine.nonzero()[:, 0], (taken - a)[mine]] = -float("inf")  # no atom twice
            val, idx = scores.max(1)
            better = val > best_val
            best_val, best_idx = torch.where(better, val, best_val), torch.where(better, idx + a, best_idx)
        rows = np.flatnonzero(live)
        grow = (best_val > 1e-6).cpu().numpy()
        for r, g, i in zip(rows, grow, best_idx.cpu().tolist()):
            if not g:
                live[r] = False
                continue
            atoms[r, step] = i
            A = Wn[atoms[r, : step + 1].to(Wn.device)].double().cpu().numpy().T  # [d, s]
            coef, _ = nnls(A, U[r])
            p = A @ coef
            R[r] = U[r] - p
            pn = np.linalg.norm(p)
            cos[r, step] = 0.0 if pn == 0 else float(U[r] @ p) / pn
    at = np.array([min(s, s_max) - 1 for s in sizes])
    cos_s = torch.from_numpy(cos[:, at])
    return {
        "sizes": sizes,
        "cos": cos_s,
        "mean": cos_s.mean(0).tolist(),
        "contained_fraction": (cos_s >= contained).double().mean(0).tolist(),
        "atoms": atoms,
    }
