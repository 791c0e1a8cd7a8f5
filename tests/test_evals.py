"""sae.evals against slow, obviously-right float64 twins on small random inputs, and against known answers on the
synthetic ground truth (true features cover every concept; an SAE compared with itself is consistent)."""

import itertools
import math

import pytest
import torch
from helpers import rel_err

import sae
from sae import evals, metrics
from sae.synthetic import SyntheticActivations

N, D, NL = 150, 10, 24  # rows, d_in, latents of the random cases


def small_sae(arch="topk", n=NL, d=D):
    """A random SAE whose codes mix values and empty slots (TopK with some rows < k positive, ReLU, JumpReLU)."""
    if arch == "topk":
        model = sae.TopKSAE(d, n, 5)
    elif arch == "relu":
        model = sae.ReLUSAE(d, n)
    else:
        model = sae.JumpReLUSAE(d, n, init_threshold=0.3)
    with torch.no_grad():
        model.b_enc.normal_(-0.3, 0.3)
        model.b_dec.normal_(0, 0.2)
    return model.eval()


def dense(model, x) -> torch.Tensor:
    """[N, n] float64 activations: the twin's starting point (small n only)."""
    with torch.no_grad():
        return model.encode_sparse(x).to_dense(model.d_sae).double()


def uneven(x, sizes=(37, 1, 64)):
    """x as a list of batches of uneven sizes."""
    out, a = [], 0
    for s in itertools.cycle(sizes):
        if a >= x.shape[0]:
            return out
        out.append(x[a : a + s])
        a += s


def true_feature_sae(gen):
    """A JumpReLU SAE whose latents are the (orthonormal) true features: f = the true activations (the small
    threshold cuts the rounding noise of inactive features)."""
    model = sae.JumpReLUSAE(gen.d, gen.n_features, init_threshold=1e-4, apply_b_dec_to_input=False)
    with torch.no_grad():
        model.W_enc.copy_(gen.features)
        model.W_dec.copy_(gen.features)
        model.b_enc.zero_()
        model.b_dec.zero_()
    return model.eval()


# Reconstruction ----------------------------------------------------------------------------------------------


def reconstruction_twin(model, x, bins, low, dense_threshold):
    x64 = x.double()
    with torch.no_grad():
        x_hat = model(x).double()
    F = dense(model, x)
    err = ((x64 - x_hat) ** 2).sum()
    ss = ((x64 - x64.mean(0)) ** 2).sum()
    r = x64 - x_hat
    fires = (F != 0).sum(0)
    per_row = (F != 0).sum(1)
    hist = [0] * bins
    width = -low / bins
    for c in fires.tolist():
        f = max(c / x.shape[0], 10**low)
        hist[min(int((math.log10(f) - low) / width), bins - 1)] += 1
    return {
        "mse": (err / x.shape[0]).item(),
        "fvu": (err / ss).item(),
        "explained_variance": 1 - ((r - r.mean(0)) ** 2).sum().item() / ss.item(),
        "l0": per_row.double().mean().item(),
        "l0_histogram": [int((per_row == j).sum()) for j in range(int(per_row.max()) + 1)],
        "dead_fraction": (fires == 0).double().mean().item(),
        "dense_fraction": (fires > dense_threshold * x.shape[0]).double().mean().item(),
        "density_histogram": hist,
    }


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_reconstruction_matches_twin_streamed(arch):
    model = small_sae(arch)
    x = torch.randn(N, D) * 2 + 0.5
    twin = reconstruction_twin(model, x, bins=8, low=-3.0, dense_threshold=0.3)
    for acts in (x, uneven(x)):
        out = evals.reconstruction(model, acts, batch_size=40, bins=8, low=-3.0, dense_threshold=0.3)
        assert out["tokens"] == N
        for key in ("mse", "fvu", "explained_variance", "l0", "dead_fraction", "dense_fraction"):
            assert out[key] == pytest.approx(twin[key], rel=1e-5, abs=1e-9), key
        assert out["l0_histogram"][: len(twin["l0_histogram"])] == twin["l0_histogram"]
        assert sum(out["l0_histogram"]) == N
        assert out["density_histogram"]["counts"] == twin["density_histogram"]


