"""ReLU encoder (kernels/relu.py) against the float64 reference: the compact and the dense layout."""

import pytest
import torch
from conftest import BACKENDS, DEVICE
from helpers import assert_close, assert_same_layout, assert_slots, case_id, f64, make_encoder, rand

import kernels
from kernels import reference as R
from kernels import relu

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(7, 33, 100), (1, 24, 40), (33, 20, 72)], ids=case_id)
def test_sparse_with_decoder_norm_penalty(case, dtype, backend):
    """Sparse regime (negative bias): forward, and gradients of ||x - x_hat||^2 + sum f_i ||W_dec,i||."""
    B, d, n = case
    x, W, _, b_dec = make_encoder(B, d, n, dtype)
    b = torch.full((n,), -1.5, device=DEVICE, dtype=dtype)
    W_dec = rand(n, d, dtype=dtype)
    inputs = [t.requires_grad_() for t in (x, W, b, b_dec, W_dec)]
    with kernels.use_backend(backend):
        code = kernels.relu_encode(x, W, b, b_dec=b_dec)
        assert code.k < n
        x_hat = kernels.sparse_decode(code, W_dec, b_dec)
        penalty = (code.values * W_dec.norm(dim=1)[code.indices.long()]).sum()
        loss = (x - x_hat).float().pow(2).sum() + penalty.float()
    grads = torch.autograd.grad(loss, inputs)

    rx, rW, rb, rbd, rWd = ref = f64(*inputs)
    f = R.relu(rx, rW, rb, b_dec=rbd)
    assert_close(code.to_dense(n), f, dtype, "f")
    if dtype == torch.float32:  # fp16 rounding of x - b_dec may flip entries near zero
        assert_slots(code, f > 0)
    f = f * (code.to_dense(n).detach() > 0)  # gradients of the same set
    ref_loss = (rx - f @ rWd - rbd).pow(2).sum() + (f * rWd.norm(dim=1)).sum()
    ref_grads = torch.autograd.grad(ref_loss, ref)
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec", "W_dec"), grads, ref_grads, strict=True):
        assert got.dtype == dtype
        assert_close(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_layout(backend, monkeypatch):
    """Most latents firing: every latent a slot, with the reference's values and gradients."""
    B, d, n = 7, 16, 50
    x, W, b, _ = make_encoder(B, d, n)
    b_dense = torch.full_like(b, 0.5)
    inputs = [t.requires_grad_() for t in (x, W, b_dense)]
    with kernels.use_backend(backend):
        code = kernels.relu_encode(*inputs)
        assert code.k == n and code.indices.tolist() == [list(range(n))] * B
        ref = f64(*inputs)
        f = R.relu(*ref)
        assert_close(code.values, f, torch.float32, "dense f")
        G = torch.randn(B, n, device=DEVICE)
        with monkeypatch.context() as m:  # every latent a slot: two GEMMs, never the K = n gather / scatter
            m.setattr(relu, "encoder_grads", lambda *a: pytest.fail("dense layout took the sparse gradients"))
            grads = torch.autograd.grad((code.values * G).sum(), inputs)
    ref_grads = torch.autograd.grad((f * G.double()).sum(), ref)
    for name, got, want in zip(("x", "W_enc", "b_enc"), grads, ref_grads, strict=True):
        assert_close(got, want, torch.float32, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_is_a_function_of_the_inputs(backend, monkeypatch):
    """Dense iff a row keeps more than DENSE_FRACTION of the latents, whatever ran before: a hint only says
    which pass runs first (counted here), and a stale hint gives the same code as fresh ones."""
    B, d, n = 7, 16, 50
    x, W, b, _ = make_encoder(B, d, n)
    b_dense, b_sparse = torch.full_like(b, 0.5), torch.full_like(b, -2.0)
    dense_calls = []
    original = relu.relu_dense
    monkeypatch.setattr(relu, "relu_dense", lambda *a: dense_calls.append(1) or original(*a))
    hints = kernels.EncodeHints()
    with kernels.use_backend(backend):
        fresh = {name: kernels.relu_encode(x, W, bias) for name, bias in (("dense", b_dense), ("sparse", b_sparse))}
        assert fresh["dense"].k == n and fresh["sparse"].k < relu.dense_above(n)
        dense_calls.clear()
        # One hint object through dense -> dense -> sparse -> sparse batches. Dense products: the cold dense
        # call after its fused pass; the warm one at once; the first sparse call tries it (the hint says
        # dense) and then runs the fused pass; the next sparse call runs the fused pass only.
        for name, dense_passes in (("dense", 1), ("dense", 1), ("sparse", 1), ("sparse", 0)):
            before = len(dense_calls)
            code = kernels.relu_encode(x, W, b_dense if name == "dense" else b_sparse, hints=hints)
            assert_same_layout(code, fresh[name])
            assert hints.relu_dense == (name == "dense")
            assert len(dense_calls) - before == dense_passes, f"{name}: dense passes"
        fixed = kernels.relu_encode(x, W, b_dense, capacity=n, hints=kernels.EncodeHints(relu_dense=True))
    assert fixed.k == n and fixed.indices[:, -1].eq(0).any(), "a fixed capacity: compact, whatever the hint"
    assert_close(fixed.to_dense(n), fresh["dense"].to_dense(n), torch.float32, "f")
    assert_slots(fresh["sparse"], R.relu(*f64(x, W, b_sparse)) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cold_dense_call_tries_the_fused_pass_first(backend, monkeypatch):
    """Without a hint a dense batch costs a fused pass, then the dense product; with one, the product only."""
    x, W, b, _ = make_encoder(5, 12, 40)
    b.fill_(0.5)
    dense_calls = []
    original = relu.relu_dense
    monkeypatch.setattr(relu, "relu_dense", lambda *a: dense_calls.append(1) or original(*a))
    fused = []
    original_select = relu.threshold_select
    monkeypatch.setattr(relu, "threshold_select", lambda *a: fused.append(1) or original_select(*a))
    hints = kernels.EncodeHints()
    with kernels.use_backend(backend):
        kernels.relu_encode(x, W, b, hints=hints)
        assert (len(fused), len(dense_calls)) == (1, 1) and hints.relu_dense
        kernels.relu_encode(x, W, b, hints=hints)
    assert (len(fused), len(dense_calls)) == (1, 2)
