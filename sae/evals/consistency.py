"""Feature consistency between two SAEs (Wang et al., "Enforcing Orderedness to Improve Feature Consistency";
Paulo and Belrose, "Sparse Autoencoders Trained on the Same Data Learn Different Features").

With unit decoder rows a_i (model A, n_a rows) and b_j (model B), cos_ij = <a_i, b_j> (signed: activations are
nonnegative, so a flipped row is a different feature):

    mmcs     = (1/n_a) sum_i max_j cos_ij                     (mean max cosine similarity)
    matched  = (1/m) sum_i cos_{i pi(i)}, m = min(n_a, n_b)    (pi a one-to-one matching maximising the sum)
    per_index[i] = cos_ii, i < m                              (ordered SAEs: latent i of A against latent i of B)

The matching is optimal (scipy's linear_sum_assignment on the [n_a, n_b] matrix) up to `exact_limit` latents;
past that it is greedy on each row's best candidates, computed in blocks ("matching" in the result says which).
"""

from __future__ import annotations

import torch

from .cone import _decoder


def _unit(W: torch.Tensor) -> torch.Tensor:
    W = W.float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _row_best(A: torch.Tensor, B: torch.Tensor, m: int, block: int, used: torch.Tensor | None = None):
    """Each row of A's m best columns of A B^T (values, indices [rows, m]), skipping columns in `used`."""
    vals, idx = [], []
    for a in range(0, A.shape[0], block):
        best_v = best_i = None
        for b in range(0, B.shape[0], block):
            s = A[a : a + block] @ B[b : b + block].T
            if used is not None:
                s[:, used[b : b + block]] = -float("inf")
            cat_v = s if best_v is None else torch.cat([best_v, s], 1)
            cat_i = torch.arange(b, b + s.shape[1], device=s.device).expand_as(s)
            cat_i = cat_i if best_i is None else torch.cat([best_i, cat_i], 1)
            best_v, j = cat_v.topk(min(m, cat_v.shape[1]), dim=1)
            best_i = cat_i.gather(1, j)
        vals.append(best_v)
        idx.append(best_i)
    return torch.cat(vals), torch.cat(idx)


def _greedy(A: torch.Tensor, B: torch.Tensor, block: int, candidates: int = 8) -> torch.Tensor:
    """Greedy one-to-one matching of A's rows to B's, in rounds: every unmatched row's best `candidates` free
    columns, pairs accepted in decreasing cosine while both ends are free (each round accepts at least its best
    pair). Returns the matched cosines [min(n_a, n_b)] (fp64)."""
    row_free = torch.ones(A.shape[0], dtype=torch.bool)
    col_used = torch.zeros(B.shape[0], dtype=torch.bool)
    matched = []
    while row_free.any() and not col_used.all():
        rows = row_free.nonzero()[:, 0]
        v, j = _row_best(A[rows.to(A.device)], B, candidates, block, col_used.to(A.device))
        width = v.shape[1]
        v, j = v.reshape(-1).double().cpu(), j.reshape(-1).cpu()
        for f in v.argsort(descending=True).tolist():
            r, c = rows[f // width].item(), j[f].item()
            if v[f] == -float("inf"):
                break
            if row_free[r] and not col_used[c]:
                row_free[r], col_used[c] = False, True
                matched.append(v[f].item())
    return torch.tensor(matched, dtype=torch.float64)


@torch.no_grad()
def consistency(model_a, model_b, *, exact_limit: int = 1 << 12, block: int = 4096) -> dict:
    """Consistency of two SAEs' decoders (SAEs, or W_dec [n, d] tensors with the same d).

    Returns mmcs (float), mmcs_per_latent [n_a], matched (float), matching ("optimal" or "greedy"),
    per_index [min(n_a, n_b)] and per_index_mean.
    """
    A, B = _unit(_decoder(model_a)), _unit(_decoder(model_b)).to(_decoder(model_a).device)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"the decoders disagree on d: {A.shape[1]} and {B.shape[1]}")
    best, _ = _row_best(A, B, 1, block)
    m = min(A.shape[0], B.shape[0])
    if max(A.shape[0], B.shape[0]) <= exact_limit:
        from scipy.optimize import linear_sum_assignment

        cos = (A.double() @ B.double().T).cpu().numpy()
        r, c = linear_sum_assignment(cos, maximize=True)
        pairs, matching = torch.from_numpy(cos[r, c]), "optimal"
    else:
        pairs, matching = _greedy(A, B, block), "greedy"
    per_index = (A[:m].double() * B[:m].double()).sum(1).cpu()
    return {
        "mmcs": best.double().mean().item(),
        "mmcs_per_latent": best[:, 0].cpu(),
        "matched": pairs.mean().item(),
        "matching": matching,
        "per_index": per_index,
        "per_index_mean": per_index.mean().item(),
    }
