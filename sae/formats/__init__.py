"""Load SAEs saved by SAELens, sparsify, dictionary_learning, Gemma Scope and OpenAI; save ours.

    saelens.py   the SAELens layout (cfg.json + sae_weights.safetensors): what `save` writes, and SAELens's files
    peers.py     sparsify, dictionary_learning, Gemma Scope and OpenAI files
    common.py    reading tensor and JSON files (errors name the file), building a model from tensors

`load(path)` detects the format from the files it finds. Loaded models are in eval mode.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..base import SAE
from . import peers, saelens
from .common import read_torch

KNOWN = (
    f"SAELens ({saelens.CFG} + {saelens.WEIGHTS}), sparsify ({peers.SPARSIFY_CFG} + {peers.SPARSIFY_WEIGHTS}, or "
    f"one subfolder per hookpoint), dictionary_learning ({peers.DL_WEIGHTS} + {peers.DL_CFG}), Gemma Scope "
    f"({peers.GEMMA_SCOPE}), OpenAI (a .pt state dict with pre_bias)"
)


def save(model: SAE, path, *, inference: bool = False, format: str = "saelens") -> None:
    """Write `model` to the folder `path` in the SAELens layout (format="sparsify": sparsify's layout, for TopK
    SAEs and transcoders of d_out == d_in; peers.save_sparsify), each file atomically.

    The file holds the class itself, trained or not: `load(path)` gives back the same class with every
    constructor argument (`model.config()`) and every parameter and buffer. SAELens reads it too (BatchTopK and
    Matryoshka through `TrainingSAE.load_from_disk`; ordered SAEs are ours alone). inference=True exports
    SAELens's inference form instead: act_scale and decoder-norm rescaling folded in, and a BatchTopK,
    Matryoshka or ordered SAE as a JumpReLU with its learned global threshold.
    """
    if not isinstance(model, SAE):
        raise TypeError(f"model must be an SAE, got {type(model).__name__}")
    if format not in ("saelens", "sparsify"):
        raise ValueError(f"format must be 'saelens' or 'sparsify', got {format!r}")
    path = Path(path)
    if format == "sparsify":
        return peers.save_sparsify(model, path)
    path.mkdir(parents=True, exist_ok=True)
    saelens.save(model, path, inference=inference)


def _folder_format(path: Path) -> str | None:
    has = lambda name: (path / name).is_file()
    if has(saelens.CFG) and has(saelens.WEIGHTS):
        return "saelens"
    if has(peers.SPARSIFY_CFG) and has(peers.SPARSIFY_WEIGHTS):
        return "sparsify"
    if has(peers.DL_WEIGHTS) and has(peers.DL_CFG):
        return "dictionary_learning"
    if has(peers.GEMMA_SCOPE):
        return "gemma_scope"
    return None


FOLDER_LOADERS = {
    "saelens": saelens.load,
    "sparsify": peers.load_sparsify,
    "dictionary_learning": peers.load_dictionary_learning,
    "gemma_scope": lambda p, **kw: peers.load_gemma_scope(p / peers.GEMMA_SCOPE, **kw),
}


def _load_file(path: Path, hookpoint: str | None, **kw) -> SAE | dict[str, SAE]:
    if path.suffix == ".npz":
        return peers.load_gemma_scope(path, **kw)
    if path.suffix in (".pt", ".pth"):
        if path.name == peers.DL_WEIGHTS and (path.parent / peers.DL_CFG).is_file():
            return peers.load_dictionary_learning(path.parent, **kw)
        sd = read_torch(path, "an OpenAI state dict")
        if isinstance(sd, dict) and "pre_bias" in sd and "encoder.weight" in sd:
            return peers.load_openai(path, sd, **kw)
        found = sorted(sd)[:8] if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"cannot tell the SAE format of {path}: it holds {found}; known formats: {KNOWN}")
    if path.parent != path and _folder_format(path.parent):
        return load(path.parent, hookpoint=hookpoint, **kw)
    raise ValueError(f"cannot tell the SAE format of the file {path}; known formats: {KNOWN}")


def load(path, *, hookpoint: str | None = None, dtype: torch.dtype | None = None, device=None) -> SAE | dict[str, SAE]:
    """The SAE saved at `path` (a folder or a file), in the matching class, in eval mode.

    A folder with one sparsify (or SAELens) subfolder per hookpoint gives {hookpoint: SAE}, or the SAE of
    `hookpoint`. dtype / device move the loaded weights. Unknown layouts raise ValueError naming the files
    found; unreadable files raise ValueError naming the file and the format expected.
    """
    path = Path(path)
    kw = {"dtype": dtype, "device": device}
    if not path.exists():
        raise FileNotFoundError(f"no SAE at {path}: the path does not exist")
    if path.is_file():
        return _load_file(path, hookpoint, **kw)
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
