"""Argument checks shared by every op: each error names the argument at fault."""

from __future__ import annotations

import torch

from .backend import validation_enabled

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def matrix(name: str, t: torch.Tensor, cols: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(t.shape)}")


def floating(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype} (the dtype of the other inputs)")


def same_device(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}, expected {ref.device} (the device of the other inputs)")


def vector(name: str, t: torch.Tensor | None, size: int, ref: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    floating(name, t, ref.dtype)
    same_device(name, t, ref)


def indices(name: str, t: torch.Tensor, shape: tuple[int, ...], ref: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    same_device(name, t, ref)


def index_range(name: str, t: torch.Tensor, n: int) -> None:
    """Indices in [0, n): checked only with validation on (a host sync)."""
    if validation_enabled() and t.numel() and not torch.compiler.is_compiling():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"{name} must lie in [0, {n}), got values in [{lo}, {hi}]")


def finite(name: str, t: torch.Tensor | None) -> None:
    """Non-finite inputs poison a selection: rejected when validation is on (a host sync)."""
    if t is None or not validation_enabled() or torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def row_major(t: torch.Tensor | None) -> torch.Tensor | None:
    """Kernels take any row stride but need unit stride along the last dimension."""
    if t is None or t.dim() == 0 or t.stride(-1) == 1:
        return t
    return t.contiguous()
