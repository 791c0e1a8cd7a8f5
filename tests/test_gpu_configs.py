"""The GPU ("default") launch configs, run through the interpreter at small shapes.

The rest of the CPU suite runs the interpreter's own tiny configs; these tests catch a GPU tile config
(BLOCK_N < KP, several splits, masked edges) that computes something else, before a GPU run does.
"""

import pytest
import torch
from helpers import assert_close, assert_topk

import kernels
from kernels import backend, tuning
from kernels import reference as R

pytestmark = pytest.mark.skipif(not backend.INTERPRET, reason="interpreter only: a GPU runs these configs anyway")


@pytest.fixture(autouse=True)
def gpu_configs(monkeypatch):
    def config(op, **shape):
        for entry in tuning._table(op)["default"]:
            if tuning._fits(entry.get("when", {}), shape):
                return dict(entry, programs=8)
        raise LookupError(op)

    monkeypatch.setattr(tuning, "config", config)


def make(B, d, n):
    return torch.randn(B, d), torch.randn(n, d) / d**0.5, 0.1 * torch.randn(n)


@pytest.mark.parametrize("B,d,n,k", [(130, 70, 700, 64), (40, 33, 1000, 128), (9, 20, 300, 200), (200, 16, 257, 7)])
def test_topk_encode_and_backward(B, d, n, k):
    x, W, b = make(B, d, n)
    inputs = [t.requires_grad_() for t in (x, W, b)]
    with kernels.use_backend("triton"):
        code = kernels.topk_encode(*inputs, k)
        out = kernels.sparse_decode(code, W)
    assert_topk(code, torch.relu(R.preactivations(x.double(), W.double(), b.double())), k, torch.float32)
    g = torch.randn_like(out)
    with kernels.use_backend("triton"):
        grads = torch.autograd.grad(out, inputs, g)
    with kernels.use_backend("torch"):
        ref = kernels.sparse_decode(kernels.topk_encode(*inputs, k), W)
        ref_grads = torch.autograd.grad(ref, inputs, g)
    assert_close(out, ref, torch.float32, "decode")
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, torch.float32, "grad")


@pytest.mark.parametrize("B,d,n", [(130, 70, 700), (7, 33, 300)])
def test_threshold_encoders(B, d, n):
    x, W, b = make(B, d, n)
    theta = torch.quantile(R.preactivations(x, W, b), 0.9, dim=0).clamp_min(0)
    r_mag, b_mag = 0.1 * torch.randn(n), 0.1 * torch.randn(n)
    runs = {}
    for name in ("triton", "torch"):
        with kernels.use_backend(name):
            runs[name] = (
                kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.01),
                kernels.gated_encode(x, W, b, r_mag, b_mag),
                kernels.relu_encode(x, W, b - 0.5),
            )
    for got, want in zip(runs["triton"], runs["torch"]):
        assert_close(got.to_dense(n), want.to_dense(n), torch.float32)


def test_tune_sweep_checks_and_times_each_config(tmp_path):
    """bench.tune (the GPU tile sweep) runs end to end: every candidate is checked, timed and reported."""
    from bench import tune

    for op in ("topk_encode", "threshold_encode"):
        doc = tune.run(op, 9, 20, 100, 5, torch.float32, "cpu")
        assert len(doc["results"]) == len(tune.INTERPRETER_CANDIDATES)
        for rec in doc["results"]:
            assert "error" not in rec, rec
            assert rec["agreement"] == 1.0 and rec["ms"] > 0 and rec["x_gemm"] > 0
        assert op in tune.table(doc)
    assert kernels.validation_enabled(), "the sweep must restore the validation switch"
