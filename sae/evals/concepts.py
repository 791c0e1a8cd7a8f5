"""Latents against known binary concepts (Karvonen et al., "Measuring Progress in Dictionary Learning for
Language Model Interpretability with Board Game Models", generalised beyond chess and Othello squares).

labels: [N, C] bool, one column per concept (a board-state property, a part of speech, an image class, ...),
aligned with the activations' rows. A latent i "fires at threshold t" on a token when f_i > t * max_i, max_i its
largest activation over the tokens the statistic is fitted on (the paper's thresholds relative to the latent's
maximum). Every statistic is a count over the active entries of the sparse codes (sparse matrix products), so
memory is O(T d_sae C) for T thresholds and no [N, d_sae] tensor is formed. The metrics read acts two or three
times: pass a tensor or a re-iterable.
"""

from __future__ import annotations

import torch

from kernels import SparseCode

from .stream import Acts, count_rows, encoded, entries, reiterable, sparse_rows

THRESHOLDS = tuple(i / 10 for i in range(10))  # fractions of each latent's max activation
_CHUNK = 1 << 24  # elements of a [rows, K, C] temporary


def _thresholds(thresholds) -> torch.Tensor:
    t = torch.as_tensor(thresholds, dtype=torch.float32)
    if t.dim() != 1 or t.numel() == 0 or (t < 0).any() or (t >= 1).any() or (t.diff() <= 0).any():
        raise ValueError(f"thresholds must be increasing fractions in [0, 1) of the max activation, got {thresholds!r}")
    return t


def _check(acts, labels, what: str) -> None:
    reiterable(acts, what)
    if isinstance(labels, torch.Tensor) and (labels.dim() != 2 or labels.shape[1] == 0):
        raise ValueError(f"labels must be [N, C] (one column per concept), got shape {tuple(labels.shape)}")


