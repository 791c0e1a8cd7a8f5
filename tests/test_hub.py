"""`sae.from_pretrained` offline: each test builds a local Hugging Face Hub cache (models--owner--name with
blobs/, refs/ and snapshots/, as huggingface_hub writes it) holding tiny SAEs in every supported format, and
SAELens release names resolve through a pretrained directory in SAELens's schema (tests/fixtures/hub)."""

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

import sae
from sae.hub import read_directory

FIXTURES = Path(__file__).parent / "fixtures"
DIRECTORY = FIXTURES / "hub" / "pretrained_saes.yaml"
D, N, K = 12, 40, 5


GEN = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=GEN)


def hub_cache(cache: Path, repo_id: str, src: Path, *, revision: str = "main") -> str:
    """Put every file under src into the cache as one commit of repo_id, with refs/<revision> pointing at it
    (snapshot files are links into blobs/, named by content hash, as huggingface_hub stores them)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in src.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in files) + revision.encode()).hexdigest()
    for p in files:
        data = p.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / p.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# One writer per format: (files under folder, the path inside the repo that from_pretrained is given).


def write_ours(folder):
    sae.save(sae.TopKSAE(D, N, K, normalize_activations="layer_norm"), folder)
    return folder


def write_saelens_fixture(folder):
    shutil.copytree(FIXTURES / "saelens" / "jumprelu_transcoder", folder)
    return folder


def write_sparsify(folder):
    folder.mkdir(parents=True)
    t = {"encoder.weight": rand(N, D), "encoder.bias": rand(N), "W_dec": rand(N, D), "b_dec": rand(D)}
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"k": K, "d_in": D, "num_latents": N, "transcode": False}))
    return folder


def write_dictionary_learning(folder):
    folder.mkdir(parents=True)
    sd = {"encoder.weight": rand(N, D), "encoder.bias": rand(N), "decoder.weight": rand(D, N), "b_dec": rand(D),
          "k": torch.tensor(K)}  # fmt: skip
    torch.save(sd, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK"}}))
    return folder


def write_gemma_scope(folder):
    folder.mkdir(parents=True)
    p = {"W_enc": rand(D, N), "W_dec": rand(N, D), "b_enc": rand(N), "b_dec": rand(D), "threshold": rand(N).abs()}
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in p.items()})
    return folder


def write_openai(folder):
    folder.mkdir(parents=True)
    sd = {"pre_bias": rand(D), "encoder.weight": rand(N, D), "latent_bias": rand(N), "decoder.weight": rand(D, N),
          "activation": "ReLU"}  # fmt: skip
    torch.save(sd, folder / "ae_12.pt")
    return folder / "ae_12.pt"


WRITERS = {
    "saelens-ours": write_ours,
    "saelens-fixture": write_saelens_fixture,
    "sparsify": write_sparsify,
    "dictionary_learning": write_dictionary_learning,
    "gemma_scope": write_gemma_scope,
    "openai": write_openai,
}


def same_sae(a, b):
    assert type(a) is type(b) and a.config() == b.config()
    x = rand(9, a.d_in)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_repo_and_path_in_every_format(tmp_path, offline, fmt):
    src = tmp_path / "src"
    local = WRITERS[fmt](src / "layer_3" / fmt)
    write_ours(src / "layer_4" / "other")  # another SAE in the same repo
    hub_cache(tmp_path / "cache", "someone/tiny-saes", src)
    path = str(local.relative_to(src))
    model = sae.from_pretrained("someone/tiny-saes", path, cache_dir=tmp_path / "cache")
    same_sae(model, sae.load(local))
    assert not model.training


def test_revision_branch_tag_and_commit(tmp_path, offline):
    old, new = tmp_path / "old", tmp_path / "new"
    write_ours(old / "sae")
    write_ours(new / "sae")
    cache = tmp_path / "cache"
    c_old = hub_cache(cache, "someone/evolving", old, revision="v1")
    hub_cache(cache, "someone/evolving", new)  # main
    for revision, src in ((None, new), ("main", new), ("v1", old), (c_old, old)):
        model = sae.from_pretrained("someone/evolving", "sae", revision=revision, cache_dir=cache)
        same_sae(model, sae.load(src / "sae"))


def test_local_files_only_without_the_env(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    write_ours(tmp_path / "src" / "sae")
    hub_cache(tmp_path / "cache", "someone/x", tmp_path / "src")
    model = sae.from_pretrained("someone/x", "sae", cache_dir=tmp_path / "cache", local_files_only=True)
    same_sae(model, sae.load(tmp_path / "src" / "sae"))


def test_missing_repo_path_and_revision_are_named(tmp_path, offline):
    write_ours(tmp_path / "src" / "sae")
    cache = tmp_path / "cache"
    hub_cache(cache, "someone/x", tmp_path / "src")
    with pytest.raises(FileNotFoundError, match=r"repo_id='someone/absent' at revision='main' .*HF_HUB_OFFLINE"):
        sae.from_pretrained("someone/absent", "sae", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"revision='v9'"):
        sae.from_pretrained("someone/x", "sae", revision="v9", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"someone/x@main has no 'layer_9'.*sae/cfg.json"):
        sae.from_pretrained("someone/x", "layer_9", cache_dir=cache)


def test_local_folder(tmp_path):
    write_ours(tmp_path / "sae")
    same_sae(sae.from_pretrained(str(tmp_path), "sae"), sae.load(tmp_path / "sae"))


# SAELens release names --------------------------------------------------------------------------------


def release_caches(cache: Path, src: Path) -> dict:
    """The fixture directory's SAEs, written at their paths in their repos. Returns {(release, id): folder}."""
    out = {}
    writers = {"gemma_2": write_gemma_scope, None: write_ours, "sparsify": write_sparsify}
    for name, release in read_directory(DIRECTORY).items():
        root = src / release.repo_id
        for sae_id, path in release.saes.items():
            out[name, sae_id] = writers[release.conversion_func](root / path)
        hub_cache(cache, release.repo_id, root)
    return out


