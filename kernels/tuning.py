"""Tuned launch configurations are data: `configs/<op>.json`, keyed by device, then by shape class.

Each file maps a device key ("interpreter", "default", or a CUDA device name such as "NVIDIA H100 80GB HBM3")
to a list of configs; the first whose "when" bounds all hold for the call's shape is used. A cold start
never autotunes, and the interpreter runs the same code path with its own small config.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from .backend import INTERPRET

CONFIG_DIR = Path(__file__).with_name("configs")


@functools.cache
def _table(op: str) -> dict:
    with open(CONFIG_DIR / f"{op}.json", encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def _device_key(op: str) -> str:
    table = _table(op)
    if INTERPRET or not torch.cuda.is_available():
        return "interpreter"
    name = torch.cuda.get_device_name()
    return name if name in table else "default"


def _fits(when: dict, shape: dict) -> bool:
    for key, bound in when.items():
        name, _, side = key.rpartition("_")
        value = shape[name]
        if (side == "max" and value > bound) or (side == "min" and value < bound):
            return False
    return True


def config(op: str, **shape: int) -> dict:
    """The launch config for `op` at this shape, e.g. config("topk_encode", KP=64, D=4096)."""
    for entry in _table(op)[_device_key(op)]:
        if _fits(entry.get("when", {}), shape):
            return entry
    raise LookupError(f"no config in configs/{op}.json for {shape}")
