"""Which implementation runs an op: one env variable and one function choose it explicitly.

Backends:
  "triton": the Triton kernels. CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before
            `kernels` was imported (the Triton interpreter).
  "torch":  plain PyTorch, memory-bounded (the chunked encoder, the reference decode and gradients).
  "cpp":    the C++17 kernels of csrc/ (CPU tensors), built into kernels._C by `pip install
            --no-build-isolation -e .` (the Makefile's set-up). Ops without a C++ kernel run on "torch".
  "auto":   (default) "triton" for CUDA tensors; "cpp" for CPU tensors when kernels._C is built, else
            "torch" (with one warning saying why).

SAE_KERNELS_BACKEND sets the default; `set_backend(name)` or `with use_backend(name):` override it.
SAE_KERNELS_VALIDATE=0 or `set_validation(False)` turns off the checks that need a host sync
(non-finite inputs); shape, dtype and device checks always run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "torch", "cpp")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _from_env(name: str, default: str) -> str:
    value = os.environ.get(name, default).strip().lower()
    return value or default


_state = {
    "backend": _from_env("SAE_KERNELS_BACKEND", "auto"),
    "validate": _from_env("SAE_KERNELS_VALIDATE", "1") not in ("0", "false", "no", "off"),
}
if _state["backend"] not in BACKENDS:
    raise ValueError(f"SAE_KERNELS_BACKEND={_state['backend']!r}: expected one of {BACKENDS}")


def set_backend(name: str) -> None:
    """Choose the backend for every op: "auto", "triton", "torch" or "cpp"."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {BACKENDS}")
    _state["backend"] = name


def get_backend() -> str:
    return _state["backend"]


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed ops on backend `name`, then restore the previous choice."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def set_validation(enabled: bool) -> None:
    """Turn the checks that synchronise with the device (non-finite inputs) on or off."""
    _state["validate"] = bool(enabled)


def validation_enabled() -> bool:
    return _state["validate"]


@functools.cache
def cpp_available() -> bool:
    """Whether the C++ CPU kernels (kernels._C, built from csrc/) load; warns once when they do not."""
    try:
        importlib.import_module(f"{__package__}._C")  # registers the torch.ops.sae_kernels_cpp ops
    except ImportError as e:
        warnings.warn(
            f"sae-kernels: the C++ CPU kernels (csrc/) are not built ({e}); CPU ops run on the PyTorch path. "
            "Build them with `pip install --no-build-isolation -e .` (needs a C++ compiler).",
            stacklevel=3,
        )
        return False
    return True


def resolve(t: torch.Tensor) -> str:
    """The backend that runs an op whose inputs live where `t` lives."""
    name = _state["backend"]
    if name == "auto":
        return "triton" if t.is_cuda else ("cpp" if cpp_available() else "torch")
    if name == "cpp" and (t.is_cuda or not cpp_available()):
        raise RuntimeError(
            "backend 'cpp' runs CPU tensors only" if t.is_cuda else "backend 'cpp': kernels._C is not built"
        )
    if name == "triton" and not t.is_cuda and not INTERPRET:
        raise RuntimeError(
            "backend 'triton' got CPU tensors: set TRITON_INTERPRET=1 before importing kernels "
            "to run the Triton kernels in the interpreter, or use backend 'torch'"
        )
    return name
