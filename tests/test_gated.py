"""Gated encoder (kernels/gated.py) against the float64 reference."""

import pytest
import torch
from conftest import BACKENDS
from helpers import assert_close, assert_slots, case_id, f64, make_encoder, make_gated, rand

import kernels
from kernels import reference as R

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(1, 24, 40), (7, 33, 100), (33, 20, 72)], ids=case_id)
def test_forward(case, dtype, backend):
    B, d, n = case
    x, W, _, b_dec = make_encoder(B, d, n, dtype)
    b_gate, r_mag, b_mag = make_gated(n, dtype)
    with kernels.use_backend(backend):
        code = kernels.gated_encode(x, W, b_gate, r_mag, b_mag, b_dec=b_dec)
    f, pi_g = R.gated(*f64(x, W, b_gate, r_mag, b_mag), b_dec=b_dec.double())
    assert isinstance(code, kernels.GatedCode) and isinstance(code, kernels.SparseCode)
    assert code.gate.shape == code.values.shape and code.gate.dtype == dtype
    gate = kernels.SparseCode(code.gate, code.indices)
    assert_close(code.to_dense(n), f, dtype, "f")
    assert_close(gate.to_dense(n), pi_g, dtype, "ReLU(pi_g)")
    _, pi_g_rounded = R.gated(*f64(x - b_dec, W, b_gate, r_mag, b_mag))  # x - b_dec as the op rounds it
    assert_slots(gate, pi_g_rounded > 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(7, 33, 100), (1, 24, 40)], ids=case_id)
def test_gradients(case, dtype, backend):
    """The gated loss: reconstruction through f, L1 on ReLU(pi_g), auxiliary reconstruction from
    ReLU(pi_g) with stopped decoder gradients."""
    B, d, n = case
    x, W, _, b_dec = make_encoder(B, d, n, dtype)
    b_gate, r_mag, b_mag = make_gated(n, dtype)
    W_dec = rand(n, d, dtype=dtype)
    inputs = [t.requires_grad_() for t in (x, W, b_gate, r_mag, b_mag, b_dec, W_dec)]
    with kernels.use_backend(backend):
        code = kernels.gated_encode(*inputs[:5], b_dec=b_dec)
        x_hat = kernels.sparse_decode(code, W_dec, b_dec)
        x_aux = kernels.sparse_decode(kernels.SparseCode(code.gate, code.indices), W_dec.detach(), b_dec.detach())
        l1 = 0.3 * code.gate.float().sum()
        loss = ((x - x_hat).float().pow(2).sum() + l1) + (x - x_aux).float().pow(2).sum()
    grads = torch.autograd.grad(loss, inputs)

    rx, rW, rbg, rr, rbm, rbd, rWd = ref = f64(*inputs)
    f, pi_g = R.gated(rx, rW, rbg, rr, rbm, b_dec=rbd)
    ref_loss = (
        (rx - f @ rWd - rbd).pow(2).sum() + 0.3 * pi_g.sum() + (rx - pi_g @ rWd.detach() - rbd.detach()).pow(2).sum()
    )
    ref_grads = torch.autograd.grad(ref_loss, ref)
    names = ("x", "W_gate", "b_gate", "r_mag", "b_mag", "b_dec", "W_dec")
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        assert got.dtype == dtype
        assert_close(got, want, dtype, f"grad {name}")
