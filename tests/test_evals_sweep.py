"""The L0 sweep ("Sparse but Wrong") on synthetic ground truth whose true L0 is known and off the sweep's grid."""

import json

import pytest
import torch

from sae.__main__ import main
from sae.evals import l0_sweep, pointed_l0
from sae.synthetic import SyntheticActivations, SyntheticSource
from sae.trainer import TrainConfig

GRID = (3, 4, 6, 8, 11)


@pytest.mark.parametrize("true_l0", [5, 7])
def test_sweep_finds_the_true_l0_off_the_grid(true_l0, one_thread):
    """Exactly `true_l0` of 32 orthogonal, correlated features per token; k swept over a grid without it: the
    c_dec proxy (the reported one) and the n-th decoder projection both point within 20% of the true L0."""
    assert true_l0 not in GRID
    gen = SyntheticActivations(32, 32, true_l0, correlation=0.4, exact_l0=True, orthogonal=True, seed=1)
    cfg = TrainConfig(steps=400, lr=3e-3, lr_warmup_steps=20, progress=False)
    out = l0_sweep(SyntheticSource(gen, 256), GRID, d_sae=32, config=cfg, nth=8)
    assert [r["l0"] for r in out["runs"]] == pytest.approx(GRID, rel=1e-3)  # TopK: L0 = k (a few rows < k positive)
    assert out["proxy"] == "c_dec" and not out["at_edge"]
    assert abs(out["l0"] - true_l0) / true_l0 < 0.2, out
    assert abs(out["l0_nth_projection"] - true_l0) / true_l0 < 0.2, out


def test_pointed_l0():
    """The vertex of the parabola through the minimum and its neighbours in log L0; the edge is flagged."""
    l0s = [2, 4, 8, 16]
    assert pointed_l0(l0s, [(torch.tensor(v).log2().item() - 2.5) ** 2 for v in l0s]) == pytest.approx((2**2.5, False))
    assert pointed_l0(l0s, [1, 2, 3, 4]) == (2, True)
    assert pointed_l0(l0s, [4, 3, 2, 1]) == (16, True)
    with pytest.raises(ValueError, match="at least 3"):
        pointed_l0([1, 2], [0, 1])


def test_l0_sweep_cli(tmp_path, one_thread, capsys):
    out = tmp_path / "sweep"
    main(["l0-sweep", "--values", "[2, 3, 5]", "--steps", "30", "--synthetic-d", "8", "--synthetic-features", "8",
          "--synthetic-l0", "3", "--eval-tokens", "256", "--batch-size", "64", "--out-dir", str(out)])  # fmt: skip
    result = json.loads((out / "sweep.json").read_text())
    assert [r["value"] for r in result["runs"]] == [2, 3, 5] and result["param"] == "k"
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "points at L0" in (out / "sweep.md").read_text() and "points at L0" in capsys.readouterr().out


def test_l0_sweep_cli_errors_name_the_flag():
    for args, flag in (
        (["--arch", "nope"], "--arch"),
        (["--proxy", "l1"], "--proxy"),
        (["--values", "[2, 4]"], "--values"),
    ):
        with pytest.raises(SystemExit, match=f"error: {flag}"):
            main(["l0-sweep", *args])
