"""sae-lens 6.54.12 is the oracle for the SAELens format: every folder under tests/fixtures/saelens was written by
sae-lens's own classes and savers (make_fixtures.py, README.md there), with sae-lens's outputs on fixed inputs.
sae.load must give the same outputs, or refuse what it cannot honour with an error naming the config field."""

from pathlib import Path

import pytest
import torch
from helpers import assert_close

import sae

st = pytest.importorskip("safetensors.torch")

FIXTURES = Path(__file__).parent / "fixtures" / "saelens"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "cfg.json").is_file())
REFUSED = {"norm_covariance_whitening": "normalize_activations"}  # case -> the field the error must name
# sae-lens's BatchTopK training classes select over the batch in encode (eval mode too); their io also holds the
# outputs of the exported JumpReLU form (*_inference), which a loaded model in eval mode must reproduce
BATCH = ("batchtopk_training", "matryoshka_training")
# a trainer's checkpoint loads as the class that can go on training
TRAINING_CLASS = {
    "topk_training": "TopKSAE",
    "batchtopk_training": "BatchTopKSAE",
    "matryoshka_training": "MatryoshkaSAE",
    "jumprelu_training": "JumpReLUSAE",
}


def io(case: str) -> dict:
    return st.load_file(str(FIXTURES / case / "io.safetensors"))


def check(model, t: dict, case: str, suffix: str = "") -> None:
    """model(x) vs sae_out and model.encode(x) (dense [B, d_sae]) vs feature_acts, both fp32 under 1e-5."""
    x, acts, out = t["x"], t["feature_acts" + suffix], t["sae_out" + suffix]
    with torch.no_grad():
        got_out, got_acts = model(x), model.encode(x)
    assert tuple(got_out.shape) == tuple(out.shape), f"{case}: sae_out shape {tuple(got_out.shape)}"
    assert tuple(got_acts.shape) == tuple(acts.shape), f"{case}: feature_acts shape {tuple(got_acts.shape)}"
    assert_close(got_out, out, torch.float32, f"{case}: sae_out{suffix}")
    assert_close(got_acts, acts, torch.float32, f"{case}: feature_acts{suffix}")


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in CASES if c not in REFUSED])
def test_outputs_match_saelens(case):
    t = io(case)
    model = sae.load(FIXTURES / case)
    if case in BATCH:
        check(model, t, case, "_inference")  # eval mode: the global threshold, as sae-lens's exported JumpReLU
        model.train()
        check(model, t, case)  # training mode: selection over the batch, as sae-lens's encode
    else:
        check(model, t, case)


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in REFUSED])
def test_refuses_what_it_cannot_honour(case):
    with pytest.raises(ValueError, match=REFUSED[case]):
        sae.load(FIXTURES / case)


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in TRAINING_CLASS])
def test_training_checkpoint_keeps_its_class(case):
    assert type(sae.load(FIXTURES / case)) is getattr(sae, TRAINING_CLASS[case])


def test_every_fixture_is_checked():
    assert len(CASES) >= 23 and all((FIXTURES / c / "io.safetensors").is_file() for c in CASES)
