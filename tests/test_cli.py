"""`python -m sae`: every flag explained, one set of defaults, and errors a newcomer can act on."""

import dataclasses
import warnings

import pytest
import torch
from helpers import word_tokenizer

import sae
from sae.__main__ import TRAIN_DEFAULTS, build_parser, main
from sae.data import TensorSource
from sae.registry import ARCHITECTURES
from sae.trainer import TrainConfig, Trainer


@pytest.mark.parametrize("command", ["train", "harvest"])
def test_every_flag_has_help(command):
    actions = [a for a in build_parser()[1][command]._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 10
    for a in actions:
        text = (a.help or "").split("(default")[0].strip()
        assert len(text) > 8, f"{a.option_strings[0]} has no help text"


def test_cli_defaults_are_trainconfigs():
    for f in dataclasses.fields(TrainConfig):
        assert TRAIN_DEFAULTS[f.name] == getattr(TrainConfig(), f.name), f.name
    assert TRAIN_DEFAULTS["arch"] in ARCHITECTURES


def test_default_dead_window_fits_the_run():
    """AuxK's dead window is a quarter of a default run's tokens (at most 10M), so AuxK can switch on."""
    cfg = TrainConfig(progress=False)
    trainer = Trainer(sae.TopKSAE(8, 32, 2), TensorSource(torch.randn(64, 8), 1024), cfg)
    assert trainer.dead_tokens == cfg.steps * 1024 // 4
    long = Trainer(sae.TopKSAE(8, 32, 2), TensorSource(torch.randn(64, 8), 8192), TrainConfig(steps=10**4))
    assert long.dead_tokens == 10_000_000


@pytest.fixture
def tiny_hf_model(tmp_path):
    """A GPT-2 and a word-level tokenizer (model_max_length 16) saved locally: no hub."""
    transformers = pytest.importorskip("transformers")
    words = [f"w{i}" for i in range(60)]
    fast = word_tokenizer(words, eos_token="[EOS]")
    config = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=2, n_head=2)
    folder = tmp_path / "model"
    transformers.GPT2Model(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(words[(7 * j + i) % 60] for i in range(200)) for j in range(4)))
    return folder, text


def test_harvest_wrong_module_is_one_line_with_suggestions(tiny_hf_model, tmp_path):
    folder, text = tiny_hf_model
    with pytest.raises(SystemExit) as e:
        main(["harvest", "--model", str(folder), "--module", "layers.1", "--text", str(text)])
    msg = str(e.value)
    assert msg.startswith("error: --module") and "\n" not in msg and "h.1" in msg


def test_harvest_prints_no_library_warnings(tiny_hf_model, tmp_path, capfd):
    """Texts longer than the tokenizer's model_max_length are cut into windows: no warning about it, nor
    about deprecated arguments, reaches the user."""
    folder, text = tiny_hf_model
    out = tmp_path / "acts"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        main(["harvest", "--model", str(folder), "--module", "h.0", "--text", str(text), "--out-dir", str(out),
              "--context", "8", "--batch-size", "4", "--shard-tokens", "64"])  # fmt: skip
    err = capfd.readouterr().err
    assert "longer than" not in err and "deprecated" not in err, err
    assert sorted(p.name for p in out.iterdir())[0] == "shard-00000.safetensors"
