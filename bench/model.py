"""Cost model of the fused TopK encoder's epilogue: `python -m bench.model` (writes bench/results/static/model.json).

Two halves, both measured, not assumed:
  static  SASS instructions per warp of each part of the tile loop, from the committed static profiles
          (tests/compile_check.py via `make compile-check`): today's kernel (baseline-41865da.json, the
          insertion loop of main at 41865da) and the new one (profile.json, bit masks + append trips +
          candidate merges).
  trips   how often each part runs per tile over one program's column range (BLOCK_M rows): the new kernel at
          the split its launcher plans at the reference shape on an H100 (16384 columns: 8 splits, so that
          each round's group of x stays in L2), the baseline at its own (65536: 2 splits) and at the new one,
          on two kinds of pre-activations: Gaussian (d = 16: sums of 16 products) and those of a trained
          TopK SAE (65536 latents, k = 64, d = 64, trained for a few hundred steps on sae.synthetic
          activations; its first latents for the shorter range; its quality is in the JSON). New kernel: its own
          constexpr-gated counters, the kernel run in the Triton interpreter at the GPU tile config.
          Baseline: a replay of its loop in PyTorch (per tile, the insertion loop runs max over rows of the
          entries that enter the row's top-KP, plus the final test).
Prediction: epilogue cycles per 128x128 tile of output (8 warps on 4 schedulers: 2 issue cycles per warp
instruction, nothing overlapped) against the tile's wgmma cycles (128 x 128 x 4096 bf16 at 4096 dense
FLOP per SM per cycle); encode / GEMM = main-loop ratio x (1 + epilogue / wgmma).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels (triton.jit) is imported

import torch  # noqa: E402

STATIC = Path(__file__).resolve().parent / "results" / "static"
REF = {"B": 8192, "n": 131072, "d": 4096}
BASELINE_COLS = 65536  # 41865da's split of n = 131072: 64 row blocks of 128 x 2 splits on 132 SMs
H100_SMS = 132
KP = 64
D_SMALL = 16
SAE_D, SAE_STEPS, SAE_BATCH, SAE_LR = 64, 400, 512, 2e-3  # the trained SAE (~30 s on 2 cores)
MAINLOOP = (1.2, 1.35)  # the pointer cp.async main loop against cuBLAS (issue 14, item 6; not yet measured)
WGMMA_CYCLES = 128 * 128 * 4096 * 2 / 4096  # one 128x128 output tile at d = 4096, bf16 dense


def _variant(path: Path, label: str) -> dict:
    rows = json.loads(path.read_text())["variants"]
    return next(v for v in rows if v["label"] == label)


def _lines(loop: dict, lo: int, hi: int, file: str = "topk_encode.py") -> int:
    return sum(
        c for key, c in loop["lines"].items() if key.startswith(file + ":") and lo <= int(key.split(":")[1]) <= hi
    )


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def static_new(profile: dict, source: str) -> dict:
    """Instructions per warp of the new kernel's parts, from its SASS loops and their per-line counts (library
    code counted at its call site): the common tile (the tile loop less the GEMM's per-tile code), one append
    trip, one trip of a tile where a lane group may fill up (its merge check, without the merge), and one merge
    (the lines of _merge and its sort, inlined in that loop; the final merge after the tile loop is the same
    code)."""
    merge_lines = (_line_of(source, "def _compare_swap("), _line_of(source, "def _by_lane(") - 1)
    append_line = _line_of(source, "low = mask & -mask")
    tile_line = _line_of(source, "for n0 in range(col_lo, col_hi, BLOCK_N):")
    tile = next(lp for lp in profile["loops"] if lp["source"] == f"topk_encode.py:{tile_line}")
    common_trip, full_trip = sorted(
        (lp for lp in profile["loops"] if f"topk_encode.py:{append_line}" in lp["lines"]),
        key=lambda lp: lp["instructions"],
    )
    merge = _lines(full_trip, *merge_lines)
    gemm_lines = sum(c for key, c in tile["lines"].items() if key.startswith("gemm.py"))
    return {"common": tile["instructions"] - gemm_lines, "trip": common_trip["instructions"],
            "full_trip": full_trip["instructions"] - merge, "merge": merge, "gemm_outside_k_loop": gemm_lines,
            "BLOCK_N": profile["constexprs"]["BLOCK_N"]}  # fmt: skip


def static_old(profile: dict) -> dict:
    tile, insert = profile["loops"][0], profile["loops"][2]
    gemm_lines = sum(c for key, c in tile["lines"].items() if key.startswith("gemm.py"))
    return {"common": tile["instructions"] - gemm_lines, "trip": insert["instructions"],
            "gemm_outside_k_loop": gemm_lines, "BLOCK_N": profile["constexprs"]["BLOCK_N"]}  # fmt: skip


def gaussian(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, None]:
    """(x [rows, D_SMALL], W [cols, D_SMALL], no bias): x W^T has unit-variance Gaussian entries."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, D_SMALL, generator=g), torch.randn(cols, D_SMALL, generator=g) / D_SMALL**0.5, None


def trained_sae(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """A TopK SAE with `cols` latents and k = KP trained briefly on synthetic activations (d = SAE_D, 2048 true
    features, 32 active per token) -> (centred normalised inputs [rows, d] of fresh tokens, W_enc, b_enc, its
    evaluation): the encoder's inputs as the kernel sees them."""
    from sae.synthetic import SyntheticActivations, SyntheticSource
    from sae.topk import TopKSAE
    from sae.trainer import TrainConfig, Trainer

    torch.manual_seed(seed)
    gen = SyntheticActivations(SAE_D, 2048, 32, correlation=0.2, noise=0.05, seed=seed)
    model = TopKSAE(SAE_D, cols, KP)
    cfg = TrainConfig(steps=SAE_STEPS, lr=SAE_LR, lr_warmup_steps=10, stats_tokens=1024, eval_tokens=1024,
                      checkpoint_every=0, log_every=SAE_STEPS, progress=False, seed=seed)  # fmt: skip
    out = Trainer(model, SyntheticSource(gen, SAE_BATCH, seed=seed), cfg).fit()
    with torch.no_grad():
        x = model.normalize(gen.sample(rows, torch.Generator().manual_seed(seed + 1))[0])
        W, b, _ = model._weights()
        centre = model._centre()
        x = x if centre is None else x - centre
    quality = {k: round(float(out["eval"][k]), 4) for k in ("fvu", "l0", "dead_fraction_train")}
    return x, W.detach(), b.detach(), {"steps": SAE_STEPS, "d": SAE_D, "latents": cols} | quality


def trips_new(cfg: dict, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> dict:
    """The new kernel's own counters (tiles, append trips, trips of filling tiles, merges) for one program:
    x [BLOCK_M, d] against all of W [cols, d]."""
    import importlib

    from bench.tune import launch_config

    topk_encode = importlib.import_module("kernels.topk_encode")
    stats = torch.zeros(0, dtype=torch.int32)
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    with launch_config("topk_encode", {k: cfg[k] for k in keys} | {"BLOCK_K": 16, "programs": 1}):
        topk_encode.topk_select_triton(x, W, b, KP, stats=stats)
    tiles, trips, full_trips, merges = stats[0].tolist()
    return {"tiles": tiles, "trips_per_tile": trips / tiles, "full_trips_per_tile": full_trips / tiles,
            "merges_per_tile": merges / tiles}  # fmt: skip


def trips_old(block_n: int, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> dict:
    """Replay of today's insertion loop: per tile, trips = max over rows of the tile's entries that enter the
    row's top-KP (the loop inserts them one per trip; its first test is part of the tile)."""
    f = torch.relu(x @ W.T + (0 if b is None else b))
    best = torch.full((x.shape[0], KP), -1.0)
    trips = []
    for n0 in range(0, W.shape[0], block_n):
        merged = torch.cat([best, f[:, n0 : n0 + block_n]], 1)  # ties: earlier (lower) columns first
        order = torch.sort(-merged, dim=1, stable=True).indices[:, :KP]  # stable: lower positions first
        trips.append(int((order >= KP).sum(1).max()))
        best = merged.gather(1, order)
    return {"tiles": len(trips), "trips_per_tile": sum(trips) / len(trips), "first_tiles": trips[:4]}


def planned_cols() -> int:
    """One program's columns at the reference shape: the launcher's plan with the H100's config (132 SMs, its
    L2), as the compile check captures it."""
    import importlib

    from kernels import gemm, tuning

    topk_encode = importlib.import_module("kernels.topk_encode")
    saved = tuning._device_key, gemm.num_sms
    tuning._device_key, gemm.num_sms = (lambda op: "default"), (lambda device: H100_SMS)
    try:
        cfg = topk_encode.plan(REF["B"], REF["n"], REF["d"], KP, torch.device("meta"), torch.bfloat16)
    finally:
        tuning._device_key, gemm.num_sms = saved
    return cfg["cols_per_split"]


def _per_tile(s: dict, t: dict) -> float:
    """Instructions per warp per 128x128 output tile (the kernels' tiles are 128 x BLOCK_N)."""
    per = s["common"] + t["trips_per_tile"] * s["trip"]
    if "merge" in s:  # the new kernel: trips of filling tiles, merges, the final merge
        per += t["full_trips_per_tile"] * s["full_trip"] + t["merges_per_tile"] * s["merge"] + s["merge"] / t["tiles"]
    return (128 / s["BLOCK_N"]) * per


def predict(old_s: dict, new_s: dict, old_t: dict, old_same: dict, new_t: dict) -> dict:
    """The epilogue's instructions per tile and its cycles against the tile's wgmma cycles, encode / GEMM for the
    main-loop range: the baseline at its split (old_t) and at the new one (old_same), the new kernel (new_t)."""
    out = {}
    for name, s, trips in (("baseline_41865da", old_s, old_t), ("baseline_41865da_at_new_split", old_s, old_same),
                           ("new", new_s, new_t)):  # fmt: skip
        per = _per_tile(s, trips)
        ratio = 2 * per / WGMMA_CYCLES
        out[name] = {"trips": trips, "instructions_per_warp_per_128x128_tile": round(per),
                     "epilogue_over_wgmma": round(ratio, 3),
                     "encode_over_gemm": [round(m * (1 + ratio), 2) for m in MAINLOOP]}  # fmt: skip
    # The epilogue's design at one split, and the shipped kernels (each at its own split).
    out["new_over_baseline_same_split"] = round(_per_tile(new_s, new_t) / _per_tile(old_s, old_same), 3)
    out["new_over_baseline_each_at_its_split"] = round(_per_tile(new_s, new_t) / _per_tile(old_s, old_t), 3)
    return out


def main() -> int:
    new_p = _variant(STATIC / "profile.json", "topk_encode bf16 k=64")
    old_p = _variant(STATIC / "baseline-41865da.json", "topk_encode bf16 k=64")
    source = (Path(__file__).resolve().parents[1] / "kernels" / "topk_encode.py").read_text()
    new_s, old_s = static_new(new_p, source), static_old(old_p)
    cfg = new_p["constexprs"] | {"num_warps": new_p["num_warps"], "num_stages": new_p["num_stages"]}
    rows, cols = cfg["BLOCK_M"], planned_cols()
    x, W, b, quality = trained_sae(rows, BASELINE_COLS)
    result = {"reference": "B=8192 d=4096 n=131072 k=64 bf16, one program's columns",
              "columns": {"baseline_41865da": BASELINE_COLS, "new": cols},
              "static": {"baseline_41865da": old_s, "new": new_s}}  # fmt: skip
    for name, inputs in (("gaussian", gaussian(rows, BASELINE_COLS)), ("trained_sae", (x, W, b))):
        x, W, b = inputs
        short = (x, W[:cols], None if b is None else b[:cols])  # the first `cols` latents
        old_t, old_same = trips_old(old_s["BLOCK_N"], x, W, b), trips_old(old_s["BLOCK_N"], *short)
        result[name] = predict(old_s, new_s, old_t, old_same, trips_new(cfg, *short))
    result["trained_sae"]["sae"] = quality
    (STATIC / "model.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
