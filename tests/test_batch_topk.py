"""BatchTopK (kernels/batch_topk.py), training and inference forms, against the float64 reference."""

import pytest
import torch
from conftest import BACKENDS, DEVICE
from helpers import assert_close, assert_same_layout, assert_slots, case_id, f64, make_encoder, rand

import kernels
from kernels import batch_topk
from kernels import reference as R

DTYPES = [torch.float32, torch.float16]


def assert_batch_topk(code, f_ref, relu_ref, dtype):
    """The kept values are the reference's f_ref [B, n] (sorted; a near-tie may swap entries) and equal
    ReLU(z) (relu_ref [B, n]) at their ids; rows are sorted descending, then empty slots."""
    values, ids = code.values.double().cpu(), code.indices.cpu().long()
    f_ref, relu_ref = f_ref.detach().cpu(), relu_ref.detach().cpu()
    kept = values > 0
    assert kept.sum() == (f_ref > 0).sum()
    assert_close(values[kept].sort().values, f_ref[f_ref > 0].sort().values, dtype, "kept values")
    assert_close(values, relu_ref.gather(1, ids) * kept, dtype, "values at their ids")
    assert (values[:, 1:] <= values[:, :-1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,k", [((7, 33, 100), 5), ((1, 24, 40), 3), ((33, 20, 72), 2)], ids=str)
def test_forward(case, k, dtype, backend):
    B, d, n = case
    x, W, b, b_dec = make_encoder(B, d, n, dtype)
    x[0] *= 4  # row 0 takes far more than k
    with kernels.use_backend(backend):
        code = kernels.batch_topk_encode(x, W, b, k, b_dec=b_dec)
    f_ref = R.batch_topk(*f64(x, W, b), k, b_dec=b_dec.double())
    assert (f_ref > 0).sum() == B * k
    assert type(code) is kernels.SparseCode and code.values.dtype == dtype
    assert_batch_topk(code, f_ref, R.relu(*f64(x, W, b), b_dec=b_dec.double()), dtype)
    if dtype == torch.float32:
        assert torch.equal(code.to_dense(n) > 0, f_ref > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reruns_with_more_candidates(backend, monkeypatch):
    """One row holds most of the batch's largest entries: its first candidates are all kept, so the selection
    runs again with more. The hint remembers the factor: a warm call runs once, with the same code."""
    B, d, n, k = 6, 16, 60, 3
    x, W, b, _ = make_encoder(B, d, n)
    x[2] *= 10
    f_ref = R.batch_topk(*f64(x, W, b), k)
    assert (f_ref[2] > 0).sum() > 2 * k
    candidates = []
    original = batch_topk.topk_select
    monkeypatch.setattr(batch_topk, "topk_select", lambda *a: candidates.append(a[-1]) or original(*a))
    hints = kernels.EncodeHints(candidate_factor=1)
    with kernels.use_backend(backend):
        code = kernels.batch_topk_encode(x, W, b, k, hints=hints)
        assert candidates[0] == k and len(candidates) > 1 and hints.candidate_factor == candidates[-1] // k
        candidates.clear()
        warm = kernels.batch_topk_encode(x, W, b, k, hints=hints)
        assert len(candidates) == 1
        fresh = kernels.batch_topk_encode(x, W, b, k)
    assert torch.equal(code.to_dense(n) > 0, f_ref > 0)
    assert_close(code.to_dense(n), f_ref, torch.float32, "f")
    assert_same_layout(warm, code)
    assert_same_layout(fresh, code)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients(dtype, backend):
    B, d, n, k = 7, 33, 100, 4
    x, W, b, b_dec = make_encoder(B, d, n, dtype)
    inputs = [t.requires_grad_() for t in (x, W, b, b_dec)]
    with kernels.use_backend(backend):
        code = kernels.batch_topk_encode(*inputs[:3], k, b_dec=b_dec)
    G = rand(*code.values.shape, dtype=dtype)
    grads = torch.autograd.grad(code.values, inputs, G)
    rx, rW, rb, rbd = ref = f64(*inputs)
    ref_vals = R.relu(rx, rW, rb, b_dec=rbd).gather(1, code.indices.long()) * (code.values > 0)  # same set
    ref_grads = torch.autograd.grad(ref_vals, ref, G.double())
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads, strict=True):
        assert got.dtype == dtype
        assert_close(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inference(dtype, backend):
    B, d, n = 7, 33, 100
    x, W, b, b_dec = make_encoder(B, d, n, dtype)
    hints = kernels.EncodeHints(capacity=2)
    with kernels.use_backend(backend):
        code = kernels.batch_topk_inference(x, W, b, 0.75, b_dec=b_dec)
        zero = kernels.batch_topk_inference(x, W, b, 0.0, b_dec=b_dec, hints=hints)
        assert hints.capacity >= zero.k
        again = kernels.batch_topk_inference(x, W, b, 0.75, b_dec=b_dec, hints=hints)
    z = R.preactivations(*f64(x, W, b, b_dec))
    assert type(code) is kernels.SparseCode
    assert_close(code.to_dense(n), z * (z > 0.75), dtype, "f")
    assert_slots(code, z > 0.75)
    assert_close(zero.to_dense(n), torch.relu(z), dtype, "f at threshold 0")
    assert_same_layout(again, code)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x, W, b: kernels.batch_topk_encode(x, W, b, 51), ValueError, r"k must be an int in \[1, n=50\]"),
        (lambda x, W, b: kernels.batch_topk_encode(x, W, b, 0), ValueError, "k must be an int in"),
        (lambda x, W, b: kernels.batch_topk_inference(x, W, b, -1.0), ValueError, "threshold must be a finite"),
        (lambda x, W, b: kernels.batch_topk_encode(x, W, b, 3, hints={}), TypeError, "hints must be a kernels.Enc"),
        (lambda x, W, b: kernels.batch_topk_inference(x, W, b, 1.0, capacity=0), ValueError, "capacity must be"),
    ],
    ids=["k-large", "k-zero", "threshold", "hints", "capacity"],
)
def test_bad_inputs(call, exc, match):
    x, W, b, _ = make_encoder(7, 20, 50)
    with pytest.raises(exc, match=match):
        call(x, W, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [(1000, 768, 16384), (333, 1000, 5000)], ids=case_id)
def test_gpu_large(case, dtype):
    B, d, n = case
    x, W, b, b_dec = make_encoder(B, d, n, dtype)
    code = kernels.batch_topk_encode(x, W, b, 32, b_dec=b_dec)
    x_c, W64, b64 = f64(x - b_dec, W, b)
    assert_batch_topk(code, R.batch_topk(x_c, W64, b64, 32), R.relu(x_c, W64, b64), dtype)
    assert code.values.device.type == DEVICE
