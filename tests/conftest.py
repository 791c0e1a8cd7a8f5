"""Test harness: Triton kernels run through the interpreter on CPU-only machines; outputs are poisoned.

TRITON_INTERPRET must be set before `kernels` (and so triton.jit) is imported, hence at the top here.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels.backend import cpp_available  # noqa: E402
from kernels.gemm import tf32_enabled  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Every op test runs on each backend: the C++ kernels (csrc/) on CPU tensors where they are built, which
# `make test` does (test_cpp_backend.py fails under CI when they are not).
BACKENDS = ["triton", "torch"] + (["cpp"] if DEVICE == "cpu" and cpp_available() else [])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "meta" or type(t) is not torch.Tensor:
        return t
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype in (torch.int32, torch.int64):
        return t.fill_(torch.iinfo(t.dtype).max)
    return t


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every torch.empty, torch.empty_like and Tensor.new_empty is filled with NaN (ints with their max), so an
    unwritten element fails a test."""
    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _f=original, **kw: _poison(_f(*a, **kw)))
    yield


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 products in IEEE precision on GPUs too, so fp32 results meet the 1e-5 tolerance."""
    previous = torch.backends.cuda.matmul.fp32_precision  # never allow_tf32: it raises once the new API was set
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert not tf32_enabled()
    yield
    torch.backends.cuda.matmul.fp32_precision = previous


@pytest.fixture(autouse=True)
def seeded(request):
    """Fresh random inputs per test id, reproducible from the id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def one_thread():
    """Small matrices: one thread is several times faster than two fighting for a busy 2-core CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