def test_reconstruction_is_sae_metrics():
    """FVU, L0 and dead fraction are sae.metrics' own: on one batch they equal metrics.fvu / evaluate."""
    model = small_sae()
    x = torch.randn(N, D)
    out = evals.reconstruction(model, x, batch_size=N)
    with torch.no_grad():
        assert out["fvu"] == pytest.approx(metrics.fvu(x, model(x)).item(), rel=1e-5)
        assert out["l0"] == pytest.approx(metrics.l0(model.encode_sparse(x)).item(), rel=1e-6)
    ref = metrics.evaluate(model, x, batch_size=33)
    for key in ("mse", "fvu", "explained_variance", "l0", "dead_fraction"):
        assert out[key] == pytest.approx(ref[key], rel=1e-5), key


def test_reconstruction_of_true_features_is_exact():
    gen = SyntheticActivations(12, 12, 3, orthogonal=True, seed=3)
    x, a = gen.sample(300)
    out = evals.reconstruction(true_feature_sae(gen), x)
    assert out["fvu"] < 1e-10 and out["l0"] == pytest.approx((a > 0).sum(1).double().mean().item())


# Concepts ----------------------------------------------------------------------------------------------------


def f1_of(pred, y):
    tp = (pred & y).sum().item()
    fp = (pred & ~y).sum().item()
    fn = (~pred & y).sum().item()
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def concept_labels(model, x, C=5):
    """Labels that follow some latents (noisily) and others that are random."""
    F = dense(model, x)
    y = torch.zeros(x.shape[0], C, dtype=torch.bool)
    for c in range(C):
        y[:, c] = (F[:, c] > 0.2) ^ (torch.rand(x.shape[0]) < 0.1) if c % 2 == 0 else torch.rand(x.shape[0]) < 0.3
    return y


def coverage_twin(model, x, y, thresholds):
    F = dense(model, x)
    top = F.max(0).values
    best = []
    for c in range(y.shape[1]):
        scores = [f1_of(F[:, i] > t * top[i], y[:, c]) for i in range(F.shape[1]) for t in thresholds]
        best.append(max(scores))
    return torch.tensor(best, dtype=torch.float64)


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_coverage_matches_twin(arch):
    model = small_sae(arch)
    x = torch.randn(N, D)
    y = concept_labels(model, x)
    thr = (0.0, 0.25, 0.5, 0.75)
    out = evals.coverage(model, uneven(x), y, thresholds=thr, batch_size=50)
    twin = coverage_twin(model, x, y, thr)
    assert rel_err(out["f1"], twin) < 1e-6
    assert out["coverage"] == pytest.approx(twin.mean().item(), rel=1e-6)
    F = dense(model, x)
    for c in range(y.shape[1]):  # the reported latent and threshold reach the best F1
        i, t = out["best_latent"][c].item(), out["best_threshold"][c].item()
        assert f1_of(F[:, i] > t * F[:, i].max(), y[:, c]) == pytest.approx(twin[c].item(), rel=1e-6)


def label_reconstruction_twin(model, x, y, thresholds, cut, min_precision, min_fires):
    F = dense(model, x)
    Ft, yt = F[:cut], y[:cut]
    top = Ft.max(0).values
    pred = torch.zeros(x.shape[0] - cut, y.shape[1], dtype=torch.bool)
    for c in range(y.shape[1]):
        for i in range(F.shape[1]):
            for t in thresholds:  # increasing: the first qualifying threshold fires most
                fires = Ft[:, i] > t * top[i]
                n = fires.sum().item()
                if n >= min_fires and (fires & yt[:, c]).sum().item() >= min_precision * n:
                    pred[:, c] |= F[cut:, i] > t * top[i]
                    break
    f1 = [f1_of(pred[:, c], y[cut:, c]) if y[cut:, c].any() else math.nan for c in range(y.shape[1])]
    exact = (pred == y[cut:]).all(1).double().mean().item()
    return torch.tensor(f1, dtype=torch.float64), exact


def test_label_reconstruction_matches_twin():
    model = small_sae("topk")
    x = torch.randn(300, D)
    y = concept_labels(model, x)
    thr = (0.0, 0.3, 0.6)
    out = evals.label_reconstruction(model, x, y, thresholds=thr, min_precision=0.8, min_fires=3, batch_size=64)
    f1, exact = label_reconstruction_twin(model, x, y, thr, 150, 0.8, 3)
    assert torch.allclose(out["f1"].double(), f1, equal_nan=True, atol=1e-6)
    assert out["exact_fraction"] == pytest.approx(exact)
    assert out["train_rows"] == out["test_rows"] == 150


