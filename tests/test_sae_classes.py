"""Every SAE class: forward against its float64 reference, loss parts, AuxK, folding, normalisation, moves."""

import inspect

import pytest
import torch
from conftest import BACKENDS, DEVICE
from helpers import assert_close

import kernels
import sae
from kernels import reference as R

D, N, K = 20, 44, 4


def make(name, **kw):
    models = {
        "topk": lambda: sae.TopKSAE(D, N, K, **kw),
        "batchtopk": lambda: sae.BatchTopKSAE(D, N, K, **kw),
        "relu": lambda: sae.ReLUSAE(D, N, **kw),
        "jumprelu": lambda: sae.JumpReLUSAE(D, N, **kw),
        "gated": lambda: sae.GatedSAE(D, N, **kw),
        "matryoshka": lambda: sae.MatryoshkaSAE(D, N, K, prefixes=[5, 17, N], prefix_weights=[0.2, 0.3, 0.5], **kw),
        "ordered": lambda: sae.OrderedSAE(D, N, K, **kw),
    }
    model = models[name]().to(DEVICE)
    with torch.no_grad():  # random biases and thresholds, so every term matters
        for pname, p in model.named_parameters():
            if pname.startswith("b_") or pname == "r_mag":
                p.normal_(0, 0.3)
        if name == "jumprelu":
            model.threshold.uniform_(0.1, 0.6)
    return model


def reference_forward(model, x):
    """float64 forward from the model's parameters and the math of DESIGN section 5."""
    p = {k: v.detach().double() for k, v in model.named_parameters()}
    x = x.double().reshape(-1, model.d_in)
    scale, shift = torch.ones(()), torch.zeros(())
    if model.normalize_activations == "layer_norm":
        shift = x.mean(-1, keepdim=True)
        scale = (x - shift).std(-1, keepdim=True) + 1e-5
        scale, x = (x - shift).std(-1, keepdim=True), (x - shift) / scale
    c = p["b_dec"] if model.apply_b_dec_to_input else None
    if isinstance(model, sae.BatchTopKSAE):
        if model.training or model.threshold < 0:
            f = R.batch_topk(x, p["W_enc"], p["b_enc"], model.k, b_dec=c)
        else:
            z = R.preactivations(x, p["W_enc"], p["b_enc"], c)
            f = z * (z > float(model.threshold))
    elif isinstance(model, sae.TopKSAE):
        f = R.topk_encode(x, p["W_enc"], p["b_enc"], model.k, b_dec=c).to_dense(model.d_sae)
    elif isinstance(model, sae.ReLUSAE):
        f = R.relu(x, p["W_enc"], p["b_enc"], b_dec=c)
    elif isinstance(model, sae.JumpReLUSAE):
        f = R.jumprelu(x, p["W_enc"], p["b_enc"], p["threshold"], 0.001, b_dec=c)[0]
    else:
        f = R.gated(x, p["W_enc"], p["b_gate"], p["r_mag"], p["b_mag"], b_dec=c)[0]
    out = f @ p["W_dec"] + p["b_dec"]
    if "W_skip" in p:
        out = out + x @ p["W_skip"].T
    return out * scale + shift, f


