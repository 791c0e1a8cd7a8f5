"""Every public format: files written here from the documented layouts (no downloads), loaded by sae.load,
outputs equal to a float64 reference of that library's forward pass (its centering and normalisation)."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import assert_close

import sae

st = pytest.importorskip("safetensors.torch")

D, N, K = 12, 40, 5


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float32)


def topk_dense(z, k):
    """The libraries' TopK: top k of z, then ReLU on the kept values."""
    top = z.topk(k, dim=-1)
    return torch.zeros_like(z).scatter(-1, top.indices, top.values.relu())


def layer_norm(x):
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    return (x - mu) / (std + 1e-5), mu, std


def check(model, x, ref, what):
    with torch.no_grad():
        out = model(x)
    assert_close(out, ref, torch.float32, what)


# SAELens ---------------------------------------------------------------------------------------------


def saelens_reference(cfg, t, x):
    t = {k: v.double() for k, v in t.items()}
    x = x.double()
    norm = cfg["normalize_activations"]
    if norm == "layer_norm":
        x, mu, std = layer_norm(x)
    elif norm == "constant_norm_rescale":
        coeff = D**0.5 / x.norm(dim=-1, keepdim=True)
        x = x * coeff
    x_in = x - t["b_dec"] * cfg["apply_b_dec_to_input"]
    arch = cfg["architecture"]
    if arch == "gated":
        gate = x_in @ t["W_enc"] + t["b_gate"]
        mag = x_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]
        f = (gate > 0) * mag.relu()
    else:
        z = x_in @ t["W_enc"] + t["b_enc"]
        if arch == "standard":
            f = z.relu()
        elif arch == "topk":
            f = topk_dense(z, cfg["k"])
        else:
            f = z.relu() * (z > t["threshold"])
    out = f @ t["W_dec"] + t["b_dec"]
    if norm == "layer_norm":
        out = out * std + mu
    elif norm == "constant_norm_rescale":
        out = out / coeff
    return out


SAELENS_CASES = [
    ("standard", True, "none"),
    ("topk", True, "layer_norm"),
    ("jumprelu", False, "none"),
    ("jumprelu", True, "constant_norm_rescale"),
    ("gated", True, "none"),
]


