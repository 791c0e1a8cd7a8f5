"""Threshold encoders (JumpReLU, ReLU, gated) and BatchTopK against the float64 reference."""

import pytest
import torch
from conftest import BACKENDS, DEVICE
from helpers import AllocationRecorder, assert_close

import kernels
from kernels import reference as R
from kernels import threshold_encode as T
from kernels import torch_ops

# (B, d, n): B = 1, 7, 33; d and n not powers of two; several column splits.
SHAPES = [(1, 24, 40), (7, 33, 100), (33, 20, 72)]
DTYPES = [torch.float32, torch.float16]
GRAD_SHAPES = [(7, 33, 100), (1, 24, 40)]


def case_id(case):
    return "B{}-d{}-n{}".format(*case)


def rand(*shape, scale=1.0, dtype=torch.float32):
    return (scale * torch.randn(*shape, device=DEVICE)).to(dtype)


def make(B, d, n, dtype):
    """x [B, d], W_enc [n, d], b_enc [n], b_dec [d]."""
    return (
        rand(B, d, dtype=dtype),
        rand(n, d, scale=d**-0.5, dtype=dtype),
        rand(n, scale=0.1, dtype=dtype),
        rand(d, scale=0.1, dtype=dtype),
    )


def f64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def thresholds(x, W, b, b_dec, bandwidth, margin=0.02):
    """theta [n] in [0, 0.5) with no z within `margin` of theta or of the band's edges, so the rounding of
    low-precision inputs (x - b_dec in fp16) flips no entry."""
    z = R.preactivations(*f64(x, W, b, b_dec))
    theta = 0.5 * torch.rand(W.shape[0], device=DEVICE, dtype=torch.float64)
    while True:
        theta = theta.to(x.dtype).double()
        gap = (z - theta).abs()
        bad = ((gap < margin) | ((gap - bandwidth / 2).abs() < margin)).any(0)
        if not bad.any():
            return theta.to(x.dtype)
        theta[bad] = 0.5 * torch.rand(int(bad.sum()), device=DEVICE, dtype=torch.float64)


def assert_slots(code, mask):
    """code's slots hold exactly the entries of the [B, n] bool mask: by latent id, then empty slots
    (value 0, index 0)."""
    values, ids = code.values.cpu(), code.indices.cpu().long()
    mask = mask.cpu()
    assert code.indices.dtype == torch.int32
    counts = mask.sum(1)
    assert values.shape[1] >= max(int(counts.max()), 1)
    for row, count in enumerate(counts.tolist()):
        want = mask[row].nonzero().flatten()
        assert ids[row, :count].tolist() == want.tolist(), f"row {row}: slots differ"
        assert (ids[row, count:] == 0).all() and (values[row, count:] == 0).all(), f"row {row}: empty slots"


def decode_loss(code, W_dec, b_dec, G):
    return (kernels.sparse_decode(code, W_dec, b_dec) * G).sum()


