"""Streaming over activations: `acts` is a tensor [N, d] or an iterable of [b, d] batches.

Side inputs (labels [N, C], embeddings [N, e]) come along row by row: a tensor is sliced at the running row
offset, an iterable is zipped batch by batch. Metrics that read the activations twice need a tensor or a
re-iterable (a list of batches, `sae.harvest.HarvestedActivations`); a one-shot iterator gets a clear error.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from kernels import SparseCode

Acts = torch.Tensor | Iterable[torch.Tensor]


def _rows(batch, name: str) -> torch.Tensor:
    batch = torch.as_tensor(batch) if isinstance(batch, np.ndarray) else batch
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got a batch of {type(batch).__name__}")
    return batch


def batches(acts: Acts, batch_size: int, name: str = "acts") -> Iterator[torch.Tensor]:
    """[b, ...] batches of acts: slices of a tensor, or the iterable's own batches."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(acts, (torch.Tensor, np.ndarray)):
        acts = _rows(acts, name)
        if acts.dim() == 0:
            raise ValueError(f"{name} must have a row dimension, got a scalar")
        for a in range(0, acts.shape[0], batch_size):
            yield acts[a : a + batch_size]
        return
    if not isinstance(acts, Iterable):
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(acts).__name__}")
    for batch in acts:
        yield _rows(batch, name)


def reiterable(acts: Acts, what: str) -> None:
    """Raise if acts is a one-shot iterator (a generator): `what` reads it more than once."""
    if not isinstance(acts, (torch.Tensor, np.ndarray)) and iter(acts) is acts:
        raise ValueError(f"{what} reads acts more than once: pass a tensor or a re-iterable (a list of batches)")


def count_rows(acts: Acts) -> int:
    """N, the rows of acts (an iterable of batches is read once, without encoding)."""
    if isinstance(acts, (torch.Tensor, np.ndarray)):
        return acts.shape[0]
    if hasattr(acts, "rows"):  # a row reader (sae.harvest.HarvestedActivations): len() counts rows
        return len(acts)
    return sum(b.shape[0] for b in batches(acts, 1))


def aligned(acts: Acts, batch_size: int, **sides) -> Iterator[tuple]:
    """(row offset, acts batch, side batches...) with the side inputs (tensors or iterables, None allowed)
    cut to the same rows."""
    sides = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in sides.items()}
    its = {k: None if v is None or isinstance(v, torch.Tensor) else batches(v, 1, k) for k, v in sides.items()}
    offset = 0
    for x in batches(acts, batch_size):
        b, out = x.shape[0], []
        for k, v in sides.items():
            if v is None:
                out.append(None)
            elif its[k] is None:
                part = v[offset : offset + b]
                if part.shape[0] != b:
                    raise ValueError(f"{k} has {v.shape[0]} rows, fewer than the activations (> {offset})")
                out.append(part)
            else:
                part = next(its[k], None)
                if part is None or part.shape[0] != b:
                    raise ValueError(f"{k}: the batches must match the activations' batches ({b} rows at {offset})")
                out.append(part)
        yield (offset, x, *out)
        offset += b
    for k, v in sides.items():
        if isinstance(v, torch.Tensor) and v.shape[0] != offset:
            raise ValueError(f"{k} has {v.shape[0]} rows but the activations have {offset}")


@contextlib.contextmanager
def inference(model):
    """The model in eval mode (BatchTopK's global threshold, no running statistics updated) and without
    gradients, its previous mode restored afterwards."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was)


def encoded(
    model, acts: Acts, batch_size: int, *, decode: bool = False, progress: bool = False, desc: str = "", **sides
) -> Iterator:
    """(offset, x [b, d_in], code SparseCode [b, K], side batches...) over acts, x on the model's device, the
    model in inference mode; with decode, (offset, x, code, x_hat [b, d_out], side batches...)."""
    total = acts.shape[0] if isinstance(acts, (torch.Tensor, np.ndarray)) else None
    bar = Progress(desc, total) if progress else None
    with inference(model):
        for offset, x, *rest in aligned(acts, batch_size, **sides):
            x = x.to(model.device)
            if decode:
                yield (offset, x, *model.run(x), *rest)
            else:
                yield (offset, x, model.encode_sparse(x), *rest)
            if bar is not None:
                bar.update(x.shape[0])
    if bar is not None:
        bar.close()


def entries(code: SparseCode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The active entries of a code: (rows [E] int64, latents [E] int64, values [E] fp32), values != 0."""
    values = code.values.float()
    active = values != 0
    rows = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(values)
    return rows[active], code.indices.long()[active], values[active]


def sparse_rows(code: SparseCode, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The code as a sparse COO matrix [n, B] (latent-major, fp32): code^T, or with weights [E] instead of the
    values. `sparse_rows(code, n) @ Y` sums the rows of Y [B, C] weighted by each latent's activations."""
    rows, latents, values = entries(code)
    values = values if weights is None else weights
    size = (n, code.values.shape[0])
    return torch.sparse_coo_tensor(torch.stack([latents, rows]), values, size, check_invariants=False)


class Progress:
    """A one-line progress bar on stderr: rows done (of total when known) and rows per second."""

    def __init__(self, desc: str, total: int | None = None):
        self.desc, self.total, self.done, self.start = desc, total, 0, time.perf_counter()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last > 0.2 and sys.stderr.isatty():  # a log file gets the final line only
            self._last = now
            self._print("\r")

    def _print(self, end: str) -> None:
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        if self.total:
            filled = int(20 * self.done / self.total)
            bar = f"[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total}"
        else:
            bar = f"{self.done}"
        print(f"{self.desc} {bar} rows ({rate / 1e3:.1f}k/s)", end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._print("\n")
