"""Loaders of the peers' files: sparsify, dictionary_learning, Gemma Scope and OpenAI.

Formats that store W_enc as [d_in, d_sae] are transposed once here (our weights are latent-major). Each
loader reproduces its library's forward pass:

  sparsify     folder: cfg.json + sae.safetensors (encoder.weight [n, d], encoder.bias, W_dec [n, d], b_dec,
               optional W_skip [d, d]); TopK of ReLU; x - b_dec unless transcode. `save_sparsify` writes it.
  dictionary_learning  folder: ae.pt + config.json ({"trainer": {"dict_class": ...}}): AutoEncoder,
               GatedAutoEncoder, AutoEncoderTopK, BatchTopKSAE and MatryoshkaBatchTopKSAE (their learned
               global threshold, eval mode), JumpReluAutoEncoder (no input centering).
  Gemma Scope  params.npz (W_enc [d, n], W_dec [n, d], b_enc, b_dec, threshold): JumpReLU, no centering.
  OpenAI       .pt state dict (pre_bias, encoder.weight [n, d], latent_bias, decoder.weight [d, n],
               activation "ReLU" | "TopK" with activation_state_dict {"k"}); TopK models layer-normalise
               their inputs (the library's convention), x - pre_bias.

JumpReLU thresholds below 0 are clamped to 0: with the libraries' ReLU(z) H(z - theta) that is the same function.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write
from ..base import SAE
from ..prefix import MatryoshkaSAE
from ..threshold import GatedSAE, JumpReLUSAE, ReLUSAE
from ..topk import BatchTopKSAE, TopKSAE
from .common import build, read_json, read_npz, read_safetensors, read_torch

SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
DL_WEIGHTS, DL_CFG = "ae.pt", "config.json"
GEMMA_SCOPE = "params.npz"


def _int(t) -> int:
    return int(t.item()) if isinstance(t, torch.Tensor) else int(t)


# sparsify -------------------------------------------------------------------------------------------


def load_sparsify(path: Path, **kw) -> SAE:
    cfg = read_json(path / SPARSIFY_CFG, "sparsify cfg")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{path}: sparsify activation {cfg['activation']!r} is not supported (only topk)")
    t = read_safetensors(path / SPARSIFY_WEIGHTS, "sparsify sae weights")
    weights = {"W_enc": t["encoder.weight"], "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if t.get("W_skip") is not None:
        weights["W_skip"] = t["W_skip"]
    centre = not cfg.get("transcode", False)
    return build(TopKSAE, weights, k=int(cfg["k"]), apply_b_dec_to_input=centre, **kw)


def save_sparsify(model: SAE, path: Path) -> None:
    """Write a TopK SAE or transcoder (d_out == d_in, sparsify's only width) in sparsify's layout: transcode is
    "no input centering"; act_scale and decoder-norm rescaling are folded in first (exact)."""
    if type(model) is not TopKSAE:
        raise ValueError(f"sparsify's layout holds TopK SAEs only, not {type(model).__name__}")
    if model.d_out != model.d_in or model.normalize_activations != "none" or model.reshape_activations != "none":
        raise ValueError(
            "sparsify's layout needs d_out == d_in and no normalisation or reshape, got "
            f"d_in={model.d_in}, d_out={model.d_out}, normalize_activations={model.normalize_activations!r}, "
            f"reshape_activations={model.reshape_activations!r}"
        )
    model = copy.deepcopy(model)
    model.fold_act_scale()
    if model.rescale_acts_by_decoder_norm:
        model.fold_decoder_norms()
    t = {"encoder.weight": model.W_enc, "encoder.bias": model.b_enc, "W_dec": model.W_dec, "b_dec": model.b_dec}
    if model.W_skip is not None:
        t["W_skip"] = model.W_skip
    t = {k: v.detach().cpu().contiguous() for k, v in t.items()}
    cfg = {
        "expansion_factor": max(1, model.d_sae // model.d_in),
        "normalize_decoder": True,
        "num_latents": model.d_sae,
        "k": model.k,
        "multi_topk": False,
        "skip_connection": model.W_skip is not None,
        "transcode": not model.apply_b_dec_to_input,
        "d_in": model.d_in,
    }
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / SPARSIFY_WEIGHTS, lambda tmp: save_file(t, tmp))
    atomic_write(path / SPARSIFY_CFG, lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))


# dictionary_learning --------------------------------------------------------------------------------


def load_dictionary_learning(path: Path, **kw) -> SAE:
    cfg = read_json(path / DL_CFG, "dictionary_learning config")
    trainer = cfg.get("trainer", cfg)
    cls_name = trainer.get("dict_class")
    sd = read_torch(path / DL_WEIGHTS, "dictionary_learning ae.pt")
    linear = lambda: {"W_enc": sd["encoder.weight"], "W_dec": sd["decoder.weight"].T.contiguous()}
    if cls_name == "AutoEncoder":
        return build(ReLUSAE, linear() | {"b_enc": sd["encoder.bias"], "b_dec": sd["bias"]}, **kw)
    if cls_name == "GatedAutoEncoder":
        weights = linear() | {"b_dec": sd["decoder_bias"], "r_mag": sd["r_mag"]}
        return build(GatedSAE, weights | {"b_gate": sd["gate_bias"], "b_mag": sd["mag_bias"]}, **kw)
    if cls_name == "AutoEncoderTopK":
        weights = linear() | {"b_enc": sd["encoder.bias"], "b_dec": sd["b_dec"]}
        return build(TopKSAE, weights, k=_int(sd["k"]), **kw)
    if cls_name == "JumpReluAutoEncoder":
        weights = {k: sd[k] for k in ("b_enc", "W_dec", "b_dec")}
        weights |= {"W_enc": sd["W_enc"].T.contiguous(), "threshold": sd["threshold"].clamp_min(0)}
        return build(JumpReLUSAE, weights, apply_b_dec_to_input=False, **kw)
    if cls_name == "BatchTopKSAE":
        weights = linear() | {"b_enc": sd["encoder.bias"], "b_dec": sd["b_dec"]}
        model = build(BatchTopKSAE, weights | {"threshold": sd["threshold"]}, k=_int(sd["k"]), **kw)
    elif cls_name in ("MatryoshkaBatchTopKSAE", "MatroyshkaBatchTopKSAE"):
        weights = {k: sd[k] for k in ("b_enc", "W_dec", "b_dec")} | {"W_enc": sd["W_enc"].T.contiguous()}
        prefixes = np.cumsum(sd["group_sizes"].tolist()).tolist()
        opts = {"prefixes": prefixes, "prefix_weights": trainer.get("group_weights"), "k": _int(sd["k"])}
        model = build(MatryoshkaSAE, weights | {"threshold": sd["threshold"]}, **opts, **kw)
    else:
        raise ValueError(
            f"{path / DL_CFG}: dictionary_learning dict_class {cls_name!r} is not supported (AutoEncoder, "
            "GatedAutoEncoder, AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder, MatryoshkaBatchTopKSAE)"
        )
    if float(model.threshold) < 0:
        warnings.warn(f"{path}: no BatchTopK threshold was learned; eval mode selects per batch", stacklevel=3)
    return model


# Gemma Scope, OpenAI --------------------------------------------------------------------------------


def load_gemma_scope(file: Path, **kw) -> SAE:
    p = read_npz(file, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), "Gemma Scope params")
    weights = {"W_enc": p["W_enc"].T.contiguous(), "W_dec": p["W_dec"], "b_enc": p["b_enc"], "b_dec": p["b_dec"]}
    weights["threshold"] = p["threshold"].clamp_min(0)
    return build(JumpReLUSAE, weights, apply_b_dec_to_input=False, **kw)


def load_openai(file: Path, sd: dict, **kw) -> SAE:
    weights = {
        "W_enc": sd["encoder.weight"],
        "b_enc": sd["latent_bias"],
        "W_dec": sd["decoder.weight"].T.contiguous(),
        "b_dec": sd["pre_bias"],
    }
    act = sd.get("activation", "ReLU")
    if act == "ReLU":
        return build(ReLUSAE, weights, **kw)
    if act == "TopK":
        k = int(sd.get("activation_state_dict", {})["k"])
        return build(TopKSAE, weights, k=k, normalize_activations="layer_norm", **kw)
    raise ValueError(f"{file}: OpenAI activation {act!r} is not supported (ReLU, TopK)")
