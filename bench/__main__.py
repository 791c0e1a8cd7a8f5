"""`python -m bench`: measure every op and each SAE's training step and forward against the baselines.

Examples:
  python -m bench                              # the quick suite on CUDA if present, else on the CPU
  python -m bench --full --device cuda         # the whole sweep of DESIGN section 7
  python -m bench --cases 'encode*,step' --n 16384,65536 --providers ours,dense
  python -m bench --cases 'jumprelu_*,forward_*'   # one threshold family, and every class's model(x)
  python -m bench --cases largest_n --device cuda  # the largest n that trains at d = 4096
  python -m bench --device cuda --budget-s 480     # cases that would start after 8 minutes are skipped
  python -m bench --device cpu --n 24576           # only the CPU target shape: the table of bench/targets.py

The JSON (<results-dir>/<device>-<suite>.json) is rewritten after every case, so a run stopped early leaves its
results ("complete": false); the Markdown and the plots are written at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from . import measure, report, targets
from .inputs import CHECK_ROWS
from .ops import LARGEST_N, OPS, providers_named, select_ops
from .providers_topk import PROVIDERS
from .shapes import DTYPES, GPU_REFERENCE, family_shapes, suite_shapes, target_shapes
from .suite import Run, execute

REPORT_RESERVE_S = 20  # the Markdown and the plots, written after the last case


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    suite = ap.add_mutually_exclusive_group()
    choose = lambda name, what: suite.add_argument(
        f"--{name}", dest="suite", action="store_const", const=name, help=what
    )
    choose("quick", "the quick suite (the default)")
    choose("full", "the whole sweep")
    ap.add_argument("--cases", help=f"comma-separated case name patterns, from: {', '.join([*OPS, LARGEST_N])}")
    ap.add_argument("--providers", help=f"comma-separated subset of: {', '.join(PROVIDERS)}")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    ap.add_argument("--results-dir", type=Path, help="default: $RESULTS_DIR or bench/results")
    ap.add_argument(
        "--budget-s",
        type=measure.budget_seconds,
        default=os.environ.get("BENCH_BUDGET_S") or None,  # argparse converts a string default with `type`
        help="wall-clock budget in seconds: a case starts only while more is left than the longest case took "
        f"(+{REPORT_RESERVE_S} s for the report); the rest are recorded as skipped. Default: $BENCH_BUDGET_S, "
        "else no limit",
    )
    axes = {"n": "dictionary sizes", "d": "input widths", "k": "k values", "batch": "batch sizes"}
    for axis, what in axes.items():
        ap.add_argument(f"--{axis}", type=_ints, help=f"override the suite's {what} (comma-separated)")
    ap.set_defaults(suite="quick")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    results_dir = args.results_dir or Path(os.environ.get("RESULTS_DIR") or Path(__file__).parent / "results")
    names = [p.strip() for p in args.providers.split(",")] if args.providers else list(PROVIDERS)
    unknown = [p for p in names if p not in PROVIDERS]
    if unknown:
        print(f"--providers: unknown {unknown}; choose from {list(PROVIDERS)}", file=sys.stderr)
        return 2
    overrides = {"n": args.n, "d": args.d, "k": args.k, "B": args.batch}
    shapes = suite_shapes(args.suite, device, args.dtype, overrides)
    chosen = select_ops(args.cases)
    ops = [op for op in chosen if op in OPS]
    run = Run(args.suite, device, shapes, ops, [], family_shapes(args.suite, device, shapes),
              target_shapes(args.suite, device, shapes), LARGEST_N in chosen)  # fmt: skip
    run.budget = measure.Budget(args.budget_s, reserve_s=REPORT_RESERVE_S)
    for name in names:
        reason = PROVIDERS[name].unavailable()
        if name == "chunked" and device == "cpu" and not args.providers:
            reason = "on the CPU 'ours' runs this very code (the kernels' torch backend); ask for it by name"
        if reason:
            run.note(f"provider {name} skipped: {reason}")
        else:
            run.providers += providers_named([name])
    if device == "cpu" and args.suite == "quick":
        axis = lambda a: ", ".join(str(v) for v in sorted({getattr(s, a) for s in shapes}))
        run.note(
            f"CPU quick suite: B={axis('B')}, d={axis('d')}, k={axis('k')}, {axis('dtype')}, "
            f"n in {axis('n')}: shapes that fit the CPU time budget, "
            f"not the GPU reference shape ({GPU_REFERENCE.label()})"
        )
    if args.suite == "quick" and any(OPS[op].group != "topk" for op in ops):
        labels = ", ".join(s.label() for s in run.family_shapes)
        run.note(f"quick suite: the threshold families (encode, step) and every class's forward at {labels} only")
    for shape in run.target_shapes:
        ours = targets.ours(device, [c.name for c in run.providers])
        judged = "each class's encode, step and forward"
        run.note(f"{shape.label()} (CPU target): only what bench/targets.py judges ({judged}) by {ours} and the "
                 "targets' baselines; PyTorch-sparse beside the TopK step")  # fmt: skip
    if any(OPS[op].group != "topk" for op in ops):
        run.note("threshold families: thresholds and biases set so that about k latents fire per row (L0 ~ k)")
    if device == "cpu":
        run.note("CPU: 'ours' runs the kernels' torch backend (chunked PyTorch); 'cpp' the C++ kernels (csrc/)")
    run.note(f"every provider is checked against the float64 reference on {CHECK_ROWS} rows before timing")
    t0 = time.perf_counter()
    doc = execute(run, save=lambda doc: report.write_json(doc, results_dir))
    doc["wall_s"] = time.perf_counter() - t0
    print(report.text_table(doc))
    for path in report.write(doc, results_dir):
        print(f"wrote {path}")
    print(f"done in {doc['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
