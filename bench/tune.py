"""Tile sweep of the fused encoders on the GPU at hand: `python -m bench.tune`.

For each candidate launch config of an encoder (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs per
SM) it runs the op at one shape, checks its selection against the memory-bounded PyTorch path, times it
and prints its time over the cuBLAS GEMM of the same shape. The winners go into kernels/configs/*.json by
hand. Everything a lease needs is one call: `python -m bench.tune --op topk_encode --results-dir $OUT`.

On a machine without CUDA it runs only with TRITON_INTERPRET=1 (the interpreter, tiny shapes), which is
how the tests keep it working.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path

import torch

import kernels
from kernels import backend, tuning

from . import measure


def _configs(tiles) -> list[dict]:
    """Launch configs from (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); one resident program per SM."""
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    return [dict(zip(keys, t), waves=1) for t in tiles]


# Candidates for the GPU; each is tried as given (kernels/configs holds the current choice).
CANDIDATES = {
    "topk_encode": _configs([
        (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 8, 3), (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 3), (64, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3),
        (128, 128, 32, 8, 4), (256, 64, 64, 8, 3),
    ]),
    "threshold_encode": _configs([
        (64, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 4),
        (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
    ]),
}  # fmt: skip
INTERPRETER_CANDIDATES = [
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1, "programs": 4},
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1, "programs": 2},
]


@contextlib.contextmanager
def launch_config(op: str, cfg: dict):
    """Every launch of `op` uses cfg while the block runs."""
    config = tuning.config

    def forced(name, **shape):
        return dict(cfg) if name == op else config(name, **shape)

    tuning.config = forced
    try:
        yield
    finally:
        tuning.config = config


def make_call(op: str, B: int, d: int, n: int, k: int, dtype: torch.dtype, device: str):
    """(call, reference): the op on fixed random inputs, and a check of a result against the PyTorch path.

    JumpReLU thresholds sit at the (1 - k/n) quantile of sample pre-activations, so about k latents fire.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, d, generator=g).to(device, dtype)
    W = (torch.randn(n, d, generator=g) / math.sqrt(d)).to(device, dtype)
    b = (0.1 * torch.randn(n, generator=g)).to(device, dtype)
    if op == "topk_encode":
        call = lambda: kernels.topk_encode(x, W, b, k)
    else:
        z = (x[: min(B, 1024)].float() @ W.float().T + b.float()).float()
        theta = torch.quantile(z[:, : min(n, 1 << 14)].flatten(), 1 - k / n).clamp_min(0).item()
        threshold = torch.full((n,), theta, device=device, dtype=dtype)
        hints = kernels.EncodeHints()  # timed calls after the first start from the capacity it needed
        call = lambda: kernels.jumprelu_encode(x, W, b, threshold, bandwidth=1e-3, hints=hints)
    with kernels.use_backend("torch"):
        want = call()
    return call, want, (x, W)


def agreement(got, want, n: int) -> float:
    """Fraction of the reference's nonzero (row, latent) entries that the result also holds."""
    keys = lambda code: (torch.arange(code.indices.shape[0], device=code.indices.device)[:, None] * n
                         + code.indices.long())[code.values != 0]  # fmt: skip
    ref = keys(want)
    return float(torch.isin(ref, keys(got)).float().mean()) if ref.numel() else 1.0


def _try(op: str, cfg: dict, call, want, n: int, gemm: dict, device: str) -> dict:
    rec = {"config": cfg}
    try:
        with launch_config(op, cfg), kernels.use_backend("triton"):
            got = call()
            rec["agreement"] = agreement(got, want, n)
            rec["ms"], rec["ms_q20"], rec["ms_q80"] = measure.time_ms(call, device)
        rec["x_gemm"] = rec["ms"] / gemm["ms"]
    except Exception as e:  # a config that fails to compile or launch is a result, not the end of the sweep
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return rec


def run(op: str, B: int, d: int, n: int, k: int, dtype: torch.dtype, device: str, candidates=None) -> dict:
    """Check and time every candidate config of `op`; returns the JSON document."""
    if candidates is None:
        candidates = INTERPRETER_CANDIDATES if backend.INTERPRET else CANDIDATES[op]
    call, want, (x, W) = make_call(op, B, d, n, k, dtype, device)
    gemm = measure.gemm_ceiling(x, W, device)
    validate = kernels.validation_enabled()
    kernels.set_validation(False)  # timed calls make no host sync
    try:
        records = [_try(op, cfg, call, want, n, gemm, device) for cfg in candidates]
    finally:
        kernels.set_validation(validate)
    shape = {"B": B, "d": d, "n": n, "k": k, "dtype": str(dtype).removeprefix("torch.")}
    return {
        "op": op,
        "shape": shape,
        "device": measure.device_facts(device),
        "versions": measure.versions(),
        "git": measure.git_commit(),
        "gemm": gemm,
        "results": records,
    }


def table(doc: dict) -> str:
    lines = [f"{doc['op']} {doc['shape']}: cuBLAS GEMM {doc['gemm']['ms']:.3f} ms", "config | ms | x GEMM | agreement"]
    ok = [r for r in doc["results"] if "ms" in r]
    for r in sorted(ok, key=lambda r: r["ms"]) + [r for r in doc["results"] if "ms" not in r]:
        c = r["config"]
        name = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"
        if "ms" in r:
            lines.append(f"{name} | {r['ms']:.3f} | {r['x_gemm']:.2f} | {r['agreement']:.4f}")
        else:
            lines.append(f"{name} | failed: {r['error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=sorted(CANDIDATES), default="topk_encode")
    ap.add_argument("--B", type=int, default=8192)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--results-dir", type=Path, help="default: $RESULTS_DIR or bench/results")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        device = "cuda"
    elif backend.INTERPRET:
        device = "cpu"
    else:
        print("bench.tune times Triton kernels: it needs CUDA (or TRITON_INTERPRET=1 for a smoke run)")
        return 2
    doc = run(args.op, args.B, args.d, args.n, args.k, getattr(torch, args.dtype), device)
    print(table(doc))
    out = args.results_dir or Path(os.environ.get("RESULTS_DIR") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", doc["device"].get("name", device))  # plain names travel back
    path = out / f"tune-{doc['op']}-{name}.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
