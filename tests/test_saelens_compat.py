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


# The reverse direction: sae-lens 6.54.12 reads files written by our sae.save (fixtures/saelens_reads_ours) ------

OURS = Path(__file__).parent / "fixtures" / "saelens_reads_ours"
OURS_CASES = sorted(p.name for p in OURS.iterdir() if (p / "cfg.json").is_file())
# saelens_io name -> our io name: sae-lens's BatchTopK training classes select over the batch in encode (our
# training mode); their *_inference outputs are the JumpReLU form (our eval mode)
BATCH_NAMES = {"feature_acts": "feature_acts_train", "sae_out": "sae_out_train",
               "feature_acts_inference": "feature_acts", "sae_out_inference": "sae_out"}  # fmt: skip


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in OURS_CASES])
def test_saelens_reads_our_files(case, tmp_path):
    """sae-lens's outputs on our files (saelens_io) equal ours (io); and today's sae.save still writes exactly
    the layout sae-lens was shown to read (else rerun write_ours.py and make_fixtures.py --check-ours)."""
    folder = OURS / case
    ours, theirs = (st.load_file(str(folder / f)) for f in ("io.safetensors", "saelens_io.safetensors"))
    names = BATCH_NAMES if "feature_acts_train" in ours else {k: k for k in theirs if k != "x"}
    assert torch.equal(ours["x"], theirs["x"]) and names
    for their_name, our_name in names.items():
        assert_close(ours[our_name], theirs[their_name], torch.float32, f"{case}: {their_name}")
    sae.save(sae.load(folder), tmp_path / "again")
    assert (tmp_path / "again" / "cfg.json").read_text() == (folder / "cfg.json").read_text()
    again = st.load_file(str(tmp_path / "again" / "sae_weights.safetensors"))
    committed = st.load_file(str(folder / "sae_weights.safetensors"))
    assert again.keys() == committed.keys() and all(torch.equal(again[k], committed[k]) for k in again)


def test_saelens_reads_batchtopk_and_matryoshka():
    assert {"batchtopk", "matryoshka"} <= set(OURS_CASES)
