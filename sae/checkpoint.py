"""Checkpoints written atomically (sae.atomic), so a kill never leaves a torn file."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .atomic import atomic_write

_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    found = checkpoints(folder)
    return found[-1][1] if found else None


def save_checkpoint(state: dict, folder: str | os.PathLike, step: int, *, keep: int = 2) -> Path:
    """Write folder/ckpt-<step>.pt atomically, then delete all but the `keep` newest checkpoints."""
    path = atomic_write(Path(folder) / f"ckpt-{step:09d}.pt", lambda tmp: torch.save(state, tmp))
    for _, old in checkpoints(folder)[: max(0, len(checkpoints(folder)) - keep)]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    return torch.load(path, map_location=map_location, weights_only=False)
