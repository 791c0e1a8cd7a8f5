"""JumpReLU encoder (kernels/jumprelu.py) against the float64 reference."""

import pytest
import torch
from conftest import BACKENDS, DEVICE
from helpers import (
    AllocationRecorder,
    assert_close,
    assert_same_layout,
    assert_slots,
    case_id,
    decode_loss,
    f64,
    make_encoder,
    rand,
    thresholds,
)

import kernels
from kernels import reference as R
from kernels import threshold, torch_ops

# (B, d, n): B = 1, 7, 33; d and n not powers of two; several column splits.
SHAPES = [(1, 24, 40), (7, 33, 100), (33, 20, 72)]
GRAD_SHAPES = [(7, 33, 100), (1, 24, 40)]
DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SHAPES, ids=case_id)
def test_forward(case, dtype, backend):
    B, d, n = case
    x, W, b, b_dec = make_encoder(B, d, n, dtype)
    theta = thresholds(x, W, b, b_dec, 0.2)
    with kernels.use_backend(backend):
        code = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.2, b_dec=b_dec)
    ref_f, ref_l0 = R.jumprelu(*f64(x, W, b, theta), 0.2, b_dec=b_dec.double())
    assert isinstance(code, kernels.JumpReLUCode) and isinstance(code, kernels.SparseCode)
    assert code.values.dtype == dtype and code.l0.dtype == torch.float32
    assert_close(code.to_dense(n), ref_f, dtype, "f")
    assert torch.equal(code.l0.cpu().double(), ref_l0.cpu())
    assert_slots(code, R.jumprelu_band(*f64(x, W, b, theta), 0.2, b_dec=b_dec.double()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_SHAPES, ids=case_id)
def test_gradients(case, dtype, backend):
    """Reconstruction and L0 terms: gradients of x, W_enc, b_enc, threshold, b_dec and W_dec."""
    B, d, n = case
    x, W, b, b_dec = make_encoder(B, d, n, dtype)
    theta = thresholds(x, W, b, b_dec, 0.6)
    W_dec = rand(n, d, dtype=dtype)
    G, g_l0 = rand(B, d, dtype=dtype), rand(B)
    inputs = [t.requires_grad_() for t in (x, W, b, theta, b_dec, W_dec)]
    with kernels.use_backend(backend):
        code = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.6, b_dec=b_dec)
        loss = decode_loss(code, W_dec, b_dec, G) + (code.l0 * g_l0).sum()
    grads = torch.autograd.grad(loss, inputs)

    rx, rW, rb, rt, rbd, rWd = ref = f64(*inputs)
    f, ref_l0 = R.jumprelu(rx, rW, rb, rt, 0.6, b_dec=rbd)
    ref_loss = ((f @ rWd + rbd) * G.double()).sum() + (ref_l0 * g_l0.double()).sum()
    ref_grads = torch.autograd.grad(ref_loss, ref)
    assert ref_grads[3].abs().sum() > 0, "the band must be non-empty"
    for name, got, want in zip(("x", "W_enc", "b_enc", "threshold", "b_dec", "W_dec"), grads, ref_grads, strict=True):
        assert got.dtype == dtype
        assert_close(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_thresholds(dtype, backend):
    """Integer data: many z equal theta exactly (inactive, in the band); thresholds at zero; rows with
    zero actives (x = 0 and b < theta)."""
    B, d, n = 9, 7, 37
    x = torch.randint(-1, 2, (B, d), device=DEVICE).to(dtype)
    W = torch.randint(-1, 2, (n, d), device=DEVICE).to(dtype)
    b = torch.zeros(n, device=DEVICE, dtype=dtype)
    theta = torch.randint(0, 3, (n,), device=DEVICE).to(dtype)
    theta[:5] = 0
    x[4] = 0  # z = 0 <= theta everywhere: no actives, band where theta = 0
    inputs = [t.requires_grad_() for t in (x, W, b, theta)]
    with kernels.use_backend(backend):
        code = kernels.jumprelu_encode(*inputs, bandwidth=0.5)
    ref = f64(*inputs)
    ref_f, ref_l0 = R.jumprelu(*ref, 0.5)
    z = R.preactivations(*f64(x, W, b))
    assert (z == theta.double()).sum() > 10
    assert torch.equal(code.to_dense(n).double(), ref_f)
    assert torch.equal(code.l0.double(), ref_l0) and code.l0[4] == 0
    assert_slots(code, R.jumprelu_band(*f64(x, W, b, theta), 0.5))
    G = torch.randn(B, n, device=DEVICE)
    loss = (code.to_dense(n).float() * G).sum() + code.l0.sum()
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad((ref_f * G.double()).sum() + ref_l0.sum(), ref)
    for name, got, want in zip(("x", "W_enc", "b_enc", "threshold"), grads, ref_grads, strict=True):
        assert_close(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    x, W, b, _ = make_encoder(17, 20, 72)
    theta = 0.3 * torch.rand(72, device=DEVICE)
    W.requires_grad_()
    theta.requires_grad_()
    runs = []
    for _ in range(2):
        with kernels.use_backend(backend):
            code = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.5)
            runs.append(torch.autograd.grad((code.values.sum() + code.l0.sum()), (W, theta)))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hints_change_passes_not_layout(backend, monkeypatch):
    """A warm EncodeHints saves the second pass; the code is the same as with fresh hints, and a hint far too
    large or too small gives the same code again."""
    x, W, b, _ = make_encoder(7, 16, 90)
    theta = 0.2 * torch.rand(90, device=DEVICE)
    launcher = f"threshold_select_{backend}"
    owner = torch_ops if backend == "torch" else threshold
    calls = []
    original = getattr(owner, launcher)
    monkeypatch.setattr(owner, launcher, lambda *a: calls.append(a[-1]) or original(*a))
    hints = kernels.EncodeHints(capacity=1)
    with kernels.use_backend(backend):
        cold = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.1, hints=hints)
        assert calls == [1, cold.k], "a guess too small: a second pass with the capacity the largest row needs"
        assert hints.capacity >= cold.k
        calls.clear()
        warm = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.1, hints=hints)
        assert len(calls) == 1, "a warm hint: one pass"
        fresh = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.1)
        huge = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.1, hints=kernels.EncodeHints(capacity=10**6))
    for code in (warm, fresh, huge):
        assert_same_layout(code, cold)
        assert torch.equal(code.l0, cold.l0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_allocates_batch_by_latents(backend):
    B, d, n = 32, 12, 600  # d < B: the weight gradient [n, d] is smaller than B x n
    x, W, b, _ = make_encoder(B, d, n)
    theta = torch.full((n,), 2.5, device=DEVICE)
    inputs = [t.requires_grad_() for t in (x, W, b, theta)]
    with AllocationRecorder() as rec, kernels.use_backend(backend):
        if backend == "torch":
            torch_ops.threshold_select_torch(torch_ops.JUMPRELU, x, W, b, theta, None, None, 0.05, 16, budget=1024)
        else:
            code = kernels.jumprelu_encode(*inputs, bandwidth=0.1)
            (code.values.sum() + code.l0.sum()).backward()
    biggest = max(rec.numels)
    assert biggest[0] < B * n, f"{biggest[1]} allocated {biggest[0]} >= B*n = {B * n} elements"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [(1000, 768, 16384), (333, 1000, 5000)], ids=case_id)
def test_gpu_large(case, dtype):
    """Large shapes: entries within rounding of the threshold may go either way; every other entry and
    every row's L0 must match. The reference starts from x - b_dec as the op rounds it (in dtype)."""
    B, d, n = case
    x, W, b, b_dec = make_encoder(B, d, n, dtype)
    theta = (0.5 + 0.2 * torch.rand(n, device=DEVICE)).to(dtype)
    code = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.01, b_dec=b_dec)
    x_c, W64, b64, theta64 = f64(x - b_dec, W, b, theta)
    z = R.preactivations(x_c, W64, b64)
    near = (z - theta64).abs() < 1e-4 * z.abs().amax()  # fp32 accumulation order vs float64
    got, ref = code.to_dense(n).double(), torch.where(z > theta64, z, 0.0)
    assert_close(got * ~near, ref * ~near, dtype, "jumprelu f away from the threshold")
    assert ((got == 0) | ((got - z).abs() <= 1e-2 * z.abs()))[near].all(), "near the threshold: 0 or z"
    assert ((code.l0.double() - (z > theta64).sum(1)).abs() <= near.sum(1)).all()
