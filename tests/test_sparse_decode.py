import pytest
import torch
from conftest import BACKENDS, DEVICE
from helpers import assert_close, f64, make_encoder, make_gated

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


def _encoders(x, W, b, b_dec):
    """name -> (encode(x, W, b, b_dec), its dense float64 reference f [B, n])."""
    n, k = W.shape[0], 4
    theta = 0.3 * torch.rand(n, device=DEVICE)
    b_gate, r_mag, b_mag = make_gated(n)
    x64, W64, b64, bd64, t64, bg64, r64, bm64 = f64(x, W, b, b_dec, theta, b_gate, r_mag, b_mag)
    z = R.preactivations(x64, W64, b64, bd64)
    top = torch.zeros_like(z).scatter(1, R.topk_indices(torch.relu(z), k), 1.0)
    return {
        "topk": (lambda: kernels.topk_encode(x, W, b, k, b_dec=b_dec), torch.relu(z) * top),
        "batch_topk": (
            lambda: kernels.batch_topk_encode(x, W, b, k, b_dec=b_dec),
            R.batch_topk(x64, W64, b64, k, b_dec=bd64),
        ),
        "batch_topk_inference": (lambda: kernels.batch_topk_inference(x, W, b, 0.2, b_dec=b_dec), z * (z > 0.2)),
        "relu": (lambda: kernels.relu_encode(x, W, b - 0.5, b_dec=b_dec), R.relu(x64, W64, b64 - 0.5, b_dec=bd64)),
        "relu_dense": (lambda: kernels.relu_encode(x, W, b + 2, b_dec=b_dec), R.relu(x64, W64, b64 + 2, b_dec=bd64)),
        "jumprelu": (
            lambda: kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.05, b_dec=b_dec),
            R.jumprelu(x64, W64, b64, t64, 0.05, b_dec=bd64)[0],
        ),
        "gated": (
            lambda: kernels.gated_encode(x, W, b_gate, r_mag, b_mag, b_dec=b_dec),
            R.gated(x64, W64, bg64, r64, bm64, b_dec=bd64)[0],
        ),
    }


ENCODERS = ["topk", "batch_topk", "batch_topk_inference", "relu", "relu_dense", "jumprelu", "gated"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ENCODERS)
def test_every_code_composes(name, backend):
    """Whatever an encoder returns goes straight into sparse_decode and to_dense, and equals the float64
    dense reference there; gradients flow from the decode back to the encoder."""
    B, d, n = 7, 20, 50
    x, W, b, b_dec = make_encoder(B, d, n)
    W_dec = torch.randn(n, d, device=DEVICE)
    encode, f_ref = _encoders(x, W.requires_grad_(), b, b_dec)[name]
    with kernels.use_backend(backend):
        code = encode()
        x_hat = kernels.sparse_decode(code, W_dec, b_dec)
    assert isinstance(code, kernels.SparseCode) and code.k == code.values.shape[1] == code.indices.shape[1]
    assert_close(code.to_dense(n), f_ref, torch.float32, "to_dense")
    assert_close(x_hat, f_ref @ W_dec.double() + b_dec.double(), torch.float32, "sparse_decode")
    (grad,) = torch.autograd.grad(x_hat.sum(), W)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gated_gate_decodes_as_a_code():
    x, W, _, _ = make_encoder(5, 12, 30)
    b_gate, r_mag, b_mag = make_gated(30)
    code = kernels.gated_encode(x, W, b_gate, r_mag, b_mag)
    W_dec = torch.randn(30, 12, device=DEVICE)
    _, pi_g = R.gated(*f64(x, W, b_gate, r_mag, b_mag))
    out = kernels.sparse_decode(kernels.SparseCode(code.gate, code.indices), W_dec)
    assert_close(out, pi_g @ W_dec.double(), torch.float32, "gate decode")


@pytest.mark.parametrize("bad", ["tuple", "tensor", "dict"])
def test_wrong_code_type_says_what_to_pass(bad):
    code, W, _ = make(7, 5, 40, 33, torch.float32)
    value = {"tuple": (code.values, code.indices), "tensor": code.values, "dict": {"values": code.values}}[bad]
    with pytest.raises(TypeError, match=r"code must be a kernels.SparseCode \(what every encoder returns"):
        kernels.sparse_decode(value, W)
    with pytest.raises(TypeError, match="code must be a kernels.SparseCode"):
        kernels.prefix_errors(value, W, torch.randn(7, 33, device=DEVICE))


def test_codes_are_pytrees_not_tuples():
    """Fields by name; torch.utils._pytree sees every tensor (torch.compile and export)."""
    import torch.utils._pytree as pytree

    v, i, l0 = torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.int32), torch.ones(2)
    code = kernels.JumpReLUCode(v, i, l0)
    leaves, spec = pytree.tree_flatten(code)
    assert len(leaves) == 3 and leaves[2] is l0
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert type(rebuilt) is kernels.JumpReLUCode and rebuilt.l0 is l0
    with pytest.raises(TypeError):
        values, indices = kernels.SparseCode(v, i)


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
