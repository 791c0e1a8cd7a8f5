"""Sharded checkpoints through torch.distributed.checkpoint (DCP), complete or absent, readable on any mesh.

Every rank writes its own shards into folder/.ckpt-<step>.tmp; once all have written (DCP writes its .metadata
last), rank 0 renames the folder to ckpt-<step>, so a folder of that name is always a whole checkpoint, and a run
killed while writing leaves only a temporary folder, which the next save removes. DTensors are saved with their
global shapes, so a run with another number of ranks or latent shards loads the rows it now holds.
Folders must be on a file system every rank sees.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

_NAME = re.compile(r"^ckpt-(\d+)$")


def checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted((step, p) for step, p in found if (p / ".metadata").is_file())


def latest(folder: str | os.PathLike) -> Path | None:
    found = checkpoints(folder)
    return found[-1][1] if found else None


def save(state: dict, folder: str | os.PathLike, step: int, *, keep: int = 2) -> Path:
    """Write `state` (DTensors, tensors, bytes) as folder/ckpt-<step> from every rank; keep the `keep` newest."""
    folder = Path(folder)
    final, tmp = folder / f"ckpt-{step:09d}", folder / f".ckpt-{step:09d}.tmp"
    rank0 = dist.get_rank() == 0
    if rank0:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(".ckpt-*.tmp"):  # left by a killed run
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if rank0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for _, old in checkpoints(folder)[: max(0, len(checkpoints(folder)) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(state: dict, path: str | os.PathLike) -> None:
    """Fill `state` (the shape of what `save` wrote, laid out for this run's mesh) in place from path."""
    dcp.load(state, checkpoint_id=str(path))
