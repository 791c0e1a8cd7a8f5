"""bench.model: the static parts read from the committed profile, the baseline's replayed trips, the new kernel's
own counters (tiny shapes; `python -m bench.model` runs the reference range)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from bench import model
from kernels import backend

SOURCE = (Path(model.__file__).resolve().parents[1] / "kernels" / "topk_encode.py").read_text()


def test_static_parts_of_the_committed_profile():
    s = model.static_new(model._variant(model.STATIC / "profile.json", "topk_encode bf16 k=64"), SOURCE)
    assert 0 < s["trip"] < s["full_trip"] < s["common"] < s["merge"]
    assert s["BLOCK_N"] == 128


def test_baseline_replay_counts_entries_entering_the_top():
    """Rising columns: every entry of every tile enters the running top-KP, so each tile takes BLOCK_N trips
    (the KP-th key is beaten by all of them); falling columns: none after the first tile."""
    x = torch.ones(3, 1)
    rising = torch.arange(1, 513, dtype=torch.float32)[:, None]
    assert model.trips_old(16, x, rising, None)["trips_per_tile"] == 16
    falling = rising.flip(0)
    out = model.trips_old(16, x, falling, None)
    assert out["first_tiles"] == [16, 16, 16, 16] and out["trips_per_tile"] == 64 / 32


def test_new_kernel_counters():
    """The counters are read in the interpreter: where `kernels` was imported without it (`pytest bench`), in a
    process of its own."""
    if backend.INTERPRET:
        check_new_kernel_counters()
        return
    root = Path(__file__).resolve().parents[1]
    code = "from bench.test_model import check_new_kernel_counters as c; c()"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env, timeout=600)


def check_new_kernel_counters():
    """First tile: every entry qualifies (thresholds -inf), so each lane group appends BLOCK_N / 4 entries; the
    counters add up over the tiles."""
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    x, W, _ = model.gaussian(16, 512)
    t = model.trips_new(cfg, x, W, None)
    assert t["tiles"] == 32
    assert (t["trips_per_tile"] + t["full_trips_per_tile"]) * t["tiles"] >= 16 // 4
    assert t["merges_per_tile"] > 0
