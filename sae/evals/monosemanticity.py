"""Monosemanticity score (Pach et al., "Sparse Autoencoders Learn Monosemantic Features in Vision-Language
Models"): how alike the inputs are that activate a latent, in a given embedding of the inputs.

For latent k with activations a_n over the N inputs, min-max normalised r_n = (a_n - min a) / (max a - min a),
and embeddings e_n (cosine similarity s_nm = <e_n, e_m> / (||e_n|| ||e_m||)):

    MS_k = sum_{n != m} r_n r_m s_nm / sum_{n != m} r_n r_m.

With unit e_n: sum_{n != m} r_n r_m s_nm = ||sum_n r_n e_n||^2 - sum_n r_n^2 and
sum_{n != m} r_n r_m = (sum_n r_n)^2 - sum_n r_n^2, so three running sums per latent over the active entries
of the codes give the score with no [N, N] matrix (memory O(d_sae e)). The scale of r cancels; its shift (min a,
nonzero only for a latent active on every input) is applied at the end through the sum of all embeddings.
"""

from __future__ import annotations

import torch

from .stream import Acts, encoded, entries, sparse_rows


@torch.no_grad()
def monosemanticity(model, acts: Acts, embeddings, *, batch_size: int = 4096, progress: bool = False) -> torch.Tensor:
    """[d_sae] fp32 monosemanticity scores; NaN for a latent active on fewer than two inputs.

    acts: [N, d_in] raw activations (or batches); embeddings: [N, e] (or batches aligned with acts), e.g. an
    image encoder's embeddings of the inputs.
    """
    n = model.d_sae
    S = A = Q = cnt = low = E_sum = None
    N = 0
    for _, _, code, e in encoded(model, acts, batch_size, embeddings=embeddings, progress=progress, desc="monosem"):
        if e is None or e.dim() != 2:
            raise ValueError("embeddings must be [N, e], aligned with the activations' rows")
        e = e.to(model.device, torch.float64)
        e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-30)
        if S is None:
            S = torch.zeros(n, e.shape[1], dtype=torch.float64, device=model.device)
            A, Q, cnt = (torch.zeros(n, dtype=torch.float64, device=model.device) for _ in range(3))
            low = torch.full((n,), float("inf"), dtype=torch.float64, device=model.device)
            E_sum = torch.zeros(e.shape[1], dtype=torch.float64, device=model.device)
        _, latents, values = entries(code)
        a = values.double()
        S += sparse_rows(code, n, a.float()).double() @ e
        A += torch.bincount(latents, a, minlength=n)
        Q += torch.bincount(latents, a * a, minlength=n)
        cnt += torch.bincount(latents, minlength=n)
        low.scatter_reduce_(0, latents, a, "amin")
        E_sum += e.sum(0)
        N += e.shape[0]
    if S is None:
        raise ValueError("acts holds no rows")
    m = torch.where(cnt == N, low, 0.0)  # min over all inputs: 0 unless the latent is active on every input
    S = S - m[:, None] * E_sum
    Q = Q - 2 * m * A + N * m * m
    A = A - N * m
    num = S.pow(2).sum(1) - Q
    den = A * A - Q
    score = num / den
    return torch.where((cnt >= 2) & (den > 1e-12 * A * A), score, float("nan")).float().cpu()