@pytest.mark.parametrize("case", SAELENS_CASES, ids=lambda c: "-".join(map(str, c)))
def test_saelens_load(tmp_path, case):
    arch, centre, norm = case
    t = {"W_enc": rand(D, N) * 0.5, "W_dec": rand(N, D), "b_dec": rand(D)}
    if arch == "gated":
        t |= {"b_gate": rand(N) * 0.3, "b_mag": rand(N) * 0.3, "r_mag": rand(N) * 0.3}
    else:
        t["b_enc"] = rand(N) * 0.3
    if arch == "jumprelu":
        t["threshold"] = torch.rand(N) * 0.5 - 0.1  # a few below zero
    cfg = {"architecture": arch, "d_in": D, "d_sae": N, "dtype": "float32", "apply_b_dec_to_input": centre,
           "normalize_activations": norm, "k": K}  # fmt: skip
    st.save_file(t, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    model = sae.load(tmp_path)
    expected = {"standard": sae.ReLUSAE, "topk": sae.TopKSAE, "jumprelu": sae.JumpReLUSAE, "gated": sae.GatedSAE}
    assert type(model) is expected[arch] and not model.training
    x = rand(9, D) * 2
    check(model, x, saelens_reference(cfg, t, x), f"SAELens {arch}")


@pytest.mark.parametrize("name", ["topk", "relu", "jumprelu", "gated", "transcoder"])
def test_saelens_save_round_trip_is_bit_identical(tmp_path, name):
    model = {
        "topk": lambda: sae.TopKSAE(D, N, K, normalize_activations="layer_norm"),
        "relu": lambda: sae.ReLUSAE(D, N, dtype=torch.bfloat16, l1_coeff=3.0),
        "jumprelu": lambda: sae.JumpReLUSAE(D, N, apply_b_dec_to_input=False, bandwidth=0.05),
        "gated": lambda: sae.GatedSAE(D, N),
        "transcoder": lambda: sae.ReLUSAE(D, N, d_out=7, skip=True),
    }[name]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p).abs() * 0.1)  # JumpReLU thresholds stay >= 0
    model.save(tmp_path / "m")
    model.save(tmp_path / "m")  # overwrite in place
    assert sorted(os.listdir(tmp_path / "m")) == ["cfg.json", "sae_weights.safetensors"]  # no temporaries left
    loaded = sae.load(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config() == model.config()
    a, b = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x = rand(6, D)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_batchtopk_saves_as_jumprelu(tmp_path):
    model = sae.BatchTopKSAE(D, N, K)
    with pytest.raises(ValueError, match="not learned yet"):
        model.save(tmp_path / "m")
    model.train()
    model.encode_sparse(rand(32, D))
    model.eval()
    model.save(tmp_path / "m")
    loaded = sae.load(tmp_path / "m")
    assert type(loaded) is sae.JumpReLUSAE
    assert json.loads((tmp_path / "m" / "cfg.json").read_text())["architecture"] == "jumprelu"
    x = rand(20, D)
    with torch.no_grad():
        assert_close(loaded(x), model(x), torch.float32, "BatchTopK inference as JumpReLU")


def test_save_folds_act_scale(tmp_path):
    model = sae.ReLUSAE(D, N, act_scale=3.0)
    model.save(tmp_path / "m")
    loaded = sae.load(tmp_path / "m")
    assert loaded.act_scale == 1.0 and model.act_scale == 3.0
    x = rand(5, D)
    with torch.no_grad():
        assert_close(loaded(x), model(x), torch.float32, "folded act_scale")


# sparsify --------------------------------------------------------------------------------------------


def write_sparsify(folder, transcode=False, skip=False):
    folder.mkdir(parents=True)
    t = {"encoder.weight": rand(N, D) * 0.5, "encoder.bias": rand(N) * 0.3, "W_dec": rand(N, D), "b_dec": rand(D)}
    if skip:
        t["W_skip"] = rand(D, D) * 0.1
    st.save_file(t, str(folder / "sae.safetensors"))
    cfg = {"expansion_factor": 32, "normalize_decoder": True, "num_latents": N, "k": K, "multi_topk": False,
           "skip_connection": skip, "transcode": transcode, "d_in": D}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return t


def sparsify_reference(t, x, transcode):
    t = {k: v.double() for k, v in t.items()}
    x = x.double()
    x_in = x if transcode else x - t["b_dec"]
    pre = (x_in @ t["encoder.weight"].T + t["encoder.bias"]).relu()
    top = pre.topk(K, dim=-1)
    out = (top.values.unsqueeze(-1) * t["W_dec"][top.indices]).sum(1) + t["b_dec"]
    return out + x @ t["W_skip"].T if "W_skip" in t else out


def test_sparsify_hookpoints(tmp_path):
    t_a = write_sparsify(tmp_path / "layers.3")
    t_b = write_sparsify(tmp_path / "layers.5.mlp", transcode=True, skip=True)
    models = sae.load(tmp_path)
    assert sorted(models) == ["layers.3", "layers.5.mlp"]
    x = rand(8, D)
    check(models["layers.3"], x, sparsify_reference(t_a, x, False), "sparsify")
    one = sae.load(tmp_path, hookpoint="layers.5.mlp")
    assert isinstance(one, sae.TopKSAE) and one.W_skip is not None and not one.apply_b_dec_to_input
    check(one, x, sparsify_reference(t_b, x, True), "sparsify transcoder with skip")


# dictionary_learning ---------------------------------------------------------------------------------


def dl_files(dict_class):
    """(state dict, trainer config, float64 forward) for a dictionary_learning class."""
    lin = {"encoder.weight": rand(N, D) * 0.5, "decoder.weight": rand(D, N)}
    cfg = {"dict_class": dict_class, "activation_dim": D, "dict_size": N}
    if dict_class == "AutoEncoder":
        sd = lin | {"encoder.bias": rand(N) * 0.3, "bias": rand(D)}

        def fwd(p, x):
            return (p["encoder.weight"] @ (x - p["bias"]).T).T.add(p["encoder.bias"]).relu() @ p[
                "decoder.weight"
            ].T + p["bias"]
    elif dict_class == "GatedAutoEncoder":
        sd = lin | {
            "decoder_bias": rand(D),
            "r_mag": rand(N) * 0.3,
            "gate_bias": rand(N) * 0.3,
            "mag_bias": rand(N) * 0.3,
        }

        def fwd(p, x):
            x_enc = (x - p["decoder_bias"]) @ p["encoder.weight"].T
            f = (x_enc + p["gate_bias"] > 0) * (p["r_mag"].exp() * x_enc + p["mag_bias"]).relu()
            return f @ p["decoder.weight"].T + p["decoder_bias"]
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        sd = lin | {"encoder.bias": rand(N) * 0.3, "b_dec": rand(D), "k": torch.tensor(K, dtype=torch.int),
                    "threshold": torch.tensor(0.4)}  # fmt: skip

        def fwd(p, x):
            post = ((x - p["b_dec"]) @ p["encoder.weight"].T + p["encoder.bias"]).relu()
            f = topk_dense(post, K) if dict_class == "AutoEncoderTopK" else post * (post > p["threshold"])
            return f @ p["decoder.weight"].T + p["b_dec"]
    elif dict_class == "JumpReluAutoEncoder":
        sd = {"W_enc": rand(D, N) * 0.5, "b_enc": rand(N) * 0.3, "W_dec": rand(N, D), "b_dec": rand(D),
              "threshold": torch.rand(N) * 0.5}  # fmt: skip

        def fwd(p, x):  # apply_b_dec_to_input is False in the library
            pre = x @ p["W_enc"] + p["b_enc"]
            return (pre * (pre > p["threshold"])).relu() @ p["W_dec"] + p["b_dec"]
    else:  # MatryoshkaBatchTopKSAE
        sd = {"W_enc": rand(D, N) * 0.5, "b_enc": rand(N) * 0.3, "W_dec": rand(N, D), "b_dec": rand(D),
              "k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.3),
              "group_sizes": torch.tensor([8, 12, 20])}  # fmt: skip
        cfg["group_weights"] = [0.5, 0.25, 0.25]

        def fwd(p, x):
            post = ((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).relu()
            return (post * (post > p["threshold"])) @ p["W_dec"] + p["b_dec"]

    return sd, {"trainer": cfg, "buffer": {"d_submodule": D}}, fwd


DL_CLASSES = ["AutoEncoder", "GatedAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder",
              "MatryoshkaBatchTopKSAE"]  # fmt: skip


@pytest.mark.parametrize("dict_class", DL_CLASSES)
def test_dictionary_learning_load(tmp_path, dict_class):
    sd, cfg, fwd = dl_files(dict_class)
    torch.save(sd, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = sae.load(tmp_path)
    assert sae.load(tmp_path / "ae.pt").config() == model.config()
    if dict_class == "BatchTopKSAE":  # the threshold is honoured: not a plain ReLU SAE
        assert isinstance(model, sae.BatchTopKSAE) and float(model.threshold) == pytest.approx(0.4)
    if dict_class == "MatryoshkaBatchTopKSAE":
        assert model.prefixes == [8, 20, 40] and model.prefix_weights == [0.5, 0.25, 0.25]
    x = rand(10, D)
    check(model, x, fwd({k: v.double() for k, v in sd.items()}, x.double()), dict_class)


def test_dictionary_learning_unknown_class(tmp_path):
    torch.save({"W": rand(2, 2)}, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "CrossCoder"}}))
    with pytest.raises(ValueError, match="dict_class 'CrossCoder' is not supported"):
        sae.load(tmp_path)


