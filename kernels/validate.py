"""Argument checks shared by every op: each error names the argument at fault."""

from __future__ import annotations

import torch

from .backend import validation_enabled
from .code import SparseCode
from .hints import EncodeHints

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
    if validation_enabled() and not torch.compiler.is_compiling() and t.numel():
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


def encoder(x: torch.Tensor, W_name: str, W: torch.Tensor, vectors, b_dec) -> torch.Tensor:
    """Checks of an encoder's inputs (x [B, d], W [n, d], per-latent vectors [n], b_dec [d] or None);
    returns the centred input x - b_dec."""
    matrix("x", x)
    floating("x", x)
    matrix(W_name, W, cols=x.shape[1])
    floating(W_name, W, x.dtype)
    same_device(W_name, W, x)
    for name, t in vectors:
        vector(name, t, W.shape[0], x)
    vector("b_dec", b_dec, x.shape[1], x)
    for name, t in (("x", x), (W_name, W), *vectors, ("b_dec", b_dec)):
        finite(name, t)
    return x if b_dec is None else x - b_dec


def k_of(k, n: int, n_name: str = "n") -> None:
    """k in [1, n]: the one check of a TopK / BatchTopK k (n_name: what n is called where the call came from,
    e.g. "d_sae")."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= n:
        raise ValueError(f"k must be an int in [1, {n_name}={n}], got {k!r}")


def capacity(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"capacity must be None or an int >= 1, got {value!r}")


def hints(value) -> EncodeHints:
    """The caller's EncodeHints, or fresh defaults for None."""
    if value is None:
        return EncodeHints()
    if not isinstance(value, EncodeHints):
        raise TypeError(f"hints must be a kernels.EncodeHints or None, got {type(value).__name__}")
    return value


def code(name: str, c, W_dec: torch.Tensor) -> None:
    """A SparseCode [B, K] against the decoder W_dec [n, d] it indexes."""
    if not isinstance(c, SparseCode):
        raise TypeError(
            f"{name} must be a kernels.SparseCode (what every encoder returns, or SparseCode(values, indices)), "
            f"got {type(c).__name__}"
        )
    matrix("W_dec", W_dec)
    floating("W_dec", W_dec)
    matrix(f"{name}.values", c.values)
    floating(f"{name}.values", c.values, W_dec.dtype)
    same_device(f"{name}.values", c.values, W_dec)
    indices(f"{name}.indices", c.indices, tuple(c.values.shape), W_dec)
    index_range(f"{name}.indices", c.indices, W_dec.shape[0])
