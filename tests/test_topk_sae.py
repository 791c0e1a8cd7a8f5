import pytest
import torch
from conftest import BACKENDS, DEVICE
from helpers import assert_close

import kernels
import sae
from kernels import reference as R


def reference_forward(model, x):
    """float64 TopK SAE forward from the model's parameters."""
    p = {k: v.detach().double() for k, v in model.named_parameters()}
    x = x.double().reshape(-1, model.d_in)
    code = R.topk_encode(x, p["W_enc"], p["b_enc"], model.k, b_dec=p["b_dec"])
    return R.sparse_decode(code, p["W_dec"], p["b_dec"])


def test_init():
    model = sae.TopKSAE(24, 80, 4, device=DEVICE)
    assert model.W_enc.shape == model.W_dec.shape == (80, 24)
    assert torch.allclose(model.W_dec.norm(dim=1), torch.ones(80, device=DEVICE))
    assert torch.equal(model.W_enc, model.W_dec)
    assert (model.b_enc == 0).all() and (model.b_dec == 0).all()
    with pytest.raises(ValueError, match="k must be an int in"):
        sae.TopKSAE(24, 80, 81)
    with pytest.raises(ValueError, match="d_sae must be a positive int"):
        sae.TopKSAE(24, 0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_encode(backend):
    model = sae.TopKSAE(24, 80, 5, device=DEVICE)
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_(0, 0.1)
    x = torch.randn(3, 5, 24, device=DEVICE)
    with kernels.use_backend(backend):
        x_hat = model(x)
        dense = model.encode(x)
        code = model.encode_sparse(x)
        with pytest.raises(ValueError, match="last dimension d_in=24"):
            model(torch.randn(3, 23, device=DEVICE))
    assert x_hat.shape == x.shape
    assert_close(x_hat.reshape(-1, 24), reference_forward(model, x), torch.float32, "x_hat")
    assert dense.shape == (3, 5, 80)
    assert ((dense != 0).sum(-1) <= 5).all()
    assert torch.equal(dense.reshape(15, 80), code.to_dense(80))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_training_step(backend):
    model = sae.TopKSAE(16, 64, 4, device=DEVICE)
    x = torch.randn(64, 16, device=DEVICE) @ torch.randn(16, 16, device=DEVICE)
    with kernels.use_backend(backend):
        parts = model.loss(x)
        x_hat = model(x)
    err = (x - x_hat).pow(2).sum(-1)
    assert torch.allclose(parts["mse"], err.mean(), rtol=1e-5)
    assert torch.allclose(parts["fvu"], err.sum() / (x - x.mean(0)).pow(2).sum(), rtol=1e-5)
    assert parts["l0"].item() <= 4
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    with kernels.use_backend(backend):
        for _ in range(30):
            loss = model.loss(x)["loss"]
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert loss.item() < 0.7 * first


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_forward_backward_without_graph_breaks(compiler):
    """fullgraph=True fails on any graph break; AOT autograd traces the backward through the fake impls."""
    model = sae.TopKSAE(16, 48, 4)
    x = torch.randn(8, 16)
    loss_fn = lambda x: model.loss(x)["loss"]

    eager = loss_fn(x)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)
    with kernels.use_backend("torch"):
        got = compiled(x)
        got.backward()
    assert torch.allclose(got, eager, rtol=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)
