"""The SAELens layout: a folder with cfg.json and sae_weights.safetensors, W_enc stored [d_in, d_sae].

`save` writes the class itself: SAELens's fields for the architecture (so SAELens's own `load_from_disk`, or
`TrainingSAE.load_from_disk` for BatchTopK and Matryoshka, reads the file) plus our block under "sae_kernels"
({"architecture": registry name, "config": model.config()}), which SAELens ignores and `load` uses to give back
the same class with every argument and tensor. Ordered SAEs (SAELens has none) use the same layout under the
architecture "ordered". `save(..., inference=True)` exports SAELens's inference form instead.

A model with act_scale != 1 is written as SAELens writes a mid-training checkpoint: normalize_activations
"expected_average_only_in", inputs scaled by act_scale outside the SAE (our block holds the factor; SAELens's
reader ignores it). The trainer's export and the inference form fold act_scale into the weights instead. A ReLU
SAE with a skip connection is SAELens's skip_transcoder, which SAELens reads only without input centering.

A file without our block is read with SAELens's semantics: architecture standard | transcoder | skip_transcoder |
topk | batchtopk | matryoshka_batchtopk | jumprelu | jumprelu_transcoder | gated; the config fields that change
the forward (apply_b_dec_to_input, normalize_activations, reshape_activations, rescale_acts_by_decoder_norm) are
honoured, and values we cannot honour (covariance_whitening, unknown ones) are refused naming the field.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..base import NORMALIZATIONS, RESHAPES, SAE
from ..registry import ARCHITECTURES
from ..threshold import JumpReLUSAE
from ..topk import BatchTopKSAE, TopKSAE
from .common import build, read_json, read_safetensors

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
# the sae-lens release whose layout we write (SAELens reads a cfg without it as a pre-6.0 file); checked by
# tests/fixtures/saelens/make_fixtures.py --check-ours
SAELENS_VERSION = "6.54.12"
OURS = "sae_kernels"  # the cfg.json key of our block
CLASSES = {cls.architecture: cls for cls in ARCHITECTURES.values()} | {
    alias: cls for cls in ARCHITECTURES.values() for alias in cls.saelens_aliases
}
DOUBLE = ("topk_threshold",)  # SAELens keeps BatchTopK's threshold in float64


def _tensors(model: SAE) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers under the file's names (W_enc transposed)."""
    out = {}
    for name, t in (dict(model.named_parameters()) | dict(model.named_buffers())).items():
        key = model.file_names.get(name, name)
        t = t.detach().T if name == "W_enc" else t.detach()
        out[key] = (t.double() if key in DOUBLE else t).cpu().contiguous()
    return out


def _cfg(model: SAE) -> dict:
    norm = model.normalize_activations
    if norm == "none" and model.act_scale != 1.0:
        norm = "expected_average_only_in"  # SAELens: the inputs are scaled by a constant outside the SAE
    cfg = {
        "architecture": model.saelens_architecture(),
        "d_in": model.d_in,
        "d_sae": model.d_sae,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": model.apply_b_dec_to_input,
        "normalize_activations": norm,
        "reshape_activations": model.reshape_activations,
        **({"d_out": model.d_out} if model.d_out != model.d_in else {}),
        **model.saelens_fields(),
        "metadata": {"sae_lens_version": SAELENS_VERSION},
    }
    return cfg | {OURS: {"architecture": model.name, "config": model.config()}}


def inference_form(model: SAE) -> SAE:
    """A copy in SAELens's inference form: act_scale and decoder-norm rescaling folded in (exact), and the
    BatchTopK family as a JumpReLU with its learned global threshold."""
    model = copy.deepcopy(model).eval()
    model.fold_act_scale()
    if isinstance(model, TopKSAE) and model.rescale_acts_by_decoder_norm:
        model.fold_decoder_norms()
    if not isinstance(model, BatchTopKSAE):
        return model
    theta = float(model.threshold)
    if theta < 0:
        raise ValueError("the BatchTopK threshold is not learned yet (train first): no inference form to export")
    tensors = {k: v for k, v in model.named_parameters()}
    tensors["threshold"] = torch.full((model.d_sae,), theta, dtype=model.dtype, device=model.device)
    return build(JumpReLUSAE, tensors, **SAE.config(model))


def save(model: SAE, path: Path, *, inference: bool = False) -> None:
    """Write `model` (or its inference form) to the folder `path`, each file atomically."""
    if inference:
        model = inference_form(model)
    tensors, cfg = _tensors(model), _cfg(model)
    from safetensors.torch import save_file

    atomic_write(path / WEIGHTS, lambda tmp: save_file(tensors, tmp))
    atomic_write(path / CFG, lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))


def _our_names(cls: type[SAE], t: dict) -> dict:
    """File tensors -> our names and layout."""
    inverse = {v: k for k, v in cls.file_names.items()}
    out = {inverse.get(k, k): v for k, v in t.items()}
    out["W_enc"] = out["W_enc"].T.contiguous()
    return out


def load(path: Path, **kw) -> SAE:
    cfg = read_json(path / CFG, "SAELens cfg")
    t = read_safetensors(path / WEIGHTS, "SAELens sae_weights")
    ours = cfg.get(OURS)
    if ours is not None:
        name = ours.get("architecture")
        if name not in ARCHITECTURES:
            raise ValueError(f"{path / CFG}: unknown architecture {name!r} (known: {', '.join(ARCHITECTURES)})")
        cls = ARCHITECTURES[name]
        return build(cls, _our_names(cls, t), **ours["config"], **kw)
    arch = cfg.get("architecture", "standard")
    if arch in ("batchtopk", "matryoshka_batchtopk") and "threshold" in t:
        arch = "jumprelu"  # an inference export of a BatchTopK SAE
    if arch not in CLASSES:
        raise ValueError(f"{path / CFG}: SAELens architecture {arch!r} is not supported (known: {sorted(CLASSES)})")
    for field, known in (("normalize_activations", NORMALIZATIONS), ("reshape_activations", RESHAPES)):
        if cfg.get(field, "none") not in known:
            raise ValueError(
                f"{path / CFG}: {field}={cfg[field]!r} is not supported (known: {', '.join(known)})"
                + ("; fold the whitening into the weights first" if cfg[field] == "covariance_whitening" else "")
            )
    if "scaling_factor" in t and not bool((t.pop("scaling_factor") == 1).all()):
        raise ValueError(f"{path / WEIGHTS}: a SAELens finetuning scaling_factor other than 1 is not supported")
    cls = CLASSES[arch]
    weights = _our_names(cls, t)
    if "log_threshold" in weights:  # SAELens's JumpReLU training layout
        weights["threshold"] = torch.exp(weights.pop("log_threshold"))
    if cls is JumpReLUSAE:  # ReLU(z) H(z - theta): a threshold below 0 acts as 0
        weights["threshold"] = weights["threshold"].clamp_min(0)
    transcoder = cfg.get("d_out", cfg.get("d_in")) != cfg.get("d_in")
    opts = {
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", not transcoder)),
        "normalize_activations": cfg.get("normalize_activations", "none"),
        "reshape_activations": cfg.get("reshape_activations", "none"),
        **cls.config_from_saelens(cfg),
    }
    return build(cls, weights, **opts, **kw)
