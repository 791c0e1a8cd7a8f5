"""SAEs by name: a Hugging Face Hub repo id plus a path inside it, or a SAELens release name.

    sae.from_pretrained("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71")
    sae.from_pretrained("gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71")   # SAELens release

Files come through `huggingface_hub.snapshot_download` (only the files under the path), so its cache
(HF_HUB_CACHE / HF_HOME, or cache_dir), `revision` (branch, tag or commit) and offline mode (HF_HUB_OFFLINE=1,
or local_files_only=True: the cache alone, no network) work as in every Hugging Face library; the folder or
file is then read by `sae.load`, which detects the format (SAELens, sparsify, dictionary_learning, Gemma
Scope, OpenAI).

A release name is looked up in SAELens's pretrained directory (`get_pretrained_saes_directory()`, when
sae-lens is installed) or in `directory`, a YAML file in the schema of SAELens's pretrained_saes.yaml:

    <release>:
      repo_id: <owner/name>
      conversion_func: <null | gemma_2 | sparsify | ...>   (informative: the files' format is detected)
      saes:
      - id: <sae_id>
        path: <path inside the repo>
        norm_scaling_factor: <float>   (optional: inputs are scaled by it; folded into the weights, as SAELens does)
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path

import torch

from .base import SAE
from .formats import load

SAELENS_HINT = "pip install sae-lens, or pass directory= (a YAML file in the schema of SAELens's pretrained_saes.yaml)"


@dataclasses.dataclass
class Release:
    """One entry of a pretrained directory: where its SAEs live and how their inputs were scaled."""

    name: str
    repo_id: str
    saes: dict[str, str]  # sae_id -> path inside the repo
    norm_scaling_factor: dict[str, float]
    conversion_func: str | None = None


def read_directory(path: str | os.PathLike) -> dict[str, Release]:
    """The releases of a YAML file in the schema of SAELens's pretrained_saes.yaml."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"directory={str(path)!r}: not a readable YAML file: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"directory={str(path)!r}: expected a mapping of release names, got {type(data).__name__}")
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or "repo_id" not in entry or "saes" not in entry:
            raise ValueError(f"directory={str(path)!r}: release {name!r} needs 'repo_id' and 'saes'")
        saes = {s["id"]: s["path"] for s in entry["saes"]}
        norms = {s["id"]: float(s["norm_scaling_factor"]) for s in entry["saes"] if "norm_scaling_factor" in s}
        out[name] = Release(name, entry["repo_id"], saes, norms, entry.get("conversion_func"))
    return out


def saelens_directory() -> dict[str, Release] | None:
    """SAELens's own pretrained directory, or None when sae-lens is not installed."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        return None
    return {
        name: Release(
            name,
            e.repo_id,
            dict(e.saes_map),
            dict(getattr(e, "norm_scaling_factor", None) or {}),
            getattr(e, "conversion_func", None),
        )
        for name, e in get_pretrained_saes_directory().items()
    }


def _release(name: str, directory) -> Release | None:
    """The release called `name`, None for a repo id; ValueError for a name that is neither."""
    releases = read_directory(directory) if directory is not None else saelens_directory()
    if releases is not None and name in releases:
        return releases[name]
    if "/" in name:
        return None
    if releases is None:
        raise ValueError(
            f"{name!r} is not a Hub repo id (owner/name), and SAELens release names need SAELens's pretrained "
            f"directory: {SAELENS_HINT}"
        )
    close = difflib.get_close_matches(name, list(releases), n=5)
    raise ValueError(f"{name!r} is neither a Hub repo id (owner/name) nor a known release; closest: {close}")


def _sae_path(release: Release, sae_id: str | None) -> str:
    if sae_id in release.saes:
        return release.saes[sae_id]
    ids = list(release.saes)
    close = difflib.get_close_matches(sae_id, ids, n=5) if sae_id else ids[:5]
    what = "needs an sae_id" if sae_id is None else f"has no sae_id {sae_id!r}"
    raise ValueError(f"release {release.name!r} {what}; e.g. {close} ({len(ids)} ids)")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def download(
    repo_id: str,
    path: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local copy of `path` (a folder or a file; None: the whole repo) in the Hub repo `repo_id`."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:
        raise ImportError("loading from the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub") from e
    path = path.strip("/") if path else None
    offline = local_files_only or _offline()
    try:
        root = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=None if path is None else [path, f"{path}/*"],
            local_files_only=offline,
        )
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:
        where = "the cache" + (f" {cache_dir}" if cache_dir else "") + (" (HF_HUB_OFFLINE is set)" if offline else "")
        raise FileNotFoundError(
            f"repo_id={repo_id!r} at revision={revision or 'main'!r} is not in {where} and could not be fetched: {e}"
        ) from e
    local = Path(root) / path if path else Path(root)
    if not local.exists():
        found = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())[:10]
        raise FileNotFoundError(f"{repo_id}@{revision or 'main'} has no {path!r}; it holds e.g. {found}")
    return local


def from_pretrained(
    name: str,
    sae_id: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    directory: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device=None,
) -> SAE | dict[str, SAE]:
    """The SAE `sae_id` of `name`, in eval mode (as `sae.load` gives it).

    name: a SAELens release name (sae_id: its SAE id), a Hub repo id "owner/name" (sae_id: a folder or file
    inside the repo, None for the repo's root) or a local folder. revision, cache_dir, local_files_only: as in
    huggingface_hub (HF_HUB_OFFLINE=1 also keeps to the cache). directory: a YAML file of releases in SAELens's
    schema (default: SAELens's own directory, when sae-lens is installed). dtype / device move the weights.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a release name, a repo id or a folder, got {name!r}")
    if Path(name).is_dir():
        return load(Path(name) / (sae_id or ""), dtype=dtype, device=device)
    release = _release(name, directory)
    repo_id, path = (name, sae_id) if release is None else (release.repo_id, _sae_path(release, sae_id))
    local = download(repo_id, path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    try:
        model = load(local, dtype=dtype, device=device)
    except ValueError as e:
        fmt = f" (its conversion_func is {release.conversion_func!r})" if release and release.conversion_func else ""
        raise ValueError(f"{name} {sae_id or ''}{fmt}: {e}") from e
    factor = release.norm_scaling_factor.get(sae_id) if release is not None else None
    if factor is not None:  # the release's inputs were scaled by it: fold it in, as SAELens does
        model.act_scale *= factor
        model.fold_act_scale()
        if model.normalize_activations == "expected_average_only_in":
            model.normalize_activations = "none"
    return model
