import pytest
import torch
from conftest import BACKENDS, DEVICE
from helpers import assert_close

import kernels
from kernels import SparseCode
from kernels import reference as R

# (B, K, n, d), with repeated ids in a row (padded codes repeat id 0 with value 0).
SHAPES = [(1, 1, 5, 7), (7, 5, 40, 33), (33, 8, 19, 20), (4, 16, 16, 48)]
DTYPES = [torch.float32, torch.float16]


def make(B, K, n, d, dtype):
    values = torch.randn(B, K, device=DEVICE).to(dtype)
    indices = torch.randint(0, n, (B, K), device=DEVICE, dtype=torch.int32)
    indices[:, -1] = 0  # an empty slot
    values[:, -1] = 0
    W = torch.randn(n, d, device=DEVICE).to(dtype)
    b = torch.randn(d, device=DEVICE).to(dtype)
    return SparseCode(values, indices), W, b


def case_id(case):
    return "B{}-K{}-n{}-d{}".format(*case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SHAPES, ids=case_id)
def test_decode_and_gradients(case, dtype, backend):
    code, W, b = make(*case, dtype)
    values, W, b = (t.requires_grad_() for t in (code.values, W, b))
    with kernels.use_backend(backend):
        out = kernels.sparse_decode(SparseCode(values, code.indices), W, b)
    assert out.dtype == dtype and out.shape == (case[0], case[3])
    ref_in = [t.detach().double().requires_grad_() for t in (values, W, b)]
    ref = R.sparse_decode(SparseCode(ref_in[0], code.indices), ref_in[1], ref_in[2])
    assert_close(out, ref, dtype, "decode")

    g = torch.randn_like(out)
    with kernels.use_backend(backend):
        grads = torch.autograd.grad(out, (values, W, b), g)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    for name, got, want in zip(("values", "W_dec", "b_dec"), grads, ref_grads):
        assert got.dtype == dtype
        assert_close(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_without_bias(backend):
    code, W, _ = make(7, 5, 40, 33, torch.float32)
    with kernels.use_backend(backend):
        out = kernels.sparse_decode(code, W)
    assert_close(out, R.sparse_decode(SparseCode(code.values.double(), code.indices), W.double()), torch.float32)


def test_sparse_code_to_dense():
    code, _, _ = make(7, 5, 40, 33, torch.float32)
    dense = code.to_dense(40)
    ref = torch.zeros(7, 40, device=DEVICE)
    for b in range(7):
        for v, i in zip(code.values[b].tolist(), code.indices[b].tolist()):
            ref[b, i] += v  # repeated ids add up
    assert torch.allclose(dense, ref)
    with pytest.raises(ValueError, match="n=3"):
        code.to_dense(3)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(indices=a["indices"].float()), TypeError, "code.indices must be int32 or int64"),
        (lambda a: a.update(indices=a["indices"][:, :-1]), ValueError, "code.indices must have shape"),
        (lambda a: a["indices"].__setitem__((0, 0), 40), ValueError, r"code.indices must lie in \[0, 40\)"),
        (lambda a: a.update(values=a["values"].half()), TypeError, "code.values has dtype"),
        (lambda a: a.update(W=a["W"][None]), ValueError, "W_dec must be 2-D"),
        (lambda a: a.update(b=a["b"][:-1]), ValueError, "b_dec must have shape"),
    ],
)
def test_bad_inputs(mutate, exc, match):
    code, W, b = make(7, 5, 40, 33, torch.float32)
    args = {"values": code.values, "indices": code.indices, "W": W, "b": b}
    mutate(args)
    with pytest.raises(exc, match=match):
        kernels.sparse_decode(SparseCode(args["values"], args["indices"]), args["W"], args["b"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_large(dtype):
    code, W, b = make(4096, 64, 131072, 2304, dtype)
    values, W = (t.requires_grad_() for t in (code.values, W))
    out = kernels.sparse_decode(SparseCode(values, code.indices), W, b)
    ref_in = [t.detach().double().requires_grad_() for t in (values, W)]
    ref = R.sparse_decode(SparseCode(ref_in[0], code.indices), ref_in[1], b.double())
    assert_close(out, ref, dtype, "decode")
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (values, W), g), torch.autograd.grad(ref, ref_in, g.double())):
        assert_close(got, want, dtype, "grad")
