"""Cost model of the fused TopK encoder's epilogue: `python -m bench.model` (writes bench/results/static/model.json).

Two halves, both measured, not assumed:
  static  SASS instructions per warp of each part of the tile loop, from the committed static profiles
          (tests/compile_check.py via `make compile-check`): today's kernel (baseline-41865da.json, the
          insertion loop of main at 41865da) and the new one (profile.json, threshold + candidate buffer).
  trips   how often each part runs per tile, at the reference split (one program's column range: 65536
          columns, BLOCK_M rows), on Gaussian pre-activations (d = 16: sums of 16 products). New kernel: its
          own constexpr-gated counters, the kernel run in the Triton interpreter at the GPU tile config.
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
REF_COLS = 65536  # one program's columns: n = 131072 over S = 2 splits (64 row blocks of 128 on 132 SMs)
KP = 64
D_SMALL = 16
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
    """Instructions per warp: the common tile, the append, one merge (its sort loop run BLOCK_M / MERGE_ROWS
    times), from the tile loop's per-line counts (library code counted at its call site)."""
    tile, sort = profile["loops"][0], profile["loops"][2]
    gemm_lines = sum(c for key, c in tile["lines"].items() if key.startswith("gemm.py"))
    start = _line_of(source, "if tl.max(tl.max(f, axis=1) - thr")
    merge_at = _line_of(source, "if tl.max(fill, axis=0) > BUF - BLOCK_N")
    end = _line_of(source, "merges += 1")
    merge_fn = (_line_of(source, "def _merge("), _line_of(source, "return tl.where(row_mask, thr"))
    append = _lines(tile, start + 1, merge_at - 1)
    merge = _lines(tile, merge_at, end) + _lines(tile, *merge_fn)
    common = tile["instructions"] - gemm_lines - append - merge
    trips = profile["constexprs"]["BLOCK_M"] // profile["constexprs"]["MERGE_ROWS"]
    return {"common": common, "append": append, "merge": merge + trips * sort["instructions"],
            "gemm_outside_k_loop": gemm_lines, "BLOCK_N": profile["constexprs"]["BLOCK_N"]}  # fmt: skip


def static_old(profile: dict) -> dict:
    tile, insert = profile["loops"][0], profile["loops"][2]
    gemm_lines = sum(c for key, c in tile["lines"].items() if key.startswith("gemm.py"))
    return {"common": tile["instructions"] - gemm_lines, "trip": insert["instructions"],
            "gemm_outside_k_loop": gemm_lines, "BLOCK_N": profile["constexprs"]["BLOCK_N"]}  # fmt: skip


def preactivations(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, D_SMALL, generator=g), torch.randn(cols, D_SMALL, generator=g) / D_SMALL**0.5


def trips_new(cfg: dict, cols: int, seed: int = 0) -> dict:
    """The new kernel's own counters (tiles, appends, merges) for one program over `cols` columns."""
    import importlib

    from bench.tune import launch_config

    topk_encode = importlib.import_module("kernels.topk_encode")
    x, W = preactivations(cfg["BLOCK_M"], cols, seed)
    stats = torch.zeros(0, dtype=torch.int32)
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    with launch_config("topk_encode", {k: cfg[k] for k in keys} | {"BLOCK_K": D_SMALL, "programs": 1}):
        topk_encode.topk_select_triton(x, W, None, KP, stats=stats)
    tiles, appended, merges = stats[0].tolist()
    return {"tiles": tiles, "append_per_tile": appended / tiles, "merges_per_tile": merges / tiles}


def trips_old(block_m: int, block_n: int, cols: int, seed: int = 0) -> dict:
    """Replay of today's insertion loop: per tile, trips = max over rows of the tile's entries that enter the
    row's top-KP (the loop inserts them one per trip; its first test is part of the tile)."""
    x, W = preactivations(block_m, cols, seed)
    f = torch.relu(x @ W.T)
    best = torch.full((block_m, KP), -1.0)
    trips = []
    for n0 in range(0, cols, block_n):
        tile = f[:, n0 : n0 + block_n]
        merged = torch.cat([best, tile], 1)  # ties: earlier (lower) columns first, as the keys order them
        top = torch.topk(merged, KP, dim=1, sorted=True, largest=True)
        # stable tie order: prefer lower positions (best before the tile, lower columns first)
        order = torch.sort(-merged, dim=1, stable=True).indices[:, :KP]
        trips.append(int((order >= KP).sum(1).max()))
        best = top.values
    return {"tiles": len(trips), "trips_per_tile": sum(trips) / len(trips), "first_tiles": trips[:4]}


def main() -> int:
    new_p = _variant(STATIC / "profile.json", "topk_encode bf16 k=64")
    old_p = _variant(STATIC / "baseline-41865da.json", "topk_encode bf16 k=64")
    source = (Path(__file__).resolve().parents[1] / "kernels" / "topk_encode.py").read_text()
    new_s, old_s = static_new(new_p, source), static_old(old_p)
    cfg = new_p["constexprs"] | {"num_warps": new_p["num_warps"], "num_stages": new_p["num_stages"]}
    new_t = trips_new(cfg, REF_COLS)
    old_t = trips_old(old_p["constexprs"]["BLOCK_M"], old_s["BLOCK_N"], REF_COLS)
    # Per warp per 128x128 output tile (the new kernel's tiles are 128 x BLOCK_N).
    per_old = (128 / old_s["BLOCK_N"]) * (old_s["common"] + old_t["trips_per_tile"] * old_s["trip"])
    per_new = (128 / new_s["BLOCK_N"]) * (
        new_s["common"] + new_t["append_per_tile"] * new_s["append"] + new_t["merges_per_tile"] * new_s["merge"]
    )
    result = {"reference": "B=8192 d=4096 n=131072 k=64 bf16, one program's 65536 columns, Gaussian"}
    for name, static, trips, per in (("baseline_41865da", old_s, old_t, per_old), ("new", new_s, new_t, per_new)):
        ratio = 2 * per / WGMMA_CYCLES
        result[name] = {"static": static, "trips": trips, "instructions_per_warp_per_128x128_tile": round(per),
                        "epilogue_over_wgmma": round(ratio, 3),
                        "encode_over_gemm": [round(m * (1 + ratio), 2) for m in MAINLOOP]}  # fmt: skip
    result["new_over_baseline"] = round(per_new / per_old, 3)
    (STATIC / "model.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
