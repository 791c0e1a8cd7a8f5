"""The shared backward pieces: scatter_rows (every weight gradient, kernels/scatter.py) and gather_dot (every
value gradient, kernels/sparse_decode.py), against the float64 reference."""

import pytest
import torch
from conftest import BACKENDS, DEVICE
from helpers import assert_close

import kernels
from kernels import backend, tuning
from kernels import reference as R
from kernels.scatter import scatter_rows, scatter_rows_triton
from kernels.sparse_decode import gather_dot

# (B, K, n, d): B = 1, K = 1, odd d, n far above the ids used (empty buckets), ids repeated within rows.
SHAPES = [(1, 1, 3, 5), (7, 5, 40, 33), (33, 8, 19, 20), (4, 16, 70, 48)]
DTYPES = [torch.float32, torch.float16]


def case_id(case):
    return "B{}-K{}-n{}-d{}".format(*case)


def make_ids(B, K, n):
    """[B, K] int32 ids from the lower half of [0, n) only (the upper half are empty buckets), with a repeat in
    every row of K >= 2 and id 0 everywhere in the last slot (padding)."""
    ids = torch.randint(0, max(1, n // 2), (B, K), device=DEVICE, dtype=torch.int32)
    if K >= 2:
        ids[:, 1] = ids[:, 0]
        ids[:, -1] = 0
    return ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_sum", [True, False], ids=["sum", "nosum"])
@pytest.mark.parametrize("case", SHAPES, ids=case_id)
def test_scatter_rows(case, with_sum, dtype, backend):
    B, K, n, d = case
    coef = torch.randn(B, K, device=DEVICE).to(dtype)
    ids = make_ids(B, K, n)
    X = torch.randn(B, d + 3, device=DEVICE).to(dtype)[:, 1 : d + 1]  # a row stride other than d
    with kernels.use_backend(backend):
        dW, dsum = scatter_rows(coef, ids, X, n, with_sum, dtype)
        again, _ = scatter_rows(coef, ids, X, n, with_sum, dtype)
    ref_W, ref_sum = R.scatter_rows(coef.double(), ids, X.double(), n)
    assert dW.shape == (n, d) and dW.dtype == dtype
    assert_close(dW, ref_W, dtype, "dW")
    assert torch.equal(dW, again), "deterministic"
    untouched = torch.ones(n, dtype=torch.bool, device=DEVICE)
    untouched[ids.long().flatten()] = False
    assert untouched.any() and (dW[untouched] == 0).all(), "empty buckets are zero rows"
    if with_sum:
        assert dsum.shape == (n,) and dsum.dtype == dtype
        assert_close(dsum, ref_sum, dtype, "dsum")
    else:
        assert dsum.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_rows_all_slots_on_one_latent(backend):
    """Every slot names latent 5: one bucket holds all B * K entries (several BLOCK_E steps)."""
    B, K, n, d = 33, 4, 9, 20
    coef = torch.randn(B, K, device=DEVICE)
    ids = torch.full((B, K), 5, device=DEVICE, dtype=torch.int32)
    X = torch.randn(B, d, device=DEVICE)
    with kernels.use_backend(backend):
        dW, dsum = scatter_rows(coef, ids, X, n, True, torch.float32)
    ref_W, ref_sum = R.scatter_rows(coef.double(), ids, X.double(), n)
    assert_close(dW, ref_W, torch.float32, "dW")
    assert_close(dsum, ref_sum, torch.float32, "dsum")


def test_scatter_rows_into_accumulates_in_place():
    """`into`: the sums are added to an existing dW; rows of empty buckets keep their bits."""
    B, K, n, d = 33, 4, 40, 20
    coef, ids, X = torch.randn(B, K, device=DEVICE), make_ids(B, K, n), torch.randn(B, d, device=DEVICE)
    prior = torch.randn(n, d, device=DEVICE)
    out, _ = scatter_rows_triton(coef, ids, X, n, False, torch.float32, into=prior.clone())
    ref_W, _ = R.scatter_rows(coef.double(), ids, X.double(), n)
    assert_close(out, prior.double() + ref_W, torch.float32, "dW")
    untouched = torch.ones(n, dtype=torch.bool, device=DEVICE)
    untouched[ids.long().flatten()] = False
    assert untouched.any() and torch.equal(out[untouched], prior[untouched])
    with pytest.raises(ValueError, match="into must be"):
        scatter_rows_triton(coef, ids, X, n, True, torch.float32, into=prior)


@pytest.mark.skipif(not backend.INTERPRET, reason="interpreter only: a GPU runs these configs anyway")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [20, 1030])
def test_scatter_rows_gpu_configs(d, dtype, monkeypatch):
    """The GPU configs (LATENTS-latent groups, masked column tiles) through the interpreter: a bucket of half the
    pairs spans several blocks, most latents are empty."""
    monkeypatch.setattr(tuning, "_device_key", lambda op: "default")
    B, K, n = 24, 3, 70
    coef = torch.randn(B, K, device=DEVICE).to(dtype)
    ids = torch.randint(0, n, (B, K), device=DEVICE, dtype=torch.int32)
    ids[:, 0] = 33
    X = torch.randn(B, d, device=DEVICE).to(dtype)
    dW, dsum = scatter_rows(coef, ids, X, n, True, dtype)
    ref_W, ref_sum = R.scatter_rows(coef.double(), ids, X.double(), n)
    assert_close(dW, ref_W, dtype, "dW")
    assert_close(dsum, ref_sum, dtype, "dsum")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SHAPES, ids=case_id)
def test_gather_dot(case, dtype, backend):
    B, K, n, d = case
    g = torch.randn(B, d, device=DEVICE).to(dtype)
    ids = make_ids(B, K, n)
    W = torch.randn(n, d, device=DEVICE).to(dtype)
    with kernels.use_backend(backend):
        out = gather_dot(g, ids, W)
    assert out.shape == (B, K) and out.dtype == dtype
    assert_close(out, R.gather_dot(g.double(), ids, W.double()), dtype, "gather_dot")
    if K >= 2:
        assert torch.equal(out[:, 0], out[:, 1]), "a repeated id gives the same dot product"
