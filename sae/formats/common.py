"""What every format shares: reading tensor files with errors that name the file, and building a model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..base import SAE


def read_json(path: Path, what: str) -> dict:
    """A JSON object from path, with an error naming the file and the format expected."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON config ({what} expected): {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object ({what}), got {type(cfg).__name__}")
    return cfg


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a missing package or a corrupt file raises an error naming both."""
    try:
        from safetensors.torch import load_file
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"reading {path} needs the safetensors package (pip install safetensors)") from e
    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable .safetensors file ({what} expected): {e}") from e


def read_torch(path: Path, what: str):
    """torch.load(path) (tensors only) with an error naming the file and the format expected."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch file ({what} expected): {e}") from e


def read_npz(path: Path, names: tuple[str, ...], what: str) -> dict[str, torch.Tensor]:
    """The arrays `names` of a .npz file as tensors, with an error naming the file and what is missing."""
    try:
        with np.load(path) as z:
            missing = [k for k in names if k not in z.files]
            if missing:
                raise ValueError(f"{path}: {what} needs arrays {list(names)}, missing {missing}")
            return {k: torch.from_numpy(np.asarray(z[k])) for k in names}
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz file ({what} expected): {e}") from e


def build(cls: type[SAE], weights: dict, *, dtype=None, device=None, **kw) -> SAE:
    """A model of class cls holding `weights` (our names and layout) in eval mode; tensors it does not get
    keep their initial values (zero biases). kw: constructor arguments."""
    W_enc, W_dec = weights["W_enc"], weights["W_dec"]
    if W_enc.dim() != 2 or W_dec.dim() != 2 or W_enc.shape[0] != W_dec.shape[0]:
        raise ValueError(f"W_enc {tuple(W_enc.shape)} and W_dec {tuple(W_dec.shape)} do not share d_sae")
    d_sae, d_in = W_enc.shape
    for name, size in (("d_in", d_in), ("d_sae", d_sae), ("d_out", W_dec.shape[1])):
        if kw.get(name, size) != size:
            raise ValueError(f"the config says {name}={kw[name]}, but the tensors have {name}={size}")
    kw = {"d_out": W_dec.shape[1], "skip": "W_skip" in weights} | kw
    kw.pop("d_in", None), kw.pop("d_sae", None)
    model = cls(d_in, d_sae, dtype=W_enc.dtype, device=W_enc.device, **kw)
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
