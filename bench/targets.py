"""The speed targets of DESIGN section 7 as data, and their table: each target a ratio within one run.

A target names ops (fnmatch patterns), a baseline and a bound. Against a provider ("dense", "sparsify") the
ratio is a speedup, the baseline's time over ours, and must be at least the bound; against GEMM (the encoder
GEMM x W^T of the shape, timed in the same run) it is ours over the GEMM, and must be at most the bound. On
the CPU each ratio is the median of its per-round ratios (measure.interleaved_ms) with their 20/80 quantiles.

At the quick CPU suite's target shape (shapes.target_shapes) only the cases these targets judge run: their ops,
"ours" (the C++ kernels when built), their baselines and, beside the TopK step, PyTorch-sparse (what sparsify
runs: DESIGN's second PyTorch baseline).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from sae.registry import ARCHITECTURES

from .ops import FAMILIES, OPS

GEMM = "gemm"  # the baseline that is the shape's encoder GEMM, not a provider
OURS = {"cpu": ("cpp", "ours"), "cuda": ("ours",)}  # the provider judged: the first of these that ran
ALSO = {"step": ("torch_sparse",)}  # baselines run beside a judged op at the target shape that no target names


@dataclass(frozen=True)
class Target:
    """ratio: what is compared ("step vs dense"); ops: op name patterns; baseline: a provider name or GEMM;
    bound: the least speedup over a provider, or the most GEMMs."""

    ratio: str
    ops: tuple[str, ...]
    baseline: str
    bound: float

    def judges(self, op: str) -> bool:
        return any(fnmatch.fnmatchcase(op, p) for p in self.ops)

    def met(self, value: float) -> bool:
        return value <= self.bound if self.baseline == GEMM else value >= self.bound

    def text(self) -> str:
        return f"<= {self.bound:g} GEMM" if self.baseline == GEMM else f">= {self.bound:g}x"


TARGETS: dict[str, tuple[Target, ...]] = {
    # issue 10 item 5: d = 768, n = 24576, k = 32, B = 2048, fp32, on the 2-core CPU
    "cpu": (
        Target("forward vs dense", ("forward_*",), "dense", 1.5),
        Target("step vs dense", ("*_step",), "dense", 2.0),
        Target("step vs dense", ("step",), "dense", 5.0),
        Target("step / GEMM", ("step",), GEMM, 1.5),
        Target("step vs eai-sparsify", ("step",), "sparsify", 1.5),
        Target("encode / GEMM", ("encode", "*_encode"), GEMM, 1.3),
    ),
    # the H100 at the reference shape, bf16 (timed one provider after the other: ratios of medians)
    "cuda": (
        Target("step vs dense", ("step",), "dense", 3.5),
        Target("step vs eai-sparsify", ("step",), "sparsify", 1.5),
        Target("encode / GEMM", ("encode",), GEMM, 1.15),
    ),
}


def arch_of(op: str) -> str:
    """The `sae.registry` architecture an op measures: "forward_<arch>", "<family>_<op>", else TopK's ops."""
    if op.startswith("forward_"):
        return op.removeprefix("forward_")
    family = op.split("_", 1)[0]
    return family if family in FAMILIES else "topk"


def judged_ops(device: str) -> list[str]:
    """The ops some target of `device` judges, in OPS order."""
    return [op for op in OPS if any(t.judges(op) for t in TARGETS.get(device, ()))]


def baselines(op: str, device: str) -> set[str]:
    """The providers besides ours that the targets of `op` compare with, and those of ALSO."""
    return ({t.baseline for t in TARGETS.get(device, ()) if t.judges(op)} - {GEMM}) | set(ALSO.get(op, ()))


def ours(device: str, names) -> str | None:
    """Which of the provider names `names` the targets judge on `device` (None: none of them)."""
    return next((name for name in OURS.get(device, ()) if name in names), None)


def _ratio(t: Target, rec: dict) -> tuple[float | None, float | None, float | None]:
    if t.baseline == GEMM:
        return rec.get("x_gemm"), rec.get("x_gemm_q20"), rec.get("x_gemm_q80")
    return tuple(rec.get(key, {}).get(t.baseline) for key in ("speedup", "speedup_q20", "speedup_q80"))


def evaluate(results: list[dict], device: str, shape_keys: list[dict]) -> list[dict]:
    """One row per (target, op that ran) at the given shapes (Shape.asdict()s), classes in registry order.

    A row: class, op, ratio, target (text), bound, baseline, provider, the shape, median, q20, q80 and met
    (None when the ratio was not measured, with `missing` saying why)."""
    ran = {r["provider"] for r in results}
    name = ours(device, ran)
    in_shape = lambda r: any(all(r[k] == v for k, v in s.items()) for s in shape_keys)
    mine = [r for r in results if r["provider"] == name and in_shape(r)]
    rows = []
    for arch in ARCHITECTURES:
        for t in TARGETS.get(device, ()):
            for rec in (r for r in mine if arch_of(r["op"]) == arch and t.judges(r["op"])):
                median, q20, q80 = _ratio(t, rec) if rec["status"] == "ok" else (None, None, None)
                row = {"class": ARCHITECTURES[arch].__name__, "op": rec["op"], "ratio": t.ratio, "target": t.text(),
                       "bound": t.bound, "baseline": t.baseline, "provider": name,
                       **{k: rec[k] for k in ("B", "d", "n", "k", "dtype")}, "median": median, "q20": q20,
                       "q80": q80, "met": None if median is None else t.met(median)}  # fmt: skip
                if median is None:
                    row["missing"] = rec.get("reason") if rec["status"] != "ok" else f"no {t.baseline} result"
                rows.append(row)
    return rows