# JumpReLU ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SHAPES, ids=case_id)
def test_jumprelu_forward(case, dtype, backend):
    B, d, n = case
    x, W, b, b_dec = make(B, d, n, dtype)
    theta = thresholds(x, W, b, b_dec, 0.2)
    with kernels.use_backend(backend):
        code, l0 = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.2, b_dec=b_dec)
    ref_f, ref_l0 = R.jumprelu(*f64(x, W, b, theta), 0.2, b_dec=b_dec.double())
    assert code.values.dtype == dtype and l0.dtype == torch.float32
    assert_close(code.to_dense(n), ref_f, dtype, "f")
    assert torch.equal(l0.cpu().double(), ref_l0.cpu())
    assert_slots(code, R.jumprelu_band(*f64(x, W, b, theta), 0.2, b_dec=b_dec.double()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_SHAPES, ids=case_id)
def test_jumprelu_gradients(case, dtype, backend):
    """Reconstruction and L0 terms: gradients of x, W_enc, b_enc, threshold, b_dec and W_dec."""
    B, d, n = case
    x, W, b, b_dec = make(B, d, n, dtype)
    theta = thresholds(x, W, b, b_dec, 0.6)
    W_dec = rand(n, d, dtype=dtype)
    G, g_l0 = rand(B, d, dtype=dtype), rand(B)
    inputs = [t.requires_grad_() for t in (x, W, b, theta, b_dec, W_dec)]
    with kernels.use_backend(backend):
        code, l0 = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.6, b_dec=b_dec)
        loss = decode_loss(code, W_dec, b_dec, G) + (l0 * g_l0).sum()
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
def test_jumprelu_exact_thresholds(dtype, backend):
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
        code, l0 = kernels.jumprelu_encode(*inputs, bandwidth=0.5)
    ref = f64(*inputs)
    ref_f, ref_l0 = R.jumprelu(*ref, 0.5)
    z = R.preactivations(*f64(x, W, b))
    assert (z == theta.double()).sum() > 10
    assert torch.equal(code.to_dense(n).double(), ref_f)
    assert torch.equal(l0.double(), ref_l0) and l0[4] == 0
    assert_slots(code, R.jumprelu_band(*f64(x, W, b, theta), 0.5))
    G = torch.randn(B, n, device=DEVICE)
    loss = (code.to_dense(n).float() * G).sum() + l0.sum()
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad((ref_f * G.double()).sum() + ref_l0.sum(), ref)
    for name, got, want in zip(("x", "W_enc", "b_enc", "threshold"), grads, ref_grads, strict=True):
        assert_close(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_grows_and_fixed_capacity_raises(backend, monkeypatch):
    """Row 3 has every latent active, far above the first capacity guess: nothing is lost."""
    B, d, n = 7, 12, 90
    x, W, b, _ = make(B, d, n, torch.float32)
    W[:, 0] = 1.0
    x[:, 0] = 0.0
    x[3, 0] = 100.0
    theta = torch.full((n,), 2.0, device=DEVICE)
    monkeypatch.setitem(T._state["hint"], T.JUMPRELU, 4)
    ref_f, ref_l0 = R.jumprelu(*f64(x, W, b, theta), 0.1)
    assert ref_l0[3] == n and ref_l0.sum() - n < 10
    with kernels.use_backend(backend):
        code, l0 = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.1)
        assert code.k == n
        assert_close(code.to_dense(n), ref_f, torch.float32, "f")
        assert_slots(code, R.jumprelu_band(*f64(x, W, b, theta), 0.1))
        assert torch.equal(l0.double(), ref_l0)
        fixed, _ = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.1, capacity=n + 5)
        assert fixed.k == n + 5 and torch.equal(fixed.to_dense(n), code.to_dense(n))
        with pytest.raises(ValueError, match=f"a row has {n} active latents, more than capacity=40"):
            kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.1, capacity=40)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    x, W, b, _ = make(17, 20, 72, torch.float32)
    theta = 0.3 * torch.rand(72, device=DEVICE)
    W.requires_grad_()
    theta.requires_grad_()
    runs = []
    for _ in range(2):
        with kernels.use_backend(backend):
            code, l0 = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.5)
            runs.append(torch.autograd.grad((code.values.sum() + l0.sum()), (W, theta)))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["relu", "jumprelu", "gated"])
def test_no_active_latents(op, backend):
    """Every row empty: one empty slot per row, zero outputs and zero (not NaN) gradients."""
    x, W, b, _ = make(5, 9, 30, torch.float32)
    low = torch.full_like(b, -100.0)
    inputs = [t.requires_grad_() for t in (x, W)]
    with kernels.use_backend(backend):
        if op == "relu":
            code = kernels.relu_encode(x, W, low)
        elif op == "jumprelu":
            code, _ = kernels.jumprelu_encode(x, W, b, -low, bandwidth=1.0)
        else:
            code, gate = kernels.gated_encode(x, W, low, b, b)
            assert gate.k == 1 and (gate.values == 0).all()
        grads = torch.autograd.grad(code.values.sum(), inputs)
    assert code.k == 1 and (code.values == 0).all() and (code.indices == 0).all()
    assert all((g == 0).all() for g in grads)


