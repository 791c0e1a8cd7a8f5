"""Prefix reconstruction errors and losses (Matryoshka / Ordered) against the per-prefix reference."""

import importlib

import pytest
import torch
from conftest import BACKENDS, DEVICE
from helpers import assert_close

import kernels
from kernels import SparseCode, backend, tuning
from kernels import reference as R

# B, d, n, K; the interpreter runs K > 8 in chunks of 8 slots (configs/prefix_norms.json), B = 1 with two chunks
CASES = [(1, 8, 5, 1), (7, 24, 33, 4), (5, 130, 20, 20), (1, 9, 30, 12)]


def random_code(B, n, K, dtype, repeats=False):
    """Distinct ids per row in random slot order (repeats: the first id again in slot 1), some values zero."""
    indices = torch.stack([torch.randperm(n)[:K] for _ in range(B)]).to(torch.int32)
    if repeats:
        indices[:, 1] = indices[:, 0]
    values = torch.randn(B, K).abs() * (torch.rand(B, K) > 0.2)
    return SparseCode(values.to(DEVICE, dtype), indices.to(DEVICE))


def check_prefix(case, dtype, backend, repeats=False):
    """E and its gradients against the float64 reference -> (E, grad values, grad W, grad r0)."""
    B, d, n, K = case
    code = random_code(B, n, K, dtype, repeats)
    W = torch.randn(n, d, device=DEVICE, dtype=dtype).requires_grad_()
    r0 = torch.randn(B, d, device=DEVICE, dtype=dtype).requires_grad_()
    values = code.values.clone().requires_grad_()
    with kernels.use_backend(backend):
        E = kernels.prefix_errors(SparseCode(values, code.indices), W, r0)
    ref_in = [t.detach().double().requires_grad_() for t in (values, W, r0)]
    ref = R.prefix_errors(SparseCode(ref_in[0], code.indices), ref_in[1], ref_in[2])
    assert E.shape == (B, K + 1) and E.dtype == torch.float32
    assert_close(E, ref, dtype, "E")
    g = torch.randn(B, K + 1, device=DEVICE)
    with kernels.use_backend(backend):
        E.backward(g)
    ref.backward(g.double())
    for name, t, r in zip(("values", "W", "r0"), (values, W, r0), ref_in):
        assert_close(t.grad, r.grad, dtype, f"grad {name}")
    return E, values.grad, W.grad, r0.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-d{}-n{}-K{}".format(*c))
def test_prefix_errors_and_grads(case, dtype, backend):
    check_prefix(case, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_repeated_ids_deterministic(backend):
    """A latent twice in a row (two slots of one bucket from one row); a second run gives the same bits."""
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(check_prefix((5, 40, 20, 12), torch.float32, backend, repeats=True))
    assert all(torch.equal(a, b) for a, b in zip(*runs)), "bitwise reproducible"


@pytest.mark.skipif(not backend.INTERPRET, reason="interpreter only: a GPU runs these configs anyway")
def test_prefix_gpu_config(monkeypatch):
    """The GPU config through the interpreter: one [64, 32] tile of slots per step, two splits of d, masked
    slots and columns."""
    monkeypatch.setattr(tuning, "_device_key", lambda op: "default")
    check_prefix((3, 40, 50, 40), torch.float32, "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_backward_in_row_chunks(backend, monkeypatch):
    """Budgets of a few rows: the W gradient is summed over several row chunks."""
    prefix = importlib.import_module("kernels.prefix")
    monkeypatch.setattr(prefix, "BUDGET", 3 * 5 * 24)
    monkeypatch.setattr(prefix, "CUDA_BUDGET", 3 * 5 * 24)
    check_prefix((7, 24, 33, 4), torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["matryoshka", "ordered"])
def test_prefix_losses_match_per_prefix_reference(kind, backend):
    B, d, n, K = 6, 20, 36, 7
    code = random_code(B, n, K, torch.float32)
    W = torch.randn(n, d, device=DEVICE, requires_grad=True)
    b = torch.randn(d, device=DEVICE, requires_grad=True)
    y = torch.randn(B, d, device=DEVICE, requires_grad=True)
    weights = torch.zeros(n, device=DEVICE)
    if kind == "matryoshka":
        weights[[3, 11, 35]] = torch.tensor([0.5, 0.3, 0.2], device=DEVICE)
    else:
        weights = torch.rand(n, device=DEVICE)
    values = code.values.clone().requires_grad_()
    with kernels.use_backend(backend):
        out = kernels.prefix_losses(SparseCode(values, code.indices), W, b, y, weights)
        out.sum().backward()
    ref_in = [t.detach().double().requires_grad_() for t in (values, W, b, y)]
    ref = R.prefix_losses(SparseCode(ref_in[0], code.indices), ref_in[1], ref_in[2], ref_in[3], weights.double())
    ref.sum().backward()
    assert_close(out, ref, torch.float32, "loss")
    for name, t, r in zip(("values", "W_dec", "b_dec", "target"), (values, W, b, y), ref_in):
        assert_close(t.grad, r.grad, torch.float32, f"grad {name}")


def test_prefix_errors_bad_inputs():
    code = random_code(3, 10, 2, torch.float32)
    W = torch.randn(10, 4, device=DEVICE)
    with pytest.raises(ValueError, match="r0 must have 3 rows"):
        kernels.prefix_errors(code, W, torch.randn(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="r0 must have 4 columns"):
        kernels.prefix_errors(code, W, torch.randn(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="prefix_weights must be a tensor of shape"):
        kernels.prefix_losses(code, W, None, torch.randn(3, 4, device=DEVICE), torch.ones(9))


def test_prefix_errors_compile_traces():
    code = random_code(4, 12, 3, torch.float32)
    W = torch.randn(12, 8, requires_grad=True)
    r0 = torch.randn(4, 8)
    ids = code.indices.cpu()
    fn = torch.compile(lambda v, W, r0: kernels.prefix_errors(SparseCode(v, ids), W, r0).sum(), fullgraph=True,
                       backend="aot_eager")  # fmt: skip
    with kernels.use_backend("torch"):
        fn(code.values.cpu(), W, r0).backward()
    assert W.grad is not None and torch.isfinite(W.grad).all()