def test_sparse_probing_matches_twin():
    from scipy.optimize import minimize

    model = small_sae("relu")
    x = torch.randn(200, D)
    y = concept_labels(model, x, C=3)
    out = evals.sparse_probing(model, uneven(x), y, ks=(1, 3), l2=1e-2, batch_size=64)
    F, cut = dense(model, x), 100
    for c in range(3):
        pos, neg = F[:cut][y[:cut, c]], F[:cut][~y[:cut, c]]
        gap = (pos.mean(0) - neg.mean(0)).abs()
        assert out["latents"][c].tolist() == gap.argsort(descending=True)[:3].tolist()
        for k in (1, 3):
            X = F[:, out["latents"][c, :k]]
            X = (X - X[:cut].mean(0)) / X[:cut].std(0)
            t = y[:, c].double()

            def loss(w, X=X, t=t):
                z = X[:cut] @ torch.from_numpy(w[:-1]) + w[-1]
                bce = torch.nn.functional.binary_cross_entropy_with_logits(z, t[:cut])
                return (bce + 1e-2 * (torch.from_numpy(w[:-1]) ** 2).sum()).item()

            w = torch.from_numpy(minimize(loss, [0.0] * (k + 1), method="BFGS", options={"gtol": 1e-10}).x)
            acc = ((X[cut:] @ w[:-1] + w[-1] > 0) == y[cut:, c]).double().mean().item()
            assert out["accuracy"][k][c].item() == pytest.approx(acc, abs=1.5 / (200 - cut))


def test_true_features_cover_every_concept():
    """Known answer: latents that are the true features cover every concept (F1 1 at threshold 0), reconstruct
    the labels exactly, and the probe picks each concept's own latent."""
    gen = SyntheticActivations(16, 12, 3, orthogonal=True, seed=2)
    x, a = gen.sample(600)
    model, y = true_feature_sae(gen), a > 0
    cov = evals.coverage(model, x, y)
    assert cov["coverage"] == 1.0 and cov["best_latent"].tolist() == list(range(12))
    rec = evals.label_reconstruction(model, x, y)
    assert rec["mean_f1"] == 1.0 and rec["exact_fraction"] == 1.0
    probe = evals.sparse_probing(model, x, y, ks=(1,))
    assert probe["latents"][:, 0].tolist() == list(range(12))
    assert probe["mean_accuracy"][1] > 0.99  # L2-regularised: a rare tiny activation may fall on the wrong side