# Gemma Scope, OpenAI ---------------------------------------------------------------------------------


def test_gemma_scope_npz(tmp_path):
    p = {"W_enc": rand(D, N) * 0.5, "W_dec": rand(N, D), "b_enc": rand(N) * 0.3, "b_dec": rand(D),
         "threshold": torch.rand(N) * 0.5}  # fmt: skip
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in p.items()})
    x = rand(7, D)
    q = {k: v.double() for k, v in p.items()}
    pre = x.double() @ q["W_enc"] + q["b_enc"]  # no input centering
    ref = ((pre > q["threshold"]) * pre.relu()) @ q["W_dec"] + q["b_dec"]
    for path in (tmp_path, tmp_path / "params.npz"):
        model = sae.load(path)
        assert isinstance(model, sae.JumpReLUSAE) and not model.apply_b_dec_to_input
        check(model, x, ref, "Gemma Scope")


@pytest.mark.parametrize("activation", ["ReLU", "TopK"])
def test_openai_state_dict(tmp_path, activation):
    sd = {"pre_bias": rand(D), "encoder.weight": rand(N, D) * 0.5, "latent_bias": rand(N) * 0.3,
          "decoder.weight": rand(D, N), "stats_last_nonzero": torch.zeros(N, dtype=torch.long),
          "activation": activation}  # fmt: skip
    if activation == "TopK":
        sd["activation_state_dict"] = {"k": K, "postact_fn": "ReLU"}
    torch.save(sd, tmp_path / "ae.pt")
    model = sae.load(tmp_path / "ae.pt")
    x = rand(6, D) * 3 + 1
    p = {k: v.double() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    xn, mu, std = layer_norm(x.double()) if activation == "TopK" else (x.double(), 0, 1)  # TopK models normalise
    pre = (xn - p["pre_bias"]) @ p["encoder.weight"].T + p["latent_bias"]
    f = topk_dense(pre, K) if activation == "TopK" else pre.relu()
    ref = (f @ p["decoder.weight"].T + p["pre_bias"]) * std + mu
    check(model, x, ref, f"OpenAI {activation}")


def test_unknown_layouts_name_what_was_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sae.load(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "notes").mkdir()
    with pytest.raises(ValueError, match=r"found \['notes/', 'weights.bin'\]"):
        sae.load(tmp_path)
    torch.save({"W": rand(2, 2)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"x.pt: it holds \['W'\]"):
        sae.load(tmp_path / "x.pt")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({"architecture": "crosscoder"}))
    st.save_file({"W_enc": rand(D, N)}, str(tmp_path / "s" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="architecture 'crosscoder' is not supported"):
        sae.load(tmp_path / "s")
