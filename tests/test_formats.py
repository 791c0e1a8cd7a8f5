"""Every public format: files written here from the documented layouts (no downloads), loaded by sae.load,
outputs equal to a float64 reference of that library's forward pass (its centering and normalisation)."""

import inspect
import json
import os

import numpy as np
import pytest
import torch
from helpers import assert_close

import sae
from sae.registry import ARCHITECTURES

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


NONDEFAULT = {  # a value other than the default for every constructor argument of every registered class
    "d_out": 7,
    "skip": True,
    "apply_b_dec_to_input": False,
    "normalize_activations": "layer_norm",
    "act_scale": 2.5,
    "reshape_activations": "hook_z",
    "dtype": torch.bfloat16,
    "k": 3,
    "aux_k": 2,
    "aux_coeff": 0.25,
    "rescale_acts_by_decoder_norm": True,
    "threshold_beta": 0.9,
    "prefixes": [5, 17, N],
    "l1_coeff": 2.0,
    "p": 0.7,
    "l0_coeff": 0.3,
    "bandwidth": 0.05,
    "init_threshold": 0.02,
}


def constructor_args(cls) -> dict[str, inspect.Parameter]:
    """Every keyword a class takes, its own and its bases' (through **kw), but d_in and d_sae."""
    out = {}
    for c in reversed(cls.__mro__):
        if issubclass(c, sae.SAE):
            params = inspect.signature(c.__init__).parameters.values()
            out |= {p.name: p for p in params if p.kind == p.KEYWORD_ONLY or p.name == "k"}
    return out


def nondefault_model(cls, transcoder: bool):
    """cls with a non-default value for every argument; the transcoder variant takes d_out and skip (with
    hook_z off), the other hook_z; tensors random, a BatchTopK threshold learned."""
    args = constructor_args(cls)
    kw = {name: NONDEFAULT[name] for name in args if name not in ("device", "prefix_weights")}
    if "prefix_weights" in args:
        kw["prefix_weights"] = [0.2, 0.3, 0.5] if cls is sae.MatryoshkaSAE else torch.rand(N)
    if transcoder:
        kw["reshape_activations"] = "none"
    else:
        del kw["d_out"], kw["skip"]
    model = cls(D, N, **kw)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.copy_(t + torch.rand_like(t) * 0.2)  # JumpReLU thresholds stay > 0
        if isinstance(model, sae.BatchTopKSAE):
            model.threshold.fill_(0.3)  # learned
    return model.eval()


@pytest.mark.parametrize("transcoder", [False, True], ids=["hook_z", "transcoder"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_save_round_trip_every_class(tmp_path, name, transcoder):
    cls = ARCHITECTURES[name]
    model = nondefault_model(cls, transcoder)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    # every constructor argument is in config() or travels as one of the model's tensors
    assert set(constructor_args(cls)) - {"dtype", "device"} <= set(model.config()) | set(tensors)
    sae.save(model, tmp_path / "m")
    sae.save(model, tmp_path / "m")  # overwrite in place
    assert sorted(os.listdir(tmp_path / "m")) == ["cfg.json", "sae_weights.safetensors"]  # no temporaries left
    loaded = sae.load(tmp_path / "m")
    assert type(loaded) is cls and loaded.config() == model.config() and not loaded.training
    got = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert got.keys() == tensors.keys()
    for k in tensors:
        assert got[k].dtype == tensors[k].dtype and torch.equal(got[k], tensors[k]), k
    x = rand(6, 4, 3) if not transcoder else rand(6, D)  # hook_z: [tokens, n_heads, d_head]
    with torch.no_grad():
        out = model(x)
        assert out.shape == (x.shape if not transcoder else (6, 7))
        assert torch.equal(out, loaded(x))


@pytest.mark.parametrize("name", ["batchtopk", "matryoshka", "ordered"])
def test_inference_export_is_a_jumprelu(tmp_path, name):
    """SAELens's inference form: the BatchTopK family as a JumpReLU with the global threshold, with act_scale
    and the decoder-norm rescaling folded in; the model's own save keeps its class."""
    model = nondefault_model(ARCHITECTURES[name], transcoder=True).float()  # folding in bf16 would round
    with pytest.raises(ValueError, match="not learned yet"):
        fresh = ARCHITECTURES[name](D, N, K, **({"prefixes": [N]} if name == "matryoshka" else {}))
        sae.save(fresh, tmp_path / "fresh", inference=True)
    sae.save(model, tmp_path / "m", inference=True)
    cfg = json.loads((tmp_path / "m" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder"
    loaded = sae.load(tmp_path / "m")
    assert type(loaded) is sae.JumpReLUSAE and loaded.act_scale == 1.0
    x = rand(20, D)
    with torch.no_grad():
        assert_close(loaded(x), model(x), torch.float32, "inference export")


def test_saved_cfg_speaks_saelens(tmp_path):
    """The SAELens fields of our files (SAELens's own loader reads them: tests/fixtures/saelens)."""
    model = sae.MatryoshkaSAE(D, N, K, prefixes=[8, N], threshold_beta=0.99, act_scale=2.0)
    sae.save(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "cfg.json").read_text())
    assert cfg["architecture"] == "matryoshka_batchtopk" and cfg["matryoshka_widths"] == [8, N]
    assert cfg["k"] == K and cfg["topk_threshold_lr"] == pytest.approx(0.01)
    assert cfg["normalize_activations"] == "expected_average_only_in"  # act_scale is applied outside SAELens
    t = st.load_file(str(tmp_path / "m" / "sae_weights.safetensors"))
    assert sorted(t) == ["W_dec", "W_enc", "b_dec", "b_enc", "topk_threshold"]
    assert t["W_enc"].shape == (D, N) and t["topk_threshold"].dtype == torch.float64


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_name_the_file(tmp_path, damage):
    sae.save(sae.TopKSAE(D, N, K), tmp_path / "m")
    f = tmp_path / "m" / "sae_weights.safetensors"
    f.write_bytes(f.read_bytes()[:100] if damage == "truncated" else b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors.*SAELens"):
        sae.load(tmp_path / "m")


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
