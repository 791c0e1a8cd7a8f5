"""The "torch" backend: plain PyTorch, memory-bounded, the `<op>_torch` twin of every `<op>_triton` launcher.

Work is split into chunks of at most `budget` elements, so no temporary has B x n (or B x K x d)
elements unless the whole problem is that small. Selection is exact: values by torch.topk, and where equal
values meet at the k-th place, packed int64 keys (fp32 value bits << 32 | reversed column) that order by
value, then by lower latent id.
"""

from __future__ import annotations

import warnings

import torch

KEY_LOW = 2**31 - 1  # columns are stored as KEY_LOW - col, so the lower id has the larger key
BUDGET = 1 << 24  # elements per temporary


def pack_keys(f: torch.Tensor, col0: int) -> torch.Tensor:
    """f: [R, C] float32, all >= +0.0  ->  [R, C] int64 keys, ordered like (f, -column)."""
    cols = torch.arange(col0, col0 + f.shape[1], device=f.device, dtype=torch.int64)
    bits = f.contiguous().view(torch.int32).to(torch.int64)
    return (bits << 32) | (KEY_LOW - cols)


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (float32 values, int32 latent ids)."""
    indices = (KEY_LOW - (keys & 0xFFFFFFFF)).to(torch.int32)
    values = (keys >> 32).to(torch.int32).view(torch.float32)
    return values, indices


def _topk_keys(x, W, b, k: int, budget: int):
    """Exact TopK(ReLU(x W^T + b)) by packed keys, chunk by chunk -> (values fp32, indices int32)."""
    B, n = x.shape[0], W.shape[0]
    cols = max(1, min(n, budget))
    rows = max(1, min(B, budget // cols))
    out = []
    for r0 in range(0, B, rows):
        xr = x[r0 : r0 + rows].float()
        best = None
        for c0 in range(0, n, cols):
            z = xr @ W[c0 : c0 + cols].float().T
            if b is not None:
                z += b[c0 : c0 + cols].float()
            keys = pack_keys(torch.where(z > 0, z, 0.0), c0)
            if best is not None:
                keys = torch.cat([best, keys], dim=1)
            best = keys.topk(min(k, keys.shape[1]), dim=1).values
        out.append(best)
    return unpack_keys(torch.cat(out))


def topk_select_torch(x, W, b, k: int, budget: int = BUDGET):
    """Chunked TopK(ReLU(x W^T + b)): fp32 products on column chunks, a top-(k+1) merge per chunk.

    torch.topk finds the exact top-k values but orders equal values arbitrarily. The (k+1)-th value
    shows whether a row has a tie across the k-th place; only such rows (e.g. rows with fewer than k
    positive entries) are redone with packed keys. Then slots are ordered by value, equal values by id.
    On CUDA every row takes the packed keys, so the op makes no host synchronisation.
    x: [B, d], W: [n, d], b: [n] or None -> (values [B, k] x.dtype, indices [B, k] int32).
    """
    if x.is_cuda:  # the tie check below needs host syncs; the packed keys need none
        values, indices = _topk_keys(x, W, b, k, budget)
        return values.to(x.dtype), indices
    B, n = x.shape[0], W.shape[0]
    kk = min(k + 1, n)
    cols = max(1, min(n, budget))
    rows = max(1, min(B, budget // cols))
    values = torch.empty(B, k, dtype=torch.float32, device=x.device)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    tied = torch.empty(B, dtype=torch.bool, device=x.device)
    for r0 in range(0, B, rows):
        xr = x[r0 : r0 + rows].float()
        best_v = best_i = None
        for c0 in range(0, n, cols):
            Wc = W[c0 : c0 + cols].float().T
            z = xr @ Wc if b is None else torch.addmm(b[c0 : c0 + cols].float(), xr, Wc)
            # top-(k+1) of z, then ReLU: where fewer than k + 1 entries are positive, the zeros tie at
            # the k-th place and the row is redone below, so which negatives were picked does not matter.
            v, i = z.topk(min(kk, z.shape[1]), dim=1)
            v.relu_()
            i += c0
            if best_v is not None:
                v, j = torch.cat([best_v, v], dim=1).topk(kk, dim=1)
                i = torch.cat([best_i, i], dim=1).gather(1, j)
            best_v, best_i = v, i
        values[r0 : r0 + rows] = best_v[:, :k]
        indices[r0 : r0 + rows] = best_i[:, :k]
        tied[r0 : r0 + rows] = best_v[:, k] == best_v[:, k - 1] if kk > k else False
    redo = tied.nonzero().squeeze(1)
    if redo.numel():
        v, i = _topk_keys(x[redo], W, b, k, budget)
        values[redo], indices[redo] = v, i.long()
    indices, order = indices.sort(dim=1)  # equal values: lower id first (a stable sort by value next)
    values, order = values.gather(1, order).sort(dim=1, descending=True, stable=True)
    return (values + 0.0).to(x.dtype), indices.gather(1, order).to(torch.int32)  # + 0.0: no -0.0


def _row_chunk(K: int, d: int, budget: int) -> int:
    return max(1, budget // max(1, K * d))


def gather_matmul_torch(values, indices, W, bias, budget: int = BUDGET):
    """out[b] = bias + sum_j values[b, j] W[indices[b, j]], fp32 accumulation.  -> [B, d] W.dtype."""
    if W.dtype == torch.float32:
        out = torch.nn.functional.embedding_bag(indices.long(), W, per_sample_weights=values.float(), mode="sum")
        return out if bias is None else out + bias
    B, K = values.shape
    d = W.shape[1]
    out = torch.empty(B, d, dtype=W.dtype, device=W.device)
    step = _row_chunk(K, d, budget)
    for r0 in range(0, B, step):
        rows = W[indices[r0 : r0 + step].long()].float()  # [R, K, d]
        acc = torch.bmm(values[r0 : r0 + step].float().unsqueeze(1), rows).squeeze(1)
        if bias is not None:
            acc += bias.float()
        out[r0 : r0 + step] = acc.to(W.dtype)
    return out


def gather_dot_torch(g, indices, W, budget: int = BUDGET):
    """out[b, j] = g[b] . W[indices[b, j]], fp32 accumulation.  -> [B, K] g.dtype."""
    B, K = indices.shape
    if g.dtype == W.dtype == torch.float32:  # embedding_bag's own backward: no [B, K, d] gather
        bags = torch.arange(B, device=g.device)
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            g, W, indices.reshape(-1).long(), bags * K, bags.repeat_interleave(K), 0, -1
        )
        return out.view(B, K)
    out = torch.empty(B, K, dtype=g.dtype, device=g.device)
    step = _row_chunk(K, W.shape[1], budget)
    for r0 in range(0, B, step):
        rows = W[indices[r0 : r0 + step].long()].float()
        out[r0 : r0 + step] = torch.bmm(rows, g[r0 : r0 + step].float().unsqueeze(2)).squeeze(2).to(g.dtype)
    return out


def buckets(indices: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR over latents of the flat (b, j) slots: (order [B*K] int64, offsets [n + 1] int64). No host sync."""
    flat = indices.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(n + 1, device=flat.device, dtype=sorted_ids.dtype)
    return order, torch.searchsorted(sorted_ids, bounds)