# ReLU -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_SHAPES + [(33, 20, 72)], ids=case_id)
def test_relu_sparse_with_decoder_norm_penalty(case, dtype, backend):
    """Sparse regime (negative bias): forward, and gradients of ||x - x_hat||^2 + sum f_i ||W_dec,i||."""
    B, d, n = case
    x, W, _, b_dec = make(B, d, n, dtype)
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
def test_relu_dense_path(backend, monkeypatch):
    """Most latents firing: every latent a slot; a sparse batch afterwards gets the sparse layout back."""
    monkeypatch.setitem(T._state, "dense", False)
    B, d, n = 7, 16, 50
    x, W, b, _ = make(B, d, n, torch.float32)
    b_dense = torch.full_like(b, 0.5)
    inputs = [t.requires_grad_() for t in (x, W, b_dense)]
    with kernels.use_backend(backend):
        code = kernels.relu_encode(*inputs)
        assert code.k == n and code.indices.tolist() == [list(range(n))] * B and T._state["dense"]
        ref = f64(*inputs)
        f = R.relu(*ref)
        assert_close(code.values, f, torch.float32, "dense f")
        G = torch.randn(B, n, device=DEVICE)
        grads = torch.autograd.grad((code.values * G).sum(), inputs)
        ref_grads = torch.autograd.grad((f * G.double()).sum(), ref)
        for name, got, want in zip(("x", "W_enc", "b_enc"), grads, ref_grads, strict=True):
            assert_close(got, want, torch.float32, f"grad {name}")
        b_sparse = torch.full_like(b, -2.0)
        from_dense = kernels.relu_encode(x, W, b_sparse)
        assert not T._state["dense"]
        from_sparse = kernels.relu_encode(x, W, b_sparse)
    assert from_dense.k == from_sparse.k < n
    assert torch.equal(from_dense.indices, from_sparse.indices)
    assert_close(from_dense.values, from_sparse.values, torch.float32, "values")
    assert_slots(from_dense, R.relu(*f64(x, W, b_sparse)) > 0)


# Gated ------------------------------------------------------------------------------------------------


def make_gated(n, dtype):
    return rand(n, scale=0.1, dtype=dtype), rand(n, scale=0.5, dtype=dtype), rand(n, scale=0.1, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SHAPES, ids=case_id)
def test_gated_forward(case, dtype, backend):
    B, d, n = case
    x, W, _, b_dec = make(B, d, n, dtype)
    b_gate, r_mag, b_mag = make_gated(n, dtype)
    with kernels.use_backend(backend):
        code, gate = kernels.gated_encode(x, W, b_gate, r_mag, b_mag, b_dec=b_dec)
    f, pi_g = R.gated(*f64(x, W, b_gate, r_mag, b_mag), b_dec=b_dec.double())
    assert code.indices is gate.indices
    assert_close(code.to_dense(n), f, dtype, "f")
    assert_close(gate.to_dense(n), pi_g, dtype, "ReLU(pi_g)")
    assert_slots(gate, pi_g > 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_SHAPES, ids=case_id)
def test_gated_gradients(case, dtype, backend):
    """The gated loss: reconstruction through f, L1 on ReLU(pi_g), auxiliary reconstruction from
    ReLU(pi_g) with stopped decoder gradients."""
    B, d, n = case
    x, W, _, b_dec = make(B, d, n, dtype)
    b_gate, r_mag, b_mag = make_gated(n, dtype)
    W_dec = rand(n, d, dtype=dtype)
    inputs = [t.requires_grad_() for t in (x, W, b_gate, r_mag, b_mag, b_dec, W_dec)]
    with kernels.use_backend(backend):
        code, gate = kernels.gated_encode(*inputs[:5], b_dec=b_dec)
        x_hat = kernels.sparse_decode(code, W_dec, b_dec)
        x_aux = kernels.sparse_decode(gate, W_dec.detach(), b_dec.detach())
        loss = ((x - x_hat).float().pow(2).sum() + 0.3 * gate.values.float().sum()) + (x - x_aux).float().pow(2).sum()
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