def check_releases(cache, written, **kw):
    for (name, sae_id), folder in written.items():
        model = sae.from_pretrained(name, sae_id, cache_dir=cache, **kw)
        ref = sae.load(folder)
        if sae_id == "blocks.1.hook_resid_pre":  # norm_scaling_factor 2.5: the inputs were scaled by it
            ref.act_scale = 2.5
            assert model.act_scale == 1.0  # folded into the weights
            x = rand(9, D)
            torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
        else:
            same_sae(model, ref)


def test_release_names_through_a_directory_file(tmp_path, offline):
    written = release_caches(tmp_path / "cache", tmp_path / "src")
    assert ("gemma-scope-2b-pt-res", "layer_0/width_16k/average_l0_105") in written
    check_releases(tmp_path / "cache", written, directory=DIRECTORY)


def fake_sae_lens(monkeypatch):
    """sae_lens.loading.pretrained_saes_directory with SAELens's lookup fields, read from the fixture."""

    @dataclasses.dataclass
    class PretrainedSAELookup:  # the fields of SAELens's own class
        release: str
        repo_id: str
        model: str
        conversion_func: str | None
        saes_map: dict
        expected_var_explained: dict
        expected_l0: dict
        neuronpedia_id: dict
        norm_scaling_factor: dict
        config_overrides: dict | None

    def get_pretrained_saes_directory():
        out = {}
        for name, v in yaml.safe_load(DIRECTORY.read_text()).items():
            s = v["saes"]
            out[name] = PretrainedSAELookup(
                name, v["repo_id"], v["model"], v.get("conversion_func"), {e["id"]: e["path"] for e in s},
                {e["id"]: e.get("variance_explained", 1.0) for e in s}, {e["id"]: e.get("l0", 0.0) for e in s},
                {e["id"]: e.get("neuronpedia") for e in s},
                {e["id"]: e["norm_scaling_factor"] for e in s if "norm_scaling_factor" in e},
                v.get("config_overrides"),
            )  # fmt: skip
        return out

    names = ["sae_lens", "sae_lens.loading", "sae_lens.loading.pretrained_saes_directory"]
    mods = [types.ModuleType(n) for n in names]
    mods[2].get_pretrained_saes_directory = get_pretrained_saes_directory
    for n, m in zip(names, mods):
        monkeypatch.setitem(sys.modules, n, m)


def test_release_names_through_sae_lens(tmp_path, offline, monkeypatch):
    fake_sae_lens(monkeypatch)
    check_releases(tmp_path / "cache", release_caches(tmp_path / "cache", tmp_path / "src"))
    with pytest.raises(ValueError, match=r"neither a Hub repo id .* closest: \['gemma-scope-2b-pt-res'\]"):
        sae.from_pretrained("gemma-scope-2b-pt-re")


def test_release_without_sae_lens_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # import fails
    with pytest.raises(ValueError, match="release names need .*pip install sae-lens"):
        sae.from_pretrained("gemma-scope-2b-pt-res", "layer_0/width_16k/average_l0_105")


def test_release_sae_ids_are_checked():
    with pytest.raises(ValueError, match=r"needs an sae_id; e.g. \['layer_0/width_16k/average_l0_105'"):
        sae.from_pretrained("gemma-scope-2b-pt-res", directory=DIRECTORY)
    with pytest.raises(ValueError, match=r"has no sae_id 'layer_0/width_16k/average_l0_10'.*average_l0_105"):
        sae.from_pretrained("gemma-scope-2b-pt-res", "layer_0/width_16k/average_l0_10", directory=DIRECTORY)
