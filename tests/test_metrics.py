import math

import pytest
import torch

from kernels import SparseCode
from sae import metrics
from sae.synthetic import SyntheticActivations, feature_recovery


def test_reconstruction_metrics():
    x = torch.randn(50, 7) + 3.0
    x_hat = x + 0.1 * torch.randn(50, 7) + 0.5  # an offset: counted by FVU, not by explained variance
    var = (x - x.mean(0)).pow(2).sum()
    r = x - x_hat
    assert metrics.mse(x, x_hat).item() == pytest.approx(r.pow(2).sum(-1).mean().item(), rel=1e-5)
    assert metrics.fvu(x, x_hat).item() == pytest.approx((r.pow(2).sum() / var).item(), rel=1e-5)
    ev = 1 - (r - r.mean(0)).pow(2).sum() / var
    assert metrics.explained_variance(x, x_hat).item() == pytest.approx(ev.item(), rel=1e-5)
    assert metrics.explained_variance(x, x_hat) > 1 - metrics.fvu(x, x_hat)


def test_sparse_code_metrics():
    code = SparseCode(torch.tensor([[2.0, 1.0, 0.0], [3.0, 0.0, 0.0]]), torch.tensor([[4, 1, 0], [4, 2, 3]]).int())
    assert metrics.l0(code).item() == 1.5
    counts = metrics.firing_counts(code, 6)
    assert counts.tolist() == [0, 1, 0, 0, 2, 0]
    assert metrics.dead_fraction(counts) == pytest.approx(4 / 6)
    hist, edges = metrics.firing_histogram(counts, tokens=2, bins=8)
    assert hist.sum().item() == 6 and hist[0].item() == 4 and hist[-1].item() == 2  # 1/2 and 2/2
    assert edges.shape == (9,)


@pytest.mark.parametrize("n,block", [(2, 1), (37, 8), (64, 4096)])
def test_c_dec_blocked_matches_dense(n, block):
    W = torch.randn(n, 5)
    Wn = W / W.norm(dim=1, keepdim=True)
    cos = (Wn @ Wn.T).abs()
    dense = cos.triu(1).sum() / (n * (n - 1) / 2)
    assert metrics.c_dec(W, block=block) == pytest.approx(dense.item(), rel=1e-5)


def test_c_dec_subsample_and_orthogonal():
    Q = torch.linalg.qr(torch.randn(16, 16)).Q
    assert metrics.c_dec(Q) < 1e-6
    W = torch.randn(300, 8)
    assert metrics.c_dec(W, max_latents=200) == pytest.approx(metrics.c_dec(W), rel=0.1)


@pytest.mark.parametrize("n,block", [(0, 3), (2, 5), (6, 64)])
def test_nth_decoder_projection(n, block):
    x, W, b = torch.randn(9, 6), torch.randn(13, 6), torch.randn(6)
    proj = ((x - b) @ W.T).flatten().sort(descending=True).values
    got = metrics.nth_decoder_projection(x, W, b, n, block=block)
    assert got == pytest.approx(proj[n * 9].item(), rel=1e-5)
    with pytest.raises(ValueError, match="n must be in"):
        metrics.nth_decoder_projection(x, W, b, 13)


def test_geometric_median_resists_outliers():
    x = torch.cat([torch.randn(200, 3) * 0.1 + 1.0, torch.full((20, 3), 100.0)])
    m = metrics.geometric_median(x)
    assert (m - 1.0).abs().max() < 0.1
    assert (x.mean(0) - 1.0).abs().max() > 5


def test_synthetic_generator_statistics():
    gen = SyntheticActivations(24, 64, 5.0, correlation=0.5, seed=3)
    x, acts = gen.sample(20000, torch.Generator().manual_seed(0))
    assert x.shape == (20000, 24) and acts.shape == (20000, 64)
    assert (acts > 0).sum(1).float().mean().item() == pytest.approx(5.0, rel=0.05)
    torch.testing.assert_close(x, acts @ gen.features)
    fired = (acts > 0).float()
    corr = torch.corrcoef(fired.T).nan_to_num()
    independent = SyntheticActivations(24, 64, 5.0, seed=3).sample(20000, torch.Generator().manual_seed(0))[1]
    corr0 = torch.corrcoef((independent > 0).float().T).nan_to_num()
    off = ~torch.eye(64, dtype=torch.bool)
    assert corr[off].abs().mean() > 2 * corr0[off].abs().mean()
    exact = SyntheticActivations(24, 16, 3, exact_l0=True, orthogonal=True)
    _, acts = exact.sample(100)
    assert ((acts > 0).sum(1) == 3).all()
    assert metrics.c_dec(exact.features) < 1e-5


def test_feature_recovery():
    F = torch.randn(10, 6)
    perm = torch.randperm(10)
    assert feature_recovery(-3 * F[perm], F) == pytest.approx(1.0, abs=1e-6)
    assert feature_recovery(F[perm], F, one_to_one=True) == pytest.approx(1.0, abs=1e-6)
    half = torch.cat([F[:5], F[:5]])  # each row duplicated: max-matching is fooled, one-to-one is not
    assert feature_recovery(half, F, one_to_one=True) < feature_recovery(half, F)
    assert 0 < feature_recovery(torch.randn(10, 6), F) < 1
    assert math.isfinite(feature_recovery(torch.zeros(3, 6), F))