# BatchTopK --------------------------------------------------------------------------------------------


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
def test_batch_topk_forward(case, k, dtype, backend):
    B, d, n = case
    x, W, b, b_dec = make(B, d, n, dtype)
    x[0] *= 4  # row 0 takes far more than k
    with kernels.use_backend(backend):
        code = kernels.batch_topk_encode(x, W, b, k, b_dec=b_dec)
    f_ref = R.batch_topk(*f64(x, W, b), k, b_dec=b_dec.double())
    assert (f_ref > 0).sum() == B * k
    assert code.values.dtype == dtype
    assert_batch_topk(code, f_ref, R.relu(*f64(x, W, b), b_dec=b_dec.double()), dtype)
    if dtype == torch.float32:
        assert torch.equal(code.to_dense(n) > 0, f_ref > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_topk_reruns_with_more_candidates(backend, monkeypatch):
    """One row holds most of the batch's largest entries: its first candidates are all kept."""
    monkeypatch.setitem(kernels.batch_topk._state, "factor", 1)
    B, d, n, k = 6, 16, 60, 3
    x, W, b, _ = make(B, d, n, torch.float32)
    x[2] *= 10
    f_ref = R.batch_topk(*f64(x, W, b), k)
    assert (f_ref[2] > 0).sum() > 2 * k
    with kernels.use_backend(backend):
        code = kernels.batch_topk_encode(x, W, b, k)
    assert kernels.batch_topk._state["factor"] > 1
    assert torch.equal(code.to_dense(n) > 0, f_ref > 0)
    assert_close(code.to_dense(n), f_ref, torch.float32, "f")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_topk_gradients(dtype, backend):
    B, d, n, k = 7, 33, 100, 4
    x, W, b, b_dec = make(B, d, n, dtype)
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
def test_batch_topk_inference(dtype, backend):
    B, d, n = 7, 33, 100
    x, W, b, b_dec = make(B, d, n, dtype)
    with kernels.use_backend(backend):
        code = kernels.batch_topk_inference(x, W, b, 0.75, b_dec=b_dec)
        zero = kernels.batch_topk_inference(x, W, b, 0.0, b_dec=b_dec)
    z = R.preactivations(*f64(x, W, b, b_dec))
    assert_close(code.to_dense(n), z * (z > 0.75), dtype, "f")
    assert_slots(code, z > 0.75)
    assert_close(zero.to_dense(n), torch.relu(z), dtype, "f at threshold 0")


# Shared -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [T.RELU, T.JUMPRELU, T.GATED], ids=["relu", "jumprelu", "gated"])
def test_torch_backend_chunking_is_invisible(mode):
    B, d, n = 9, 10, 70
    x, W, b, _ = make(B, d, n, torch.float32)
    params = (b, 0.3 * torch.rand(n, device=DEVICE), *make_gated(n, torch.float32)[1:])
    whole = torch_ops.threshold_select(mode, x, W, *params, 0.25, n)
    chunked = torch_ops.threshold_select(mode, x, W, *params, 0.25, n, budget=32)
    for a, c in zip(whole, chunked, strict=True):  # matmul blocking may round differently
        assert torch.equal(a, c) if not a.is_floating_point() else torch.allclose(a, c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jumprelu_never_allocates_batch_by_latents(backend):
    B, d, n = 32, 12, 600  # d < B: the weight gradient [n, d] is smaller than B x n
    x, W, b, _ = make(B, d, n, torch.float32)
    theta = torch.full((n,), 2.5, device=DEVICE)
    inputs = [t.requires_grad_() for t in (x, W, b, theta)]
    with AllocationRecorder() as rec, kernels.use_backend(backend):
        if backend == "torch":
            torch_ops.threshold_select(T.JUMPRELU, x, W, b, theta, None, None, 0.05, 16, budget=1024)
        else:
            code, l0 = kernels.jumprelu_encode(*inputs, bandwidth=0.1)
            (code.values.sum() + l0.sum()).backward()
    biggest = max(rec.numels)
    assert biggest[0] < B * n, f"{biggest[1]} allocated {biggest[0]} >= B*n = {B * n} elements"


@pytest.mark.parametrize(
    "call",
    [
        lambda x, W, b, t: torch.library.opcheck(T.jumprelu_select, (x, W, b, t, 0.5, 60)),
        lambda x, W, b, t: torch.library.opcheck(T.relu_select, (x, W, b, 60)),
        lambda x, W, b, t: torch.library.opcheck(T.gated_select, (x, W, b, t, b, 60)),
    ],
    ids=["jumprelu", "relu", "gated"],
)
def test_custom_ops_pass_opcheck(call):
    x, W, b, _ = make(5, 8, 30, torch.float32)
    theta = (0.3 * torch.rand(30, device=DEVICE)).requires_grad_()
    with kernels.use_backend("torch"):
        call(x.requires_grad_(), W.requires_grad_(), b.requires_grad_(), theta)


def _bad(name):
    x, W, b, b_dec = make(7, 20, 50, torch.float32)
    theta = torch.rand(50, device=DEVICE)
    calls = {
        "bandwidth": lambda: kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.0),
        "threshold-shape": lambda: kernels.jumprelu_encode(x, W, b, theta[:-1], bandwidth=0.1),
        "threshold-type": lambda: kernels.jumprelu_encode(x, W, b, 0.5, bandwidth=0.1),
        "threshold-nan": lambda: kernels.jumprelu_encode(x, W, b, theta * float("nan"), bandwidth=0.1),
        "capacity": lambda: kernels.relu_encode(x, W, b, capacity=0),
        "W_gate": lambda: kernels.gated_encode(x, W.half(), b, theta, b),
        "b_gate": lambda: kernels.gated_encode(x, W, None, theta, b),
        "r_mag": lambda: kernels.gated_encode(x, W, b, theta[:3], b),
        "k": lambda: kernels.batch_topk_encode(x, W, b, 51),
        "inference-threshold": lambda: kernels.batch_topk_inference(x, W, b, -1.0),
        "x": lambda: kernels.relu_encode(x[0], W, b),
        "b_dec": lambda: kernels.relu_encode(x, W, b, b_dec=b_dec[:-1]),
    }
    return calls[name]


@pytest.mark.parametrize(
    "name,exc,match",
    [
        ("bandwidth", ValueError, "bandwidth must be"),
        ("threshold-shape", ValueError, r"threshold must have shape \(50,\)"),
        ("threshold-type", TypeError, "threshold must be a torch.Tensor"),
        ("threshold-nan", ValueError, "threshold contains NaN"),
        ("capacity", ValueError, "capacity must be None or an int >= 1"),
        ("W_gate", TypeError, "W_gate has dtype"),
        ("b_gate", TypeError, "b_gate must be a torch.Tensor"),
        ("r_mag", ValueError, "r_mag must have shape"),
        ("k", ValueError, "k must be an int in"),
        ("inference-threshold", ValueError, "threshold must be a finite number >= 0"),
        ("x", ValueError, "x must be 2-D"),
        ("b_dec", ValueError, "b_dec must have shape"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_bad_inputs(name, exc, match):
    with pytest.raises(exc, match=match):
        _bad(name)()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [(1000, 768, 16384), (333, 1000, 5000)], ids=case_id)
def test_gpu_large(case, dtype):
    """Large shapes: entries within rounding of the threshold may go either way; every other entry and
    every row's L0 must match. The reference starts from x - b_dec as the op rounds it (in dtype)."""
    B, d, n = case
    x, W, b, b_dec = make(B, d, n, dtype)
    theta = (0.5 + 0.2 * torch.rand(n, device=DEVICE)).to(dtype)
    code, l0 = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.01, b_dec=b_dec)
    x_c, W64, b64, theta64 = f64(x - b_dec, W, b, theta)
    z = R.preactivations(x_c, W64, b64)
    near = (z - theta64).abs() < 1e-4 * z.abs().amax()  # fp32 accumulation order vs float64
    got, ref = code.to_dense(n).double(), torch.where(z > theta64, z, 0.0)
    assert_close(got * ~near, ref * ~near, dtype, "jumprelu f away from the threshold")
    assert ((got == 0) | ((got - z).abs() <= 1e-2 * z.abs()))[near].all(), "near the threshold: 0 or z"
    assert ((l0.double() - (z > theta64).sum(1)).abs() <= near.sum(1)).all()
    code = kernels.batch_topk_encode(x, W, b, 32, b_dec=b_dec)
    assert_batch_topk(code, R.batch_topk(x_c, W64, b64, 32), R.relu(x_c, W64, b64), dtype)