def _split(train_fraction: float, N: int) -> int:
    """The first row of the test split: rows [0, cut) train, [cut, N) test (in stream order)."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    cut = int(round(train_fraction * N))
    if not 0 < cut < N:
        raise ValueError(f"train_fraction={train_fraction} leaves an empty split of N={N} rows")
    return cut


def _codes(model, acts, labels, batch_size, start=0, stop=None, progress=False):
    """(code [b, K], labels [b, C] fp32 on the model's device) for the rows [start, stop) of acts."""
    for offset, _, code, y in encoded(model, acts, batch_size, labels=labels, progress=progress, desc="concepts"):
        b = code.values.shape[0]
        if stop is not None and offset >= stop:
            break
        lo, hi = max(start - offset, 0), b if stop is None else min(stop - offset, b)
        if hi <= lo:
            continue
        if (lo, hi) != (0, b):
            code, y = SparseCode(code.values[lo:hi], code.indices[lo:hi]), None if y is None else y[lo:hi]
        yield code, None if y is None else y.to(model.device, torch.float32)


def max_activations(model, acts: Acts, *, batch_size: int = 4096, rows: int | None = None) -> torch.Tensor:
    """[d_sae] fp32: each latent's largest activation over the first `rows` rows of acts (all by default)."""
    top = torch.zeros(model.d_sae, device=model.device)
    for code, _ in _codes(model, acts, None, batch_size, stop=rows):
        _, latents, values = entries(code)
        top.scatter_reduce_(0, latents, values, "amax")
    return top


def _counts(model, acts, labels, top, thresholds, batch_size, start=0, stop=None, progress=False):
    """Over rows [start, stop): fires [T, d_sae] (tokens where latent i fires at threshold t), hits
    [T, d_sae, C] (those where concept c is also present) and positives [C], fp64."""
    n, T = model.d_sae, thresholds.numel()
    thr = thresholds.to(model.device)
    fires = hits = positives = None
    for code, y in _codes(model, acts, labels, batch_size, start, stop, progress):
        if hits is None:
            fires = torch.zeros(T, n, dtype=torch.float64, device=model.device)
            hits = torch.zeros(T, n, y.shape[1], dtype=torch.float64, device=model.device)
            positives = torch.zeros(y.shape[1], dtype=torch.float64, device=model.device)
        _, latents, values = entries(code)
        for j in range(T):
            on = (values > thr[j] * top[latents]).float()
            fires[j] += torch.bincount(latents, on, minlength=n)
            hits[j] += sparse_rows(code, n, on) @ y
        positives += y.sum(0)
    if hits is None:
        raise ValueError("acts holds no rows")
    return fires, hits, positives


@torch.no_grad()
def coverage(
    model, acts: Acts, labels, *, thresholds=THRESHOLDS, batch_size: int = 4096, progress: bool = False
) -> dict:
    """Coverage: per concept c the best single latent as a classifier, coverage = mean_c max_{i, t} F1(i, t, c).

    F1(i, t, c) = 2 TP / (2 TP + FP + FN) of "latent i fires at threshold t" against concept c over all rows
    (thresholds: fractions of max_i). acts: [N, d_in] raw activations (or batches); labels: [N, C] bool.
    Returns coverage (mean over concepts present at least once), f1 [C] (NaN for an absent concept),
    best_latent [C], best_threshold [C] (the fraction), positives [C].
    """
    _check(acts, labels, "coverage")
    thr = _thresholds(thresholds)
    top = max_activations(model, acts, batch_size=batch_size)
    fires, hits, positives = _counts(model, acts, labels, top, thr, batch_size, progress=progress)
    denom = fires[..., None] + positives
    f1 = torch.where(denom > 0, 2 * hits / denom.clamp_min(1), 0.0).flatten(0, 1)  # [T n, C]
    best, where = f1.max(0)
    best = torch.where(positives > 0, best, float("nan"))
    n = model.d_sae
    return {
        "coverage": best.nanmean().item(),
        "f1": best.float().cpu(),
        "best_latent": (where % n).cpu(),
        "best_threshold": thr[(where // n).cpu()],
        "positives": positives.long().cpu(),
    }


@torch.no_grad()
def label_reconstruction(
    model,
    acts: Acts,
    labels,
    *,
    train_fraction: float = 0.5,
    min_precision: float = 0.95,
    min_fires: int = 10,
    thresholds=THRESHOLDS,
    batch_size: int = 4096,
    progress: bool = False,
) -> dict:
    """Reconstruction of the labels from the latents (the board-game paper's board reconstruction).

    On the train split (the first train_fraction of the rows), latent i at threshold t predicts concept c when
    its precision TP / (TP + FP) >= min_precision over at least min_fires firings (maxima and counts from the train
    split only). On the test
    split, concept c is predicted present when any of its predictors fires (a latent at its lowest qualifying
    threshold). Returns f1 [C] on the test split (NaN where the concept is absent there), mean_f1, accuracy (of
    every label), exact_fraction (test rows whose whole label vector is right) and predictors [C].
    """
    _check(acts, labels, "label_reconstruction")
    thr = _thresholds(thresholds)
    N = count_rows(acts)
    cut = _split(train_fraction, N)
    top = max_activations(model, acts, batch_size=batch_size, rows=cut)
    fires, hits, _ = _counts(model, acts, labels, top, thr, batch_size, stop=cut, progress=progress)
    ok = hits >= min_precision * fires[..., None]
    ok &= fires[..., None] >= max(min_fires, 1)
    qualifies = ok.any(0)  # [n, C]
    first = ok.to(torch.uint8).argmax(0)  # the lowest qualifying threshold
    tau = torch.where(qualifies, thr.to(top.device)[first] * top[:, None], float("inf"))  # [n, C]
    C = tau.shape[1]
    tp, fp, fn = (torch.zeros(C, dtype=torch.float64, device=model.device) for _ in range(3))
    exact = right = 0.0
    for code, y in _codes(model, acts, labels, batch_size, start=cut):
        rows = max(1, _CHUNK // max(1, code.values.shape[1] * C))
        for a in range(0, y.shape[0], rows):
            v, i = code.values[a : a + rows].float(), code.indices[a : a + rows].long()
            pred = (v[..., None] > tau[i]).any(1).float()  # [b, C]
            t = y[a : a + rows]
            tp += (pred * t).sum(0)
            fp += (pred * (1 - t)).sum(0)
            fn += ((1 - pred) * t).sum(0)
            exact += (pred == t).all(1).sum().item()
            right += (pred == t).sum().item()
    test = N - cut
    f1 = torch.where(tp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), float("nan"))
    return {
        "f1": f1.float().cpu(),
        "mean_f1": f1.nanmean().item(),
        "accuracy": right / (test * C),
        "exact_fraction": exact / test,
        "predictors": qualifies.sum(0).cpu(),
        "train_rows": cut,
        "test_rows": test,
    }


def _logistic_accuracy(X: torch.Tensor, y: torch.Tensor, cut: int, l2: float, iters: int) -> torch.Tensor:
    """Fit one logistic regression per concept on rows [0, cut) and return its accuracy on the rest.

    X: [N, C, k] features, y: [N, C] in {0, 1} -> [C] (NaN where the train split holds one class only).
    Features are standardised on the train rows; loss = mean BCE + l2 ||w||^2 (bias unpenalised), minimised by
    Newton's method for all C problems at once ([C, k + 1, k + 1] Hessians).
    """
    X, y = X.double(), y.double()
    mu, sd = X[:cut].mean(0), X[:cut].std(0).clamp_min(1e-6)
    X = torch.cat([(X - mu) / sd, torch.ones_like(X[..., :1])], -1)  # [N, C, k + 1], the last column the bias
    Xt, yt = X[:cut], y[:cut]
    C, k1 = X.shape[1], X.shape[2]
    reg = torch.full((k1,), 2 * l2, dtype=X.dtype, device=X.device)
    reg[-1] = 1e-12
    w = torch.zeros(C, k1, dtype=X.dtype, device=X.device)
    for _ in range(iters):
        p = torch.sigmoid(torch.einsum("nck,ck->nc", Xt, w))
        grad = torch.einsum("nck,nc->ck", Xt, p - yt) / cut + reg * w
        hess = torch.einsum("nck,nc,ncj->ckj", Xt, p * (1 - p), Xt) / cut + torch.diag(reg)
        step = torch.linalg.solve(hess, grad)
        w -= step
        if step.abs().max() < 1e-9:
            break
    pred = (torch.einsum("nck,ck->nc", X[cut:], w) > 0).double()
    acc = (pred == y[cut:]).double().mean(0)
    both = (yt.sum(0) > 0) & (yt.sum(0) < cut)
    return torch.where(both, acc, float("nan")).float()


@torch.no_grad()
def sparse_probing(
    model,
    acts: Acts,
    labels,
    *,
    ks=(1, 2, 5),
    train_fraction: float = 0.5,
    l2: float = 1e-3,
    iters: int = 50,
    batch_size: int = 4096,
    progress: bool = False,
) -> dict:
    """k-sparse probing (Gurnee et al.; Gao et al.): per concept, latents ranked by |mean activation when the
    concept is present - mean when absent| on the train split; a logistic probe on the best k latents (fitted
    on the train split, L2 penalty l2, `iters` Newton steps at most); its accuracy on the test split.

    Memory: the chosen latents' activations for every row, [N, <= C max(ks)]. Returns accuracy {k: [C]}
    (NaN where the train split holds one class), mean_accuracy {k: float} and latents [C, max(ks)].
    """
    _check(acts, labels, "sparse_probing")
    ks = sorted({int(k) for k in ks})
    n = model.d_sae
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"ks must be ints in [1, d_sae={n}], got {ks}")
    N = count_rows(acts)
    cut = _split(train_fraction, N)
    sums = pos_sums = positives = None
    for code, y in _codes(model, acts, labels, batch_size, stop=cut, progress=progress):
        if sums is None:
            sums = torch.zeros(n, dtype=torch.float64, device=model.device)
            pos_sums = torch.zeros(n, y.shape[1], dtype=torch.float64, device=model.device)
            positives = torch.zeros(y.shape[1], dtype=torch.float64, device=model.device)
        _, latents, values = entries(code)
        sums += torch.bincount(latents, values, minlength=n)
        pos_sums += sparse_rows(code, n) @ y
        positives += y.sum(0)
    gap = pos_sums / positives.clamp_min(1) - (sums[:, None] - pos_sums) / (cut - positives).clamp_min(1)
    chosen = gap.abs().topk(ks[-1], dim=0).indices.T  # [C, k_max], best first
    used, col = chosen.unique(return_inverse=True)
    lookup = torch.full((n,), -1, dtype=torch.long, device=model.device)
    lookup[used] = torch.arange(used.numel(), device=model.device)
    feats, ys = [], []
    for code, y in _codes(model, acts, labels, batch_size):
        rows, latents, values = entries(code)
        keep = lookup[latents] >= 0
        D = torch.zeros(y.shape[0], used.numel(), device=model.device)
        D.index_put_((rows[keep], lookup[latents[keep]]), values[keep], accumulate=True)
        feats.append(D)
        ys.append(y)
    D, Y = torch.cat(feats), torch.cat(ys)
    C = Y.shape[1]
    accuracy = {}
    for k in ks:
        per = max(1, _CHUNK // (N * k))
        parts = [
            _logistic_accuracy(D[:, col[c : c + per, :k]], Y[:, c : c + per], cut, l2, iters) for c in range(0, C, per)
        ]
        accuracy[k] = torch.cat(parts).cpu()
    return {
        "accuracy": accuracy,
        "mean_accuracy": {k: v.nanmean().item() for k, v in accuracy.items()},
        "latents": chosen.cpu(),
    }
