"""Activation sources: an in-memory tensor, and folders of .npy / .safetensors shards read through memory maps.

A source yields [batch_size, d_in] batches without end (epochs wrap around, reshuffled), draws a sample
for statistics without moving its position, and saves its position as a small dict, so a resumed run reads
exactly the batches the interrupted one would have read.

Transcoders train on (input, target) pairs: a paired source has `d_out` set and yields rows
[batch_size, d_in + d_out], each an input and its target side by side (`split_pairs` parts them), so every
row-wise operation (shuffling, slicing a batch among data groups) keeps the pairs together.
"""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write

SHARD_SUFFIXES = (".npy", ".safetensors")
TARGETS = "targets"  # the subfolder of a harvest folder holding the target shards of (input, target) pairs


class Source:
    """Base of the activation sources: `next_batch()` -> [batch_size, d_in]; `sample(n)` -> [n, d_in] (with
    d_out set: [.., d_in + d_out], inputs then targets)."""

    d_in: int
    batch_size: int
    d_out: int | None = None  # the targets' width, for (input, target) pairs

    def next_batch(self) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int) -> torch.Tensor:
        """n rows for statistics (normalisation, b_dec init, evaluation); the position does not move."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def part(self, group: int, groups: int) -> Source:
        """What data group `group` of `groups` trains on: rows [group b, (group + 1) b) of each of this source's
        batches (b = batch_size / groups), so the groups together train on exactly this source's batches. This
        default makes each whole batch and keeps its rows, for sources whose batches cost next to nothing (in
        memory, synthetic); a source that reads storage or runs a model reads only its part."""
        return BatchPart(self, group, groups)

    def __iter__(self):
        while True:
            yield self.next_batch()


def _part_size(batch_size: int, group: int, groups: int) -> int:
    """The rows of a batch that each of `groups` data groups gets; checks the arguments."""
    if not 0 <= group < groups:
        raise ValueError(f"group must be in [0, groups={groups}), got {group}")
    if batch_size % groups:
        raise ValueError(f"batch_size={batch_size} must be divisible by the data groups ({groups})")
    return batch_size // groups


class BatchPart(Source):
    """Rows [g b, (g + 1) b) of every batch of `source` (b = its batch size / G), for data group g of G."""

    def __init__(self, source: Source, group: int, groups: int):
        self.batch_size = _part_size(source.batch_size, group, groups)
        self.source, self.group = source, group
        self.d_in, self.d_out = source.d_in, source.d_out

    def next_batch(self) -> torch.Tensor:
        return self.source.next_batch()[self.group * self.batch_size : (self.group + 1) * self.batch_size]

    def sample(self, n: int) -> torch.Tensor:
        return self.source.sample(n)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def split_pairs(rows: torch.Tensor, d_in: int, d_out: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of a source -> (inputs [.., d_in], targets [.., d_out] or None when the source is not paired)."""
    if d_out is None:
        return rows, None
    if rows.shape[-1] != d_in + d_out:
        raise ValueError(f"paired rows must have d_in + d_out = {d_in + d_out} columns, got shape {tuple(rows.shape)}")
    return rows[..., :d_in], rows[..., d_in:]


def _perm(n: int, *seeds: int) -> torch.Tensor:
    """A permutation of range(n) fixed by the integers `seeds`."""
    seed = 0
    for s in seeds:
        seed = (seed * 1_000_003 + s) % (2**61)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)


