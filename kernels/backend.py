"""Which implementation runs an op: one env variable and one function choose it explicitly.

Backends:
  "triton": the Triton kernels. CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before
            `kernels` was imported (the Triton interpreter).
  "torch":  plain PyTorch, memory-bounded (the chunked encoder, the reference decode and gradients).
  "auto":   (default) "triton" for CUDA tensors, "torch" for CPU tensors.

SAE_KERNELS_BACKEND sets the default; `set_backend(name)` or `with use_backend(name):` override it.
SAE_KERNELS_VALIDATE=0 or `set_validation(False)` turns off the checks that need a host sync
(non-finite inputs); shape, dtype and device checks always run.
"""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "torch")
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
    """Choose the backend for every op: "auto", "triton" or "torch"."""
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


def resolve(t: torch.Tensor) -> str:
    """The backend that runs an op whose inputs live where `t` lives."""
    name = _state["backend"]
    if name == "auto":
        return "triton" if t.is_cuda else "torch"
    if name == "triton" and not t.is_cuda and not INTERPRET:
        raise RuntimeError(
            "backend 'triton' got CPU tensors: set TRITON_INTERPRET=1 before importing kernels "
            "to run the Triton kernels in the interpreter, or use backend 'torch'"
        )
    return name
