"""Shapes: one case's sizes and dtype, the reference shapes of DESIGN section 7, and the quick and full suites."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    """B tokens of width d, n latents, k active per row (TopK; L0 ~ k for the threshold families)."""

    B: int
    d: int
    n: int
    k: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    def label(self) -> str:
        return f"B={self.B} d={self.d} n={self.n} k={self.k} {self.dtype}"

    def asdict(self) -> dict:
        return asdict(self)


GPU_REFERENCE = Shape(B=8192, d=4096, n=131072, k=64, dtype="bfloat16")
CPU_TARGET = Shape(B=2048, d=768, n=24576, k=32, dtype="float32")
FAMILY_N = {"cuda": GPU_REFERENCE.n, "cpu": CPU_TARGET.n}  # the quick suite's n for the threshold and forward ops


def suite_shapes(suite: str, device: str, dtype: str | None, overrides: dict) -> list[Shape]:
    """The shapes of `suite` ("quick" or "full") on `device`; overrides: {"B"|"d"|"n"|"k": [ints]}.

    quick, CUDA: the reference shape (B=8192, d=4096, k=64, bf16) with n = 2^14 .. 2^17 (2^17 is the
    reference). quick, CPU: the DESIGN's CPU target (B=2048, d=768, k=32, fp32) with n = 4096 and 24576 (the
    target, where only the cases of the CPU targets run: see target_shapes), within the 5-minute CPU budget.
    full: n = 2^14 .. 2^20 x d in 768, 2304, 4096 x k in 32, 64, 128.
    """
    base = GPU_REFERENCE if device == "cuda" else CPU_TARGET
    if suite == "quick":
        ns = [2**e for e in range(14, 18)] if device == "cuda" else [4096, CPU_TARGET.n]
        axes = {"B": [base.B], "d": [base.d], "n": ns, "k": [base.k]}
    else:
        axes = {"B": [base.B], "d": [768, 2304, 4096], "n": [2**e for e in range(14, 21)], "k": [32, 64, 128]}
    axes.update({key: v for key, v in overrides.items() if v})
    dtype = dtype or base.dtype
    return [
        Shape(B, d, n, k, dtype) for d in axes["d"] for k in axes["k"] for n in axes["n"] for B in axes["B"] if k <= n
    ]


def family_shapes(suite: str, device: str, shapes: list[Shape]) -> list[Shape]:
    """Where the threshold-family and forward ops run: every shape of the full suite; in the quick suite the
    shapes whose n is nearest FAMILY_N[device] (CPU: what fits its time budget; CUDA: the reference n)."""
    if suite == "full" or not shapes:
        return list(shapes)
    n = min({s.n for s in shapes}, key=lambda n: (abs(n - FAMILY_N[device]), n))
    return [s for s in shapes if s.n == n]


def target_shapes(suite: str, device: str, shapes: list[Shape]) -> list[Shape]:
    """The shapes of the quick CPU suite that are the CPU target (B, d, n, k of CPU_TARGET, any dtype): there
    only the cases that bench.targets judges run (its ops, "ours" and the baselines of its ratios), so that
    the quick suite fits its time budget; [] elsewhere (every case runs)."""
    if suite != "quick" or device != "cpu":
        return []
    key = lambda s: (s.B, s.d, s.n, s.k)
    return [s for s in shapes if key(s) == key(CPU_TARGET)]
