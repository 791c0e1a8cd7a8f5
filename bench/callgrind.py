"""One call of each C++ CPU kernel (csrc/) at a small shape on one thread, for instruction counts that do not
depend on the machine's load (bench/NOTES.md, csrc section):

    SAE_KERNELS_MARCH=x86-64-v3 python setup.py build_ext --build-temp /tmp/cg/tmp --build-lib /tmp/cg/lib
    ATEN_CPU_CAPABILITY=avx2 valgrind --tool=callgrind python -m bench.callgrind /tmp/cg/lib/kernels
    callgrind_annotate --threshold=100 callgrind.out.<pid> | grep sae_cpp

(valgrind 3.19 cannot run AVX-512 code, hence the AVX2 build and ATen's AVX2 kernels.) The optional argument is
a directory holding a kernels._C build to use instead of the installed one.
"""

from __future__ import annotations

import sys

import torch

import kernels
from kernels import backend

B, D, N, K, CAPACITY = 128, 64, 1024, 8, 64


def main(argv: list[str]) -> None:
    if argv:
        kernels.__path__.insert(0, argv[0])
    if not backend.cpp_available():
        raise SystemExit("kernels._C is not built")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ops = torch.ops.sae_kernels_cpp
    x, W, b = torch.randn(B, D), torch.randn(N, D) / D**0.5, torch.zeros(N)
    values, indices = torch.empty(B, K), torch.empty(B, K, dtype=torch.int32)
    ops.topk_select(x, W, b, K, values, indices)
    kept = [torch.empty(B, CAPACITY), torch.empty(B, CAPACITY), torch.empty(B, CAPACITY, dtype=torch.int32)]
    counts = torch.empty(B, dtype=torch.int32)
    ops.threshold_select(1, x, W, b, torch.full((N,), 1.5), None, None, 0.01, kept[0], None, *kept[1:], counts)
    out = torch.empty(B, D)
    ops.gather_matmul(values, indices, W, None, out)
    ops.gather_dot(out, indices, W, torch.empty(B, K))
    ops.scatter_rows(values, indices, x, N, torch.empty(N, D), torch.empty(N))
    ops.prefix_norms(values, indices, W, x, torch.empty(B, K + 1))


if __name__ == "__main__":
    main(sys.argv[1:])