def test_concepts_reject_bad_input():
    model = small_sae()
    x = torch.randn(20, D)
    with pytest.raises(ValueError, match="labels"):
        evals.coverage(model, x, torch.ones(20, dtype=torch.bool))
    with pytest.raises(ValueError, match="more than once"):
        evals.coverage(model, (b for b in [x]), torch.ones(20, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels has 19 rows"):
        evals.coverage(model, x, torch.ones(19, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="train_fraction"):
        evals.label_reconstruction(model, x, torch.ones(20, 2, dtype=torch.bool), train_fraction=1.0)
    with pytest.raises(ValueError, match="thresholds"):
        evals.coverage(model, x, torch.ones(20, 2, dtype=torch.bool), thresholds=(0.5, 0.2))


# Concept cones -----------------------------------------------------------------------------------------------


def full_cone_twin(W, u):
    """Containment of u in the cone of all rows of W: the best nonnegative least squares over every subset
    (the optimum is an unconstrained fit on the support of the NNLS solution)."""
    W, u = W.double(), u.double() / u.double().norm()
    best = 0.0
    for r in range(1, W.shape[0] + 1):
        for S in itertools.combinations(range(W.shape[0]), r):
            A = W[list(S)].T
            c = torch.linalg.lstsq(A, u).solution
            if (c >= -1e-12).all():
                p = A @ c
                if p.norm() > 0:
                    best = max(best, (u @ p / p.norm()).item())
    return best


def test_cone_matches_twin():
    W = torch.randn(7, 5)
    U = torch.randn(6, 5)
    U[0] = W[1] * 2 + W[4] * 0.5  # inside the cone
    out = evals.cone_containment(W, U, sizes=(1, 7))
    cosines = (U / U.norm(dim=1, keepdim=True)).double() @ (W / W.norm(dim=1, keepdim=True)).double().T
    single = cosines.max(1).values.clamp_min(0)
    assert rel_err(out["cos"][:, 0], single) < 1e-6  # one atom: the best aligned row
    full = torch.tensor([full_cone_twin(W, u) for u in U], dtype=torch.float64)
    assert rel_err(out["cos"][:, 1], full) < 1e-6  # every atom: the whole cone
    assert out["cos"][0, 1] == pytest.approx(1.0, abs=1e-9)
    assert (out["cos"][:, 0] <= out["cos"][:, 1] + 1e-12).all()


def test_cone_known_answers():
    """Nonnegative combinations of two atoms are contained with 2 atoms, not 1; a negated atom of an
    orthonormal dictionary is not contained at all."""
    W = torch.linalg.qr(torch.randn(8, 8)).Q  # orthonormal rows
    U = torch.stack([W[0] + W[3], 2 * W[2] + W[5], -W[1]])
    model = sae.ReLUSAE(8, 8)
    with torch.no_grad():
        model.W_dec.copy_(W)
    out = evals.cone_containment(model, U, sizes=(1, 2, 4))
    assert out["cos"][0].tolist() == pytest.approx([2**-0.5, 1, 1], abs=1e-6)
    assert out["cos"][1, 0] == pytest.approx(2 / 5**0.5, abs=1e-6) and out["cos"][1, 1] == pytest.approx(1, abs=1e-6)
    assert out["cos"][2].tolist() == [0, 0, 0]
    assert out["atoms"][0, :2].tolist() in ([0, 3], [3, 0])
    gen = SyntheticActivations(12, 12, 3, orthogonal=True, seed=5)  # the true features lie in their own cone
    truth = evals.cone_containment(true_feature_sae(gen), gen.features, sizes=(1,))
    assert truth["cos"][:, 0].tolist() == pytest.approx([1.0] * 12, abs=1e-6)
    with pytest.raises(ValueError, match="directions"):
        evals.cone_containment(W, torch.randn(3, 7))


# Monosemanticity ---------------------------------------------------------------------------------------------


def monosemanticity_twin(F, E):
    """Pairwise loops: sum_{n != m} r_n r_m cos(e_n, e_m) / sum_{n != m} r_n r_m, r min-max normalised."""
    E = E.double()
    S = (E / E.norm(dim=1, keepdim=True)) @ (E / E.norm(dim=1, keepdim=True)).T
    out = []
    for k in range(F.shape[1]):
        a = F[:, k]
        if (a != 0).sum() < 2:
            out.append(math.nan)
            continue
        r = (a - a.min()) / (a.max() - a.min())
        num = den = 0.0
        for n in range(len(r)):
            for m in range(len(r)):
                if n != m:
                    num += (r[n] * r[m] * S[n, m]).item()
                    den += (r[n] * r[m]).item()
        out.append(num / den if den > 0 else math.nan)
    return torch.tensor(out, dtype=torch.float64)


def test_monosemanticity_matches_twin():
    model = small_sae("relu", n=8)
    with torch.no_grad():
        model.b_enc[0] = 50.0  # active on every input: the min-max shift matters
        model.b_enc[1] = -50.0  # never active: NaN
        model.b_enc[2] = -2.0  # rarely active
    x = torch.randn(40, D)
    E = torch.randn(40, 6) + 1.0
    out = evals.monosemanticity(model, uneven(x, (9, 20)), E, batch_size=16)
    twin = monosemanticity_twin(dense(model, x), E)
    assert out.shape == (8,) and torch.isnan(out[1])
    assert torch.equal(torch.isnan(out), torch.isnan(twin))
    ok = ~torch.isnan(twin)
    assert rel_err(out[ok], twin[ok]) < 1e-5


def test_monosemanticity_known_answer():
    """One true feature per input, embedded as which feature it is: each true-feature latent fires only on
    inputs with one and the same embedding, so its score is 1."""
    gen = SyntheticActivations(16, 16, 1, orthogonal=True, exact_l0=True, seed=4)
    x, a = gen.sample(200)
    E = (a > 0).float()  # the embedding of an input: which feature it holds
    scores = evals.monosemanticity(true_feature_sae(gen), x, E)
    assert torch.allclose(scores, torch.ones(16), atol=1e-6)  # every latent fires on one kind of input only


# Consistency -------------------------------------------------------------------------------------------------


def consistency_twin(A, B):
    A = A.double() / A.double().norm(dim=1, keepdim=True)
    B = B.double() / B.double().norm(dim=1, keepdim=True)
    cos = A @ B.T
    mmcs = sum(max(cos[i, j].item() for j in range(B.shape[0])) for i in range(A.shape[0])) / A.shape[0]
    best = max(
        sum(cos[i, p[i]].item() for i in range(A.shape[0]))
        for p in itertools.permutations(range(B.shape[0]), A.shape[0])
    )
    pairs = sorted(((cos[i, j].item(), i, j) for i in range(A.shape[0]) for j in range(B.shape[0])), reverse=True)
    rows, cols, greedy = set(), set(), 0.0
    for v, i, j in pairs:
        if i not in rows and j not in cols:
            rows.add(i)
            cols.add(j)
            greedy += v
    return mmcs, best / A.shape[0], greedy / A.shape[0], cos.diagonal()


@pytest.mark.parametrize("n_a,n_b", [(6, 6), (4, 6)])
def test_consistency_matches_twin(n_a, n_b):
    A, B = torch.randn(n_a, 5), torch.randn(n_b, 5)
    mmcs, matched, greedy, diag = consistency_twin(A, B)
    out = evals.consistency(A, B)
    assert out["matching"] == "optimal"
    assert out["mmcs"] == pytest.approx(mmcs, rel=1e-6) and out["matched"] == pytest.approx(matched, rel=1e-6)
    assert rel_err(out["per_index"], diag) < 1e-6
    out = evals.consistency(A, B, exact_limit=2, block=3)  # past the limit: the greedy matching, in blocks
    assert out["matching"] == "greedy" and out["matched"] == pytest.approx(greedy, rel=1e-6)


def test_consistency_known_answers():
    model = small_sae()
    same = evals.consistency(model, model)
    assert same["mmcs"] == pytest.approx(1, abs=1e-6) and same["matched"] == pytest.approx(1, abs=1e-6)
    assert same["per_index_mean"] == pytest.approx(1, abs=1e-6)
    perm = torch.randperm(NL)
    shuffled = evals.consistency(model, model.W_dec[perm] * 3.0, exact_limit=8)  # greedy; rows rescaled
    assert shuffled["matched"] == pytest.approx(1, abs=1e-6) and shuffled["mmcs"] == pytest.approx(1, abs=1e-6)
    assert shuffled["per_index_mean"] < 0.9  # an unordered SAE is not consistent index by index
    with pytest.raises(ValueError, match="disagree on d"):
        evals.consistency(model, torch.randn(4, D + 1))


def test_reconstruction_of_a_transcoder_reads_targets():
    model = sae.TopKSAE(D, NL, 4, d_out=6).eval()
    x, y = torch.randn(N, D), torch.randn(N, 6)
    out = evals.reconstruction(model, uneven(x), targets=y, batch_size=50)
    assert out["fvu"] == pytest.approx(metrics.fvu(y, model(x).detach()).item(), rel=1e-5)
    with pytest.raises(ValueError, match="targets"):
        evals.reconstruction(model, x)


def test_evals_run_the_inference_form():
    """A BatchTopK SAE left in training mode is evaluated as at inference (its global threshold), its running
    threshold untouched and its mode restored."""
    model = sae.BatchTopKSAE(D, NL, 3)
    with torch.no_grad():
        model.threshold.fill_(0.4)
    x = torch.randn(N, D)
    model.train()
    out = evals.reconstruction(model, x, batch_size=50)
    assert model.training and model.threshold.item() == pytest.approx(0.4)
    with torch.no_grad():
        F = model.eval().encode_sparse(x).to_dense(NL)
    assert out["l0"] == pytest.approx((F > 0).sum(1).double().mean().item())
    assert (F[F > 0] > 0.4).all()