def scatter_rows_torch(coef, indices, X, n: int, with_sum: bool, out_dtype):
    """dW[i] = sum_{indices[b,j]=i} coef[b,j] X[b]; dsum[i] = sum coef. A CSR [n, B] x [B, d] product."""
    K = coef.shape[1]
    order, offsets = buckets(indices, n)
    coef = coef.reshape(-1)[order].float()
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        C = torch.sparse_csr_tensor(offsets, order // K, coef, (n, X.shape[0]), check_invariants=False)
        dW = (C @ X.float()).to(out_dtype)
    dsum = torch.segment_reduce(coef, "sum", offsets=offsets) if with_sum else dW.new_empty(0)
    return dW, dsum.to(out_dtype)


RELU, JUMPRELU, GATED = 0, 1, 2  # threshold_select modes (the kernel's MODE)


def threshold_epilogue(mode: int, u, b, theta, r_mag, b_mag, half_band: float):
    """Selection of the threshold encoders on a fp32 tile u = x W^T [R, C] (parameters sliced to its columns).

    -> (keep mask, f, gate, aux), all [R, C]: f the activation (0 where kept but inactive), gate the
    gated encoder's pi_g (else f), aux the fp32 pre-activation the backward needs (pi_m for gated, else z).
    """
    z = u if b is None else u + b.float()
    if mode == RELU:
        return z > 0, z, z, z
    if mode == JUMPRELU:
        th = theta.float()
        active = z > th
        keep = active | ((z - th).abs() < half_band)
        f = torch.where(active, z, 0.0)
        return keep, f, f, z
    pi_m = torch.exp(r_mag.float()) * u + b_mag.float()
    return z > 0, torch.relu(pi_m), z, pi_m


def threshold_select_torch(
    mode: int, x, W, b, theta, r_mag, b_mag, half_band: float, capacity: int, budget: int = BUDGET
):
    """Chunked threshold compaction: the kept entries of each row in its first slots, by latent id.

    x: [B, d], W: [n, d], b / theta / r_mag / b_mag: [n] or None. Returns (values [B, C] x.dtype,
    gate [B, C] x.dtype (gated only, else None), aux [B, C] fp32, indices [B, C] int32, counts [B] int32);
    counts holds every kept entry of a row, also those beyond the capacity C (which are not stored).
    Empty slots are 0.
    """
    B, n = x.shape[0], W.shape[0]
    cols = max(1, min(n, budget))
    rows = max(1, min(B, budget // cols))
    values = torch.zeros(B, capacity, dtype=x.dtype, device=x.device)
    gate = torch.zeros_like(values) if mode == GATED else None
    aux = torch.zeros(B, capacity, dtype=torch.float32, device=x.device)
    indices = torch.zeros(B, capacity, dtype=torch.int32, device=x.device)
    counts = torch.zeros(B, dtype=torch.int64, device=x.device)
    part = lambda t, c0: None if t is None else t[c0 : c0 + cols]
    for r0 in range(0, B, rows):
        xr = x[r0 : r0 + rows].float()
        for c0 in range(0, n, cols):
            u = xr @ W[c0 : c0 + cols].float().T
            params = (part(t, c0) for t in (b, theta, r_mag, b_mag))
            keep, f, g, a = threshold_epilogue(mode, u, *params, half_band)
            r, c = keep.nonzero(as_tuple=True)  # row-major: by row, then by column
            cnt = keep.sum(1)
            first = torch.cumsum(cnt, 0) - cnt
            pos = counts[r0 + r] + torch.arange(r.numel(), device=x.device) - first[r]
            ok = pos < capacity
            r, c, pos = r[ok], c[ok], pos[ok]
            values[r0 + r, pos] = f[r, c].to(x.dtype)
            if gate is not None:
                gate[r0 + r, pos] = g[r, c].to(x.dtype)
            aux[r0 + r, pos] = a[r, c]
            indices[r0 + r, pos] = (c0 + c).to(torch.int32)
            counts[r0 : r0 + rows] += cnt
    return values, gate, aux, indices, counts.to(torch.int32)


def _prefix_residuals(values, indices, W, r0):
    """[R, K + 1, d] fp32: r_t = r0 - sum_{j < t} values[:, j] W[indices[:, j]] for t = 0..K."""
    u = values.float().unsqueeze(2) * W[indices.long()].float()
    cum = torch.cat([torch.zeros_like(u[:, :1]), u.cumsum(1)], 1)
    return r0.float().unsqueeze(1) - cum


def prefix_norms_torch(values, indices, W, r0, budget: int = BUDGET):
    """E [B, K + 1] fp32: E[b, t] = ||r_t[b]||^2, in row chunks of at most `budget` residual elements."""
    B, K = values.shape
    out = torch.empty(B, K + 1, device=r0.device, dtype=torch.float32)
    step = max(1, budget // max(1, (K + 1) * r0.shape[1]))
    for a in range(0, B, step):
        rows = slice(a, a + step)
        out[rows] = _prefix_residuals(values[rows], indices[rows], W, r0[rows]).pow(2).sum(-1)
    return out


def prefix_norms_backward_torch(values, indices, W, r0, grad, write_s: bool):
    """G = grad [B, K + 1] -> (dv [B, K] fp32, dr0 [B, d] r0.dtype, S [B, K, d] fp32 or None), with
    S_j = sum_{t > j} G_t r_t, dv_j = -2 W[i_j] . S_j, dr0 = 2 sum_t G_t r_t (see prefix.py)."""
    gr = grad.float().unsqueeze(2) * _prefix_residuals(values, indices, W, r0)  # G_t r_t  [B, K + 1, d]
    s = gr[:, 1:].flip(1).cumsum(1).flip(1)
    dv = -2 * (W[indices.long()].float() * s).sum(-1)
    return dv, (2 * gr.sum(1)).to(r0.dtype), s if write_s else None