class TensorSource(Source):
    """Batches of rows of an in-memory tensor acts [N, d_in], reshuffled every epoch (seeded); with
    targets [N, d_out], (input, target) pairs."""

    def __init__(
        self,
        acts: torch.Tensor,
        batch_size: int,
        *,
        targets: torch.Tensor | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ):
        if acts.dim() != 2 or acts.shape[0] == 0:
            raise ValueError(f"acts must be a non-empty [N, d_in] tensor, got shape {tuple(acts.shape)}")
        if not 0 < batch_size:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.d_in = acts.shape[1]
        if targets is not None:
            if targets.dim() != 2 or targets.shape[0] != acts.shape[0]:
                raise ValueError(f"targets must be [N={acts.shape[0]}, d_out], got shape {tuple(targets.shape)}")
            self.d_out = targets.shape[1]
            acts = torch.cat([acts, targets.to(acts.dtype)], 1)
        self.acts, self.batch_size, self.shuffle, self.seed = acts, batch_size, shuffle, seed
        self.epoch, self.pos = 0, 0
        self._order = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            N = self.acts.shape[0]
            self._order = _perm(N, self.seed, self.epoch) if self.shuffle else torch.arange(N)
        return self._order

    def next_batch(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            order = self._epoch_order()
            take = order[self.pos : self.pos + need]
            parts.append(self.acts[take.to(self.acts.device)])
            need -= take.numel()
            self.pos += take.numel()
            if self.pos == order.numel():
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def sample(self, n: int) -> torch.Tensor:
        idx = _perm(self.acts.shape[0], self.seed, -1)[:n]
        return self.acts[idx.to(self.acts.device)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._order = state["epoch"], state["pos"], None


# Shards ----------------------------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _open_safetensors(path: Path) -> tuple[np.memmap, bool]:
    """Memory-map the activations of a .safetensors file: its tensor named "activations", else its only
    tensor. Returns ([N, d] memmap, is_bf16)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    name = "activations" if "activations" in header else next(iter(header)) if len(header) == 1 else None
    if name is None:
        raise ValueError(f"{path}: expected a tensor named 'activations' or a single tensor, got {sorted(header)}")
    info = header[name]
    if info["dtype"] not in _ST_DTYPES:
        raise ValueError(f"{path}: dtype {info['dtype']} is not one of {sorted(_ST_DTYPES)}")
    start, _ = info["data_offsets"]
    dtype, shape = _ST_DTYPES[info["dtype"]], tuple(info["shape"])
    arr = np.memmap(path, dtype=dtype, mode="r", offset=8 + size + start, shape=shape)
    return arr, info["dtype"] == "BF16"


def open_shard(path: str | os.PathLike) -> tuple[np.ndarray, bool]:
    """A shard as a read-only memory map [N, d] (and whether its raw uint16 words are bf16)."""
    path = Path(path)
    if path.suffix == ".npy":
        arr, bf16 = np.load(path, mmap_mode="r"), False
    elif path.suffix == ".safetensors":
        arr, bf16 = _open_safetensors(path)
    else:
        raise ValueError(f"{path}: unknown shard format (expected one of {SHARD_SUFFIXES})")
    if arr.ndim != 2:
        raise ValueError(f"{path}: shard must be 2-D [tokens, d_in], got shape {arr.shape}")
    return arr, bf16


def _to_torch(rows: np.ndarray, bf16: bool) -> torch.Tensor:
    t = torch.from_numpy(np.array(rows))  # a copy: memory maps are read-only
    return t.view(torch.bfloat16) if bf16 else t


def write_shard(path: str | os.PathLike, acts: torch.Tensor) -> Path:
    """Write acts [N, d] as one .npy or .safetensors shard (by suffix), atomically (temp file + rename)."""
    path = Path(path)
    acts = acts.detach().cpu().contiguous()
    if path.suffix == ".npy":
        if acts.dtype == torch.bfloat16:
            raise ValueError(".npy cannot hold bf16: use .safetensors or convert to float32")

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # np.save(str) would append ".npy" to the temporary name
                np.save(f, acts.numpy())

        return atomic_write(path, write)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        return atomic_write(path, lambda tmp: save_file({"activations": acts}, tmp))
    raise ValueError(f"{path}: unknown shard format (expected one of {SHARD_SUFFIXES})")


class ShardSource(Source):
    """Batches from a folder of shards [N_s, d_in] (.npy or .safetensors), read through memory maps. When the
    folder has a targets/ subfolder (or `targets` names a folder) with a shard [N_s, d_out] of the same name
    beside each, the source yields (input, target) pairs (d_out set; rows [.., d_in + d_out]).

    Each epoch cuts the shards into chunks of `chunk_tokens` rows, shuffles the chunks over all shards, and
    reads them `buffer_tokens` at a time into a shuffle buffer whose rows are permuted before they are
    served. Every permutation is seeded by (seed, epoch[, window]), so the position is two integers.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        batch_size: int,
        *,
        buffer_tokens: int = 1 << 16,
        chunk_tokens: int = 1024,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        targets: str | os.PathLike | None = None,
    ):
        self.paths = sorted(p for p in Path(folder).iterdir() if p.suffix in SHARD_SUFFIXES)
        if not self.paths:
            raise ValueError(f"folder={str(folder)!r} holds no {' or '.join(SHARD_SUFFIXES)} shards")
        self.shards = [open_shard(p) for p in self.paths]
        dims = {a.shape[1] for a, _ in self.shards}
        if len(dims) != 1:
            raise ValueError(f"shards in {folder} disagree on d_in: {sorted(dims)}")
        self.d_in = dims.pop()
        self.targets = None
        target_dir = Path(folder) / TARGETS if targets is None else Path(targets)
        if targets is not None or target_dir.is_dir():
            missing = [p.name for p in self.paths if not (target_dir / p.name).is_file()]
            if missing:
                raise ValueError(f"targets={str(target_dir)!r} has no target shard for {missing[:3]}")
            self.targets = [open_shard(target_dir / p.name) for p in self.paths]
            for p, (a, _), (t, _) in zip(self.paths, self.shards, self.targets):
                if t.shape[0] != a.shape[0]:
                    raise ValueError(f"{target_dir / p.name}: {t.shape[0]} target rows for {a.shape[0]} input rows")
            dims = {t.shape[1] for t, _ in self.targets}
            if len(dims) != 1:
                raise ValueError(f"target shards in {target_dir} disagree on d_out: {sorted(dims)}")
            self.d_out = dims.pop()
        self.batch_size, self.seed, self.dtype = batch_size, seed, dtype
        self.chunks = [  # (shard, first row, end row)
            (s, a, min(a + chunk_tokens, arr.shape[0]))
            for s, (arr, _) in enumerate(self.shards)
            for a in range(0, arr.shape[0], chunk_tokens)
        ]
        self.tokens = sum(arr.shape[0] for arr, _ in self.shards)
        self.per_window = max(1, buffer_tokens // chunk_tokens)
        self.epoch, self.pos = 0, 0  # the next batch's first row in the stream
        self.group, self.groups = 0, 1  # a data group's part (see part())
        self._window = None  # the shuffle buffer last used (_window_at)

    def _window_at(self, epoch: int, pos: int) -> list:
        """The shuffle buffer holding stream row `pos` of `epoch`: (epoch, its first stream row, its rows,
        [rows] the chunk order's row of each buffer row after the shuffle, the chunks' ids, their first
        rows in the buffer, the rows read: None until read)."""
        order = _perm(len(self.chunks), self.seed, epoch).tolist()
        start = 0
        for w in range(0, len(order), self.per_window):
            ids = order[w : w + self.per_window]
            sizes = [self.chunks[c][2] - self.chunks[c][1] for c in ids]
            rows = sum(sizes)
            if pos < start + rows:
                firsts = np.cumsum([0] + sizes[:-1])
                return [epoch, start, rows, _perm(rows, self.seed, epoch, w).numpy(), ids, firsts, None]
            start += rows
        raise IndexError(f"row {pos} is past the end of epoch {epoch}")

    def _stream(self, at: int, count: int) -> torch.Tensor:
        """Rows [at, at + count) of the stream (position epoch * tokens + row; epochs follow each other).
        The whole process reads whole shuffle buffers (chunks in order); a data group's part reads only its
        rows of them."""
        parts = []
        while count:
            epoch, pos = divmod(at, self.tokens)
            w = self._window
            if w is None or w[0] != epoch or not w[1] <= pos < w[1] + w[2]:
                w = self._window = self._window_at(epoch, pos)
            _, start, rows, perm, ids, firsts, buf = w
            take = min(count, start + rows - pos)
            picked = perm[pos - start : pos - start + take]
            if self.groups == 1:
                if buf is None:
                    buf = w[6] = torch.cat([self._rows(s, slice(a, b)) for s, a, b in (self.chunks[c] for c in ids)])
                parts.append(buf[torch.from_numpy(picked)])
            else:
                parts.append(self._gather(picked, ids, firsts))
            at, count = at + take, count - take
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _gather(self, picked: np.ndarray, ids: list[int], firsts: np.ndarray) -> torch.Tensor:
        """The buffer rows `picked` of the window of chunks `ids` (first buffer rows `firsts`), read alone."""
        c = np.searchsorted(firsts, picked, side="right") - 1
        shard = np.array([self.chunks[i][0] for i in ids])[c]
        row = np.array([self.chunks[i][1] for i in ids])[c] + picked - firsts[c]
        out = None
        for s in np.unique(shard):
            mine = np.flatnonzero(shard == s)
            order = np.argsort(row[mine], kind="stable")  # ascending rows: one forward pass over the memory map
            got = self._rows(int(s), row[mine][order])
            if out is None:
                out = got.new_empty(len(picked), got.shape[1])
            out[torch.from_numpy(mine[order])] = got
        return out

    def next_batch(self) -> torch.Tensor:
        at = self.epoch * self.tokens + self.pos
        rows = self._stream(at + self.group * self.batch_size, self.batch_size)
        self.epoch, self.pos = divmod(at + self.batch_size * self.groups, self.tokens)
        return rows

    def part(self, group: int, groups: int) -> ShardSource:
        """Data group `group` of `groups`: rows [group b, (group + 1) b) of each batch (b = batch_size / groups),
        the same rows as the whole source's batches, read alone (a group reads 1 / groups of the data)."""
        if self.groups != 1:
            raise ValueError("part() of a part: take the parts of the whole source")
        mine = copy.copy(self)
        mine.batch_size = _part_size(self.batch_size, group, groups)
        mine.group, mine.groups, mine._window = group, groups, None
        return mine

    def sample(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 7919)
        rows = torch.randint(self.tokens, (min(n, self.tokens),), generator=g).sort().values
        bounds = np.cumsum([0] + [arr.shape[0] for arr, _ in self.shards])
        out = []
        for s in range(len(self.shards)):
            local = rows[(rows >= int(bounds[s])) & (rows < int(bounds[s + 1]))] - int(bounds[s])
            if local.numel():
                out.append(self._rows(s, local.numpy()))
        return torch.cat(out)

    def _rows(self, s: int, idx) -> torch.Tensor:
        """Rows idx (a slice or an index array) of shard s, inputs and (paired) targets side by side."""
        arr, bf16 = self.shards[s]
        rows = _to_torch(arr[idx], bf16).to(self.dtype)
        if self.targets is None:
            return rows
        t, t_bf16 = self.targets[s]
        return torch.cat([rows, _to_torch(t[idx], t_bf16).to(self.dtype)], 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._window = state["epoch"], state["pos"], None
