"""Load SAEs saved by SAELens, sparsify, dictionary_learning, Gemma Scope and OpenAI; save the SAELens layout.

`load(path)` detects the format from the files it finds; formats that store W_enc as [d_in, d_sae] are
transposed once here (our weights are latent-major). Each loader reproduces its library's forward pass:

  SAELens      folder: cfg.json + sae_weights.safetensors. architecture standard | topk | jumprelu | gated
               (| batchtopk | matryoshka_batchtopk saved as jumprelu); x' = x - b_dec if
               apply_b_dec_to_input; normalize_activations none | layer_norm | constant_norm_rescale
               (expected_average_only_in: the scale was folded in, nothing at run time).
  sparsify     folder: cfg.json + sae.safetensors (encoder.weight [n, d], encoder.bias, W_dec [n, d], b_dec,
               optional W_skip [d, d]); TopK of ReLU; x - b_dec unless transcode; a parent folder holds one
               subfolder per hookpoint (loaded as a dict, or pick one with hookpoint=).
  dictionary_learning  folder: ae.pt + config.json ({"trainer": {"dict_class": ...}}): AutoEncoder,
               GatedAutoEncoder, AutoEncoderTopK, BatchTopKSAE and MatryoshkaBatchTopKSAE (their learned
               global threshold, eval mode), JumpReluAutoEncoder (no input centering).
  Gemma Scope  params.npz (W_enc [d, n], W_dec [n, d], b_enc, b_dec, threshold): JumpReLU, no centering.
  OpenAI       .pt state dict (pre_bias, encoder.weight [n, d], latent_bias, decoder.weight [d, n],
               activation "ReLU" | "TopK" with activation_state_dict {"k"}); TopK models layer-normalise
               their inputs (the library's convention), x - pre_bias.

Loaded models are in eval mode. JumpReLU thresholds below 0 are clamped to 0: with the libraries'
ReLU(z) H(z - theta) that is the same function.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .base import SAE
from .prefix import MatryoshkaSAE
from .threshold import GatedSAE, JumpReLUSAE, ReLUSAE
from .topk import BatchTopKSAE, TopKSAE

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
DL_WEIGHTS, DL_CFG = "ae.pt", "config.json"
GEMMA_SCOPE = "params.npz"
KNOWN = (
    f"SAELens ({SAELENS_CFG} + {SAELENS_WEIGHTS}), sparsify ({SAELENS_CFG} + {SPARSIFY_WEIGHTS}, or one "
    f"subfolder per hookpoint), dictionary_learning ({DL_WEIGHTS} + {DL_CFG}), Gemma Scope ({GEMMA_SCOPE}), "
    "OpenAI (a .pt state dict with pre_bias)"
)
HYPER = {  # hyperparameters a class takes from a config file
    ReLUSAE: ("l1_coeff", "p"),
    TopKSAE: ("k", "aux_k", "aux_coeff"),
    JumpReLUSAE: ("l0_coeff", "bandwidth"),
    GatedSAE: ("l1_coeff",),
}


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover
        raise ImportError("reading and writing .safetensors files needs the safetensors package") from e
    return st


def _build(cls, weights: dict, *, dtype=None, device=None, **kw) -> SAE:
    """A model of class cls holding `weights` (our names and layout); missing biases stay zero."""
    W_enc, W_dec = weights["W_enc"], weights["W_dec"]
    if W_enc.dim() != 2 or W_dec.dim() != 2 or W_enc.shape[0] != W_dec.shape[0]:
        raise ValueError(f"W_enc {tuple(W_enc.shape)} and W_dec {tuple(W_dec.shape)} do not share d_sae")
    d_sae, d_in = W_enc.shape
    model = cls(
        d_in, d_sae, d_out=W_dec.shape[1], skip="W_skip" in weights, dtype=W_enc.dtype, device=W_enc.device, **kw
    )
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, t in weights.items():
            if name not in state:
                raise ValueError(f"{cls.__name__} has no tensor {name!r}")
            if tuple(state[name].shape) != tuple(t.shape):
                raise ValueError(f"{name}: expected shape {tuple(state[name].shape)}, found {tuple(t.shape)}")
            state[name].copy_(t)
    model.eval()
    return model.to(device=device, dtype=dtype)


def _hyper(cls, cfg: dict) -> dict:
    keys = next((v for c, v in HYPER.items() if issubclass(cls, c)), ())
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def _int(t) -> int:
    return int(t.item()) if isinstance(t, torch.Tensor) else int(t)


# SAELens --------------------------------------------------------------------------------------------

SAELENS_CLASSES = {
    "standard": ReLUSAE,
    "transcoder": ReLUSAE,
    "skip_transcoder": ReLUSAE,
    "topk": TopKSAE,
    "jumprelu": JumpReLUSAE,
    "jumprelu_transcoder": JumpReLUSAE,
    "gated": GatedSAE,
}


def _load_saelens(path: Path, **kw) -> SAE:
    cfg = json.loads((path / SAELENS_CFG).read_text())
    t = _safetensors().load_file(str(path / SAELENS_WEIGHTS))
    arch = cfg.get("architecture", "standard")
    if arch in ("batchtopk", "matryoshka_batchtopk") and "threshold" in t:
        arch = "jumprelu"
    if arch not in SAELENS_CLASSES and arch not in ("batchtopk", "matryoshka_batchtopk"):
        raise ValueError(f"{path}: SAELens architecture {arch!r} is not supported (known: {sorted(SAELENS_CLASSES)})")
    if "scaling_factor" in t and not bool((t["scaling_factor"] == 1).all()):
        raise ValueError(f"{path}: a SAELens finetuning scaling_factor other than 1 is not supported")
    cls = SAELENS_CLASSES.get(arch, BatchTopKSAE)
    weights = {"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    names = {GatedSAE: ("b_gate", "r_mag", "b_mag")}.get(cls, ("b_enc",)) + ("W_skip",)
    weights |= {k: t[k] for k in names if k in t}
    if cls is JumpReLUSAE:
        theta = t["threshold"] if "threshold" in t else torch.exp(t["log_threshold"])
        weights["threshold"] = theta.clamp_min(0)
    norm = cfg.get("normalize_activations", "none")
    opts = {
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
        "normalize_activations": "none" if norm == "expected_average_only_in" else norm,
        "act_scale": float(cfg.get("act_scale", 1.0)),
        **_hyper(cls, cfg),
    }
    return _build(cls, weights, **opts, **kw)


def _saelens_state(model: SAE) -> tuple[dict, dict]:
    """(tensors, cfg) of the SAELens layout."""
    t = {"W_enc": model.W_enc.T, "W_dec": model.W_dec, "b_dec": model.b_dec}
    arch = model.architecture
    if isinstance(model, GatedSAE):
        t |= {"b_gate": model.b_gate, "r_mag": model.r_mag, "b_mag": model.b_mag}
    else:
        t["b_enc"] = model.b_enc
    if isinstance(model, JumpReLUSAE):
        t["threshold"] = model.threshold
    elif isinstance(model, BatchTopKSAE):  # its inference form: a JumpReLU with one global threshold
        theta = float(model.threshold)
        if theta < 0:
            raise ValueError("a BatchTopK SAE is saved as a JumpReLU with its global threshold, not learned yet")
        t["threshold"] = torch.full((model.d_sae,), theta, dtype=model.dtype, device=model.device)
        arch = "jumprelu"
    if model.W_skip is not None:
        t["W_skip"] = model.W_skip
    t = {k: v.detach().cpu().contiguous() for k, v in t.items()}
    cfg = model.config()
    cfg.pop("act_scale")
    cfg |= {"architecture": arch, "dtype": str(model.dtype).removeprefix("torch."), "device": "cpu"}
    return t, cfg


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save(model: SAE, path, format: str = "saelens") -> None:
    """Write `model` to the folder `path` in the SAELens layout (cfg.json + sae_weights.safetensors), each
    file atomically. A constant act_scale is folded into the written weights."""
    if format != "saelens":
        raise ValueError(f"format={format!r}: only 'saelens' can be written")
    if not isinstance(model, SAE):
        raise TypeError(f"model must be an SAE, got {type(model).__name__}")
    if model.act_scale != 1.0:
        model = copy.deepcopy(model)
        model.fold_act_scale()
    tensors, cfg = _saelens_state(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / SAELENS_WEIGHTS, lambda f: _safetensors().save_file(tensors, f))
    _atomic_write(path / SAELENS_CFG, lambda f: Path(f).write_text(json.dumps(cfg, indent=2)))


# sparsify -------------------------------------------------------------------------------------------


def _load_sparsify(path: Path, **kw) -> SAE:
    cfg = json.loads((path / SAELENS_CFG).read_text())
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{path}: sparsify activation {cfg['activation']!r} is not supported (only topk)")
    t = _safetensors().load_file(str(path / SPARSIFY_WEIGHTS))
    weights = {"W_enc": t["encoder.weight"], "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if t.get("W_skip") is not None:
        weights["W_skip"] = t["W_skip"]
    centre = not cfg.get("transcode", False)
    return _build(TopKSAE, weights, k=int(cfg["k"]), apply_b_dec_to_input=centre, **kw)


# dictionary_learning --------------------------------------------------------------------------------


def _load_dictionary_learning(path: Path, **kw) -> SAE:
    cfg = json.loads((path / DL_CFG).read_text())
    trainer = cfg.get("trainer", cfg)
    cls_name = trainer.get("dict_class")
    sd = torch.load(path / DL_WEIGHTS, map_location="cpu", weights_only=True)
    linear = lambda: {"W_enc": sd["encoder.weight"], "W_dec": sd["decoder.weight"].T.contiguous()}
    if cls_name == "AutoEncoder":
        return _build(ReLUSAE, linear() | {"b_enc": sd["encoder.bias"], "b_dec": sd["bias"]}, **kw)
    if cls_name == "GatedAutoEncoder":
        weights = linear() | {"b_dec": sd["decoder_bias"], "r_mag": sd["r_mag"]}
        return _build(GatedSAE, weights | {"b_gate": sd["gate_bias"], "b_mag": sd["mag_bias"]}, **kw)
    if cls_name == "AutoEncoderTopK":
        weights = linear() | {"b_enc": sd["encoder.bias"], "b_dec": sd["b_dec"]}
        return _build(TopKSAE, weights, k=_int(sd["k"]), **kw)
    if cls_name == "JumpReluAutoEncoder":
        weights = {k: sd[k] for k in ("b_enc", "W_dec", "b_dec")}
        weights |= {"W_enc": sd["W_enc"].T.contiguous(), "threshold": sd["threshold"].clamp_min(0)}
        return _build(JumpReLUSAE, weights, apply_b_dec_to_input=False, **kw)
    if cls_name == "BatchTopKSAE":
        weights = linear() | {"b_enc": sd["encoder.bias"], "b_dec": sd["b_dec"]}
        model = _build(BatchTopKSAE, weights | {"threshold": sd["threshold"]}, k=_int(sd["k"]), **kw)
    elif cls_name in ("MatryoshkaBatchTopKSAE", "MatroyshkaBatchTopKSAE"):
        weights = {k: sd[k] for k in ("b_enc", "W_dec", "b_dec")} | {"W_enc": sd["W_enc"].T.contiguous()}
        prefixes = np.cumsum(sd["group_sizes"].tolist()).tolist()
        opts = {"prefixes": prefixes, "prefix_weights": trainer.get("group_weights"), "k": _int(sd["k"])}
        model = _build(MatryoshkaSAE, weights | {"threshold": sd["threshold"]}, **opts, **kw)
    else:
        raise ValueError(
            f"{path / DL_CFG}: dictionary_learning dict_class {cls_name!r} is not supported (AutoEncoder, "
            "GatedAutoEncoder, AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder, MatryoshkaBatchTopKSAE)"
        )
    if float(model.threshold) < 0:
        warnings.warn(f"{path}: no BatchTopK threshold was learned; eval mode selects per batch", stacklevel=3)
    return model


# Gemma Scope, OpenAI --------------------------------------------------------------------------------


def _load_gemma_scope(file: Path, **kw) -> SAE:
    with np.load(file) as z:
        p = {k: torch.from_numpy(np.asarray(z[k])) for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    weights = {"W_enc": p["W_enc"].T.contiguous(), "W_dec": p["W_dec"], "b_enc": p["b_enc"], "b_dec": p["b_dec"]}
    weights["threshold"] = p["threshold"].clamp_min(0)
    return _build(JumpReLUSAE, weights, apply_b_dec_to_input=False, **kw)


def _load_openai(file: Path, sd: dict, **kw) -> SAE:
    weights = {
        "W_enc": sd["encoder.weight"],
        "b_enc": sd["latent_bias"],
        "W_dec": sd["decoder.weight"].T.contiguous(),
        "b_dec": sd["pre_bias"],
    }
    act = sd.get("activation", "ReLU")
    if act == "ReLU":
        return _build(ReLUSAE, weights, **kw)
    if act == "TopK":
        k = int(sd.get("activation_state_dict", {})["k"])
        return _build(TopKSAE, weights, k=k, normalize_activations="layer_norm", **kw)
    raise ValueError(f"{file}: OpenAI activation {act!r} is not supported (ReLU, TopK)")


# Detection ------------------------------------------------------------------------------------------


def _folder_format(path: Path) -> str | None:
    has = lambda name: (path / name).is_file()
    if has(SAELENS_CFG) and has(SAELENS_WEIGHTS):
        return "saelens"
    if has(SAELENS_CFG) and has(SPARSIFY_WEIGHTS):
        return "sparsify"
    if has(DL_WEIGHTS) and has(DL_CFG):
        return "dictionary_learning"
    if has(GEMMA_SCOPE):
        return "gemma_scope"
    return None


FOLDER_LOADERS = {
    "saelens": _load_saelens,
    "sparsify": _load_sparsify,
    "dictionary_learning": _load_dictionary_learning,
    "gemma_scope": lambda p, **kw: _load_gemma_scope(p / GEMMA_SCOPE, **kw),
}


def load(path, *, hookpoint: str | None = None, dtype: torch.dtype | None = None, device=None) -> SAE | dict[str, SAE]:
    """The SAE saved at `path` (a folder or a file), in the matching class, in eval mode.

    A folder with one sparsify (or SAELens) subfolder per hookpoint gives {hookpoint: SAE}, or the SAE of
    `hookpoint`. dtype / device move the loaded weights. Unknown layouts raise ValueError naming the files
    found.
    """
    path = Path(path)
    kw = {"dtype": dtype, "device": device}
    if not path.exists():
        raise FileNotFoundError(f"no SAE at {path}: the path does not exist")
    if path.is_file():
        if path.suffix == ".npz":
            return _load_gemma_scope(path, **kw)
        if path.suffix in (".pt", ".pth"):
            if path.name == DL_WEIGHTS and (path.parent / DL_CFG).is_file():
                return _load_dictionary_learning(path.parent, **kw)
            sd = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(sd, dict) and "pre_bias" in sd and "encoder.weight" in sd:
                return _load_openai(path, sd, **kw)
            found = sorted(sd)[:8] if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(f"cannot tell the SAE format of {path}: it holds {found}; known formats: {KNOWN}")
        if path.parent != path and _folder_format(path.parent):
            return load(path.parent, hookpoint=hookpoint, **kw)
        raise ValueError(f"cannot tell the SAE format of the file {path}; known formats: {KNOWN}")
    if hookpoint is not None:
        return load(path / hookpoint, **kw)
    fmt = _folder_format(path)
    if fmt is not None:
        return FOLDER_LOADERS[fmt](path, **kw)
    subs = sorted(p for p in path.iterdir() if p.is_dir() and _folder_format(p))
    if subs:
        return {p.name: FOLDER_LOADERS[_folder_format(p)](p, **kw) for p in subs}
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    raise ValueError(f"cannot tell the SAE format of the folder {path}: found {found or 'nothing'}; known: {KNOWN}")
