"""Tile sweep of the fused encoders on the GPU at hand: `python -m bench.tune`.

For each candidate launch config of an encoder (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs per
SM) it runs the op at one shape, checks its selection against the memory-bounded PyTorch path, times it
and prints its time over the cuBLAS GEMM of the same shape. The winners go into kernels/configs/*.json by
hand. Everything a lease needs is one call:
`python -m bench.tune --op topk_encode,threshold_encode --budget-s 480 --results-dir $OUT`.

The JSON of an op (tune-<op>-<device>.json) is rewritten after every config, so a sweep stopped early leaves
the configs it timed. Under --budget-s each op gets a share of the time left when it starts, in proportion
to its number of candidates, and a config starts only while more of that share is left than the slowest
config so far took (its compile included); the others are recorded as skipped.

On a machine without CUDA it runs only with TRITON_INTERPRET=1 (the interpreter, tiny shapes), which is
how the tests keep it working.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

import kernels
from kernels import backend, tuning

from . import measure
from .report import save_json


def _configs(tiles) -> list[dict]:
    """Launch configs from (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); one resident program per SM."""
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    return [dict(zip(keys, t), waves=1) for t in tiles]


# Candidates for the GPU; each is tried as given (kernels/configs holds the current choice). The TopK
# encoder takes BLOCK_N <= topk_encode.MAX_BLOCK_N (a lane group's columns fill one int32 mask).
CANDIDATES = {
    "topk_encode": _configs([
        (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 8, 3), (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 3), (64, 128, 64, 8, 4), (128, 128, 64, 8, 2), (128, 128, 128, 8, 2),
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


def run(
    op: str,
    B: int,
    d: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    device: str,
    candidates=None,
    budget: measure.Budget | None = None,
    save=None,
) -> dict:
    """Check and time every candidate config of `op`; returns the JSON document.

    budget: configs it does not allow are recorded as {"config", "skipped": reason}; save(doc), when given,
    is called after every config with the document so far ("complete": False)."""
    if candidates is None:
        candidates = INTERPRETER_CANDIDATES if backend.INTERPRET else CANDIDATES[op]
    budget = budget or measure.Budget(None)
    call, want, (x, W) = make_call(op, B, d, n, k, dtype, device)
    doc = {
        "op": op,
        "shape": {"B": B, "d": d, "n": n, "k": k, "dtype": str(dtype).removeprefix("torch.")},
        "device": measure.device_facts(device),
        "versions": measure.versions(),
        "git": measure.git_commit(),
        "budget_s": budget.seconds,
        "complete": False,
        "gemm": measure.gemm_ceiling(x, W, device),
        "results": [],
    }
    validate = kernels.validation_enabled()
    kernels.set_validation(False)  # timed calls make no host sync
    try:
        for cfg in candidates:
            if budget.allows():
                t0 = time.perf_counter()
                with budget.case():
                    doc["results"].append(_try(op, cfg, call, want, n, doc["gemm"], device))
                doc["results"][-1]["wall_s"] = round(time.perf_counter() - t0, 3)  # its compile included
            else:
                doc["results"].append({"config": cfg, "skipped": budget.why_not()})
            if save:
                save(doc)
    finally:
        kernels.set_validation(validate)
    doc["complete"] = True
    return doc


def table(doc: dict) -> str:
    lines = [f"{doc['op']} {doc['shape']}: cuBLAS GEMM {doc['gemm']['ms']:.3f} ms", "config | ms | x GEMM | agreement"]
    ok = [r for r in doc["results"] if "ms" in r]
    for r in sorted(ok, key=lambda r: r["ms"]) + [r for r in doc["results"] if "ms" not in r]:
        c = r["config"]
        name = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"
        if "ms" in r:
            lines.append(f"{name} | {r['ms']:.3f} | {r['x_gemm']:.2f} | {r['agreement']:.4f}")
        elif "skipped" in r:
            lines.append(f"{name} | skipped: {r['skipped']}")
        else:
            lines.append(f"{name} | failed: {r['error']}")
    return "\n".join(lines)


def _ops(text: str) -> list[str]:
    ops = [op.strip() for op in text.split(",") if op.strip()]
    unknown = [op for op in ops if op not in CANDIDATES]
    if unknown or not ops:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(CANDIDATES)}")
    return ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", type=_ops, default=["topk_encode"], help=f"comma-separated, of: {', '.join(CANDIDATES)}")
    ap.add_argument("--B", type=int, default=8192)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--results-dir", type=Path, help="default: $RESULTS_DIR or bench/results")
    ap.add_argument("--budget-s", type=measure.budget_seconds, help="wall-clock budget of the sweep (default: none)")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        device = "cuda"
    elif backend.INTERPRET:
        device = "cpu"
    else:
        print("bench.tune times Triton kernels: it needs CUDA (or TRITON_INTERPRET=1 for a smoke run)")
        return 2
    out = args.results_dir or Path(os.environ.get("RESULTS_DIR") or Path(__file__).parent / "results")
    total = measure.Budget(args.budget_s)
    for i, op in enumerate(args.op):
        configs_left = sum(len(CANDIDATES[o]) for o in args.op[i:])
        share = None if args.budget_s is None else max(0.0, total.left()) * len(CANDIDATES[op]) / configs_left
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", measure.device_facts(device).get("name", device))  # plain names
        path = out / f"tune-{op}-{name}.json"
        print(f"{op}: writing {path} after every config" + (f", {share:.0f} s budget" if share is not None else ""))
        doc = run(op, args.B, args.d, args.n, args.k, getattr(torch, args.dtype), device,
                  budget=measure.Budget(share), save=lambda doc, path=path: save_json(doc, path))  # fmt: skip
        print(table(doc))
        save_json(doc, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