NAMES = ["topk", "batchtopk", "relu", "jumprelu", "gated", "matryoshka", "ordered"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_reference(name, backend):
    model = make(name)
    x = torch.randn(3, 5, D, device=DEVICE)
    with kernels.use_backend(backend):
        x_hat = model(x)
        dense = model.encode(x)
    ref, f = reference_forward(model, x)
    assert x_hat.shape == x.shape and dense.shape == (3, 5, N)
    assert_close(x_hat.reshape(-1, D), ref, torch.float32, "x_hat")
    assert_close(dense.reshape(-1, N), f, torch.float32, "features")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchtopk_threshold_ema_and_inference(backend):
    model = make("batchtopk", threshold_beta=0.5)
    x = torch.randn(16, D, device=DEVICE)
    model.eval()
    with kernels.use_backend(backend):
        no_threshold = model.encode(x)  # no threshold learned yet: selects per batch
        model.train()
        code = model.encode_sparse(x)
        first = code.values[code.values > 0].min()
        assert torch.allclose(model.threshold, first)
        model.encode_sparse(x[:8])
        code = model.encode_sparse(x[:8])
        model.eval()
        x_hat = model(x)
    assert 0 < float(model.threshold)
    assert_close(no_threshold, make_dense_batchtopk(model, x), torch.float32, "per batch")
    assert_close(x_hat, reference_forward(model, x)[0], torch.float32, "inference x_hat")


def make_dense_batchtopk(model, x):
    p = {k: v.detach().double() for k, v in model.named_parameters()}
    return R.batch_topk(x.double(), p["W_enc"], p["b_enc"], model.k, b_dec=p["b_dec"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_loss_parts_and_gradients(name, backend):
    model = make(name)
    x = torch.randn(12, D, device=DEVICE)
    dead = torch.zeros(N, dtype=torch.bool, device=DEVICE)
    dead[::3] = True
    kw = {"dead_mask": dead} if isinstance(model, sae.TopKSAE) else {}
    model.train()
    with kernels.use_backend(backend):
        parts = model.loss(x, **kw)
        parts["loss"].backward()
    # float64 reference of every part
    ref = {k: v.detach().double().requires_grad_() for k, v in model.named_parameters()}
    xd = x.double()
    with torch.no_grad():
        for t in model.parameters():
            assert t.grad is not None and torch.isfinite(t.grad).all()
    x_hat, f = reference_forward(model, x)
    err = (x_hat - xd).pow(2).sum(-1)
    assert_close(parts["mse"], err.mean(), torch.float32, "mse")
    assert_close(parts["fvu"], err.sum() / (xd - xd.mean(0)).pow(2).sum(), torch.float32, "fvu")
    W_dec = ref["W_dec"].detach()
    if name == "relu":
        pen = (f * W_dec.norm(dim=1)).sum(-1).mean()
        assert_close(parts["penalty"], pen, torch.float32, "penalty")
        assert_close(parts["loss"], err.mean() + model.l1_coeff * pen, torch.float32, "loss")
    if name == "jumprelu":
        assert_close(parts["l0"], (f != 0).sum(-1).double().mean(), torch.float32, "l0")
    if name == "gated":
        gate = R.gated(xd, ref["W_enc"], ref["b_gate"], ref["r_mag"], ref["b_mag"], b_dec=ref["b_dec"])[1].detach()
        assert_close(parts["l1"], gate.sum(-1).mean(), torch.float32, "l1")
        aux = (gate @ W_dec + ref["b_dec"].detach() - xd).pow(2).sum(-1).mean()
        assert_close(parts["aux"], aux, torch.float32, "aux")
    if name in ("matryoshka", "ordered"):
        weights = model._size_weights().double()
        code = kernels.SparseCode(f, torch.arange(N).expand(12, N))
        pl = R.prefix_losses(code, W_dec, ref["b_dec"].detach(), xd, weights).mean()
        assert_close(parts["prefix"], pl, torch.float32, "prefix")
    if "aux" in parts and name != "gated":
        p = {k: v.detach() for k, v in ref.items()}
        z = R.preactivations(xd, p["W_enc"], p["b_enc"], p["b_dec"])
        z = torch.where(dead, z.relu(), -1.0)
        k_aux = min(model.aux_k, int(dead.sum()))
        idx = R.topk_indices(z, k_aux)
        e_hat = z.gather(1, idx).unsqueeze(-1).mul(p["W_dec"][idx]).sum(1)
        if name in ("matryoshka", "ordered"):
            x_hat = f @ p["W_dec"] + p["b_dec"]
        e = xd - x_hat
        aux = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
        assert_close(parts["aux"], aux, torch.float32, "aux")


def test_aux_without_dead_latents_is_zero():
    model = make("topk")
    parts = model.loss(torch.randn(6, D, device=DEVICE), dead_mask=torch.zeros(N, dtype=torch.bool, device=DEVICE))
    assert float(parts["aux"]) == 0.0
    with pytest.raises(ValueError, match="dead_mask must be"):
        model.loss(torch.randn(6, D, device=DEVICE), dead_mask=torch.zeros(3, dtype=torch.bool, device=DEVICE))


def test_relu_penalty_exponent_and_dense_decode():
    model = make("relu")
    x = torch.randn(10, D, device=DEVICE)
    code = model.encode_sparse(x)
    assert code.k == N  # at init most latents fire: the dense layout, decoded by a matmul
    f = reference_forward(model, x)[1]
    norms = model.W_dec.detach().double().norm(dim=1)
    for p in (1.0, 0.5):
        assert_close(model.penalty(code, p), (f.pow(p) * norms).sum(-1).mean(), torch.float32, f"p={p}")
    model.p = 0.5
    model.loss(x)["loss"].backward()
    assert torch.isfinite(model.W_enc.grad).all()


@pytest.mark.parametrize("name", ["relu", "jumprelu", "gated"])
def test_fold_decoder_norms_keeps_outputs(name):
    model = make(name)
    with torch.no_grad():
        model.W_dec.mul_(torch.rand(N, 1, device=DEVICE) * 2 + 0.1)
        model.W_dec[3] = 0  # a dead latent
    x = torch.randn(9, D, device=DEVICE)
    before = model(x)
    model.fold_decoder_norms()
    norms = model.W_dec.norm(dim=1)
    assert norms[3] == 0 and torch.allclose(
        norms[torch.arange(N, device=DEVICE) != 3], torch.ones(N - 1, device=DEVICE)
    )
    assert_close(model(x), before, torch.float32, "x_hat after folding")


def test_normalisation_act_scale_and_fold():
    model = make("topk", normalize_activations="layer_norm")
    x = torch.randn(7, D, device=DEVICE) * 3 + 1
    assert_close(model(x), reference_forward(model, x)[0], torch.float32, "layer_norm")
    model = make("relu", act_scale=2.5)
    before = model(x)
    model.fold_act_scale()
    assert model.act_scale == 1.0
    assert_close(model(x), before, torch.float32, "fold_act_scale")
    with pytest.raises(ValueError, match="normalize_activations must be one of"):
        sae.ReLUSAE(D, N, normalize_activations="batch")


def test_transcoder_with_skip():
    model = sae.TopKSAE(D, N, K, d_out=12, skip=True)
    with torch.no_grad():
        model.W_skip.normal_()
        model.b_dec.normal_()
    assert not model.apply_b_dec_to_input and model.W_dec.shape == (N, 12)
    x, y = torch.randn(5, D), torch.randn(5, 12)
    out = model(x)
    assert out.shape == (5, 12)
    assert_close(out, reference_forward(model, x)[0], torch.float32, "transcoder")
    parts = model.loss(x, target=y)
    assert_close(parts["mse"], (out - y).pow(2).sum(-1).mean(), torch.float32, "transcoder mse")
    with pytest.raises(ValueError, match="needs a target"):
        model.loss(x)
    with pytest.raises(ValueError, match="apply_b_dec_to_input needs d_out == d_in"):
        sae.ReLUSAE(D, N, d_out=12, apply_b_dec_to_input=True)


def test_dtype_and_device_moves():
    model = make("jumprelu").to(torch.float16)
    assert model.dtype == torch.float16 and model.threshold.dtype == torch.float16
    x = torch.randn(4, D, device=DEVICE)
    out = model(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.to("cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="last dimension d_in=20"):
        model(torch.randn(3, 7, device=DEVICE))


@pytest.mark.parametrize("name", ["relu", "jumprelu", "gated", "batchtopk"])
def test_hints_change_speed_not_results(name):
    """Each model owns its EncodeHints (never saved): a warm model gives what a fresh copy gives."""
    from sae.registry import ARCHITECTURES

    cls = ARCHITECTURES[name]
    model = cls(12, 40, **({"k": 4} if "k" in inspect.signature(cls).parameters else {})).eval()
    x = torch.randn(9, 12)
    with torch.no_grad():
        first = model(x)
        warm = model(x)
        model.hints = kernels.EncodeHints()
        fresh = model(x)
    assert torch.equal(first, warm) and torch.equal(warm, fresh)
    assert "hints" not in model.config() and "hints" not in dict(model.named_buffers())
