"""Harvesting activations from a PyTorch / Hugging Face model through a forward hook on a named module.

The hook records the module's output (the first element when it returns a tuple) and stops the forward
pass there, so layers after it never run. Activations stream as a Source with a shuffle buffer, or are
written as shards for `ShardSource`. With a target module (transcoders) the harvester records both modules
and yields (input, target) pairs, rows [tokens, d_in + d_out] side by side (sae.data's paired rows).

Stored format of a harvest folder (`harvest_to_shards`), rows in stream order (window by window, position by
position):

    shard-00000.safetensors   "activations" [N_s, d] (or shard-00000.npy: the [N_s, d] array)
    shard-00000.tokens.npz    beside each shard, row for row: "token_ids" [N_s] int32 (the input id at the row),
                              "sequence" [N_s] int64 (the window's index in the whole harvest), "position" [N_s]
                              int32 (the row's position in its window)
    targets/shard-00000.*     with a target module: the target module's activations [N_s, d_out], row for row

`ShardSource` reads only the shards; `HarvestedActivations` reads both, in order, for evaluations that show
each latent's top-activating contexts.
"""

from __future__ import annotations

import difflib
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .corpus import context_windows, window_batches
from .data import SHARD_SUFFIXES, TARGETS, Source, _part_size, _perm, _to_torch, open_shard, split_pairs, write_shard

TOKENS_SUFFIX = ".tokens.npz"
TOKEN_FIELDS = {"token_ids": np.int32, "sequence": np.int64, "position": np.int32}


class _Stop(Exception):
    pass


def _submodule(model: torch.nn.Module, name: str, arg: str) -> torch.nn.Module:
    """model's module `name`, or a ValueError naming the argument and the closest module names."""
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        names = [n for n, _ in model.named_modules() if n]
        # "layers.2" for "encoder.layer.2": prefer the names with the same last part, then the closest
        tail = [n for n in names if n.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]]
        close = difflib.get_close_matches(name, tail or names, n=5, cutoff=0 if tail else 0.5)
        close = close or names[:5]
        raise ValueError(
            f"{arg}={name!r} is not a module of the model; closest: {', '.join(close)} "
            f"(all {len(names)}: model.named_modules())"
        ) from e


class Harvester:
    """Activations of `module_name` (a dotted name, as in model.named_modules()) of `model`.

    Call with input_ids [b, T] (and optionally attention_mask [b, T]) -> [tokens, d] in `dtype`: the
    activations at every position, padding positions (mask 0) dropped. With `target_module` (a transcoder's
    target): [tokens, d_in + d_out], each row the input module's activation and the target module's side by
    side; the forward pass stops once both have run. d_in and d_out (None without a target) are set by the
    first call.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        module_name: str,
        *,
        target_module: str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.module = _submodule(model, module_name, "module_name")
        self.target = None if target_module is None else _submodule(model, target_module, "target_module")
        self.model, self.module_name, self.dtype = model.eval(), module_name, dtype
        self.device = next(model.parameters()).device
        self.d_in = self.d_out = None

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        wanted = {"input": self.module} | ({} if self.target is None else {"target": self.target})
        caught = {}

        def hook(key):
            def record(_module, _inputs, output):
                caught.setdefault(key, output[0] if isinstance(output, tuple) else output)
                if len(caught) == len(wanted):
                    raise _Stop

            return record

        handles = [m.register_forward_hook(hook(key)) for key, m in wanted.items()]
        try:
            kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.to(self.device)}
            self.model(input_ids.to(self.device), **kwargs)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if "input" not in caught:
            raise RuntimeError(f"module {self.module_name!r} did not run in the forward pass")
        if len(caught) < len(wanted):
            raise RuntimeError("the target module did not run in the forward pass")
        rows = [a.reshape(-1, a.shape[-1]) for a in (caught[k] for k in wanted)]
        self.d_in, self.d_out = rows[0].shape[1], rows[1].shape[1] if len(rows) > 1 else None
        acts = torch.cat(rows, 1) if len(rows) > 1 else rows[0]
        if attention_mask is not None:
            acts = acts[attention_mask.reshape(-1).to(acts.device).bool()]
        return acts.to(self.dtype)


def token_batches(
    texts: Iterable[str], tokenizer, *, context: int = 128, batch_size: int = 8, prepend_bos: bool = True
) -> Iterator[torch.Tensor]:
    """[batch_size, context] batches of input ids from texts: context windows with SAELens's BOS rule
    (sae.corpus.context_windows), a final partial batch dropped. tokenizer: a Hugging Face tokenizer, or any
    callable tokenizer(text, add_special_tokens=False, verbose=False) -> {"input_ids": [...]}."""
    return window_batches(context_windows(texts, tokenizer, context, prepend_bos=prepend_bos), batch_size)


def tokens_path(shard: str | os.PathLike) -> Path:
    """The token file beside a shard: shard-00000.safetensors -> shard-00000.tokens.npz."""
    shard = Path(shard)
    return shard.with_name(shard.name[: -len(shard.suffix)] + TOKENS_SUFFIX)


def write_tokens(shard: str | os.PathLike, **fields: torch.Tensor) -> Path:
    """Write the token file of a shard (TOKEN_FIELDS, [N_s] each), atomically."""
    arrays = {k: fields[k].cpu().numpy().astype(t) for k, t in TOKEN_FIELDS.items()}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # np.savez(str) would append ".npz" to the temporary name
            np.savez(f, **arrays)

    return atomic_write(tokens_path(shard), write)


def harvest_to_shards(
    harvester: Harvester,
    batches: Iterable[torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    shard_tokens: int = 1 << 16,
    max_tokens: int | None = None,
    suffix: str = ".safetensors",
) -> list[Path]:
    """Run the harvester over batches of input ids [b, T] and write [shard_tokens, d] shards (the last may be
    shorter) to out_dir as shard-00000<suffix>, ..., each with its token file and, for a harvester with a
    target module, its target shard in out_dir/targets/ (the module docstring has the format); stops after
    max_tokens tokens. Returns the shards' paths."""
    out_dir = Path(out_dir)
    (out_dir / TARGETS if harvester.target is not None else out_dir).mkdir(parents=True, exist_ok=True)
    paths, pending, held, total, windows = [], [], 0, 0, 0

    def flush(parts: list[torch.Tensor]):
        acts, targets = split_pairs(parts[0], harvester.d_in, harvester.d_out)
        name = f"shard-{len(paths):05d}{suffix}"
        if targets is not None:  # first, so that an input shard on disk always has its target
            write_shard(out_dir / TARGETS / name, targets)
        path = write_shard(out_dir / name, acts)
        write_tokens(path, **dict(zip(TOKEN_FIELDS, parts[1:])))
        paths.append(path)

    for ids in batches:
        acts = harvester(ids).cpu()
        b, T = ids.shape
        parts = [
            acts,
            ids.reshape(-1).cpu(),
            torch.arange(windows, windows + b).repeat_interleave(T),
            torch.arange(T).repeat(b),
        ]
        windows += b
        if max_tokens is not None:
            parts = [p[: max_tokens - total] for p in parts]
        pending.append(parts)
        held += parts[0].shape[0]
        total += parts[0].shape[0]
        while held >= shard_tokens:
            rows = [torch.cat(p) for p in zip(*pending)]
            flush([r[:shard_tokens] for r in rows])
            pending, held = [[r[shard_tokens:] for r in rows]], rows[0].shape[0] - shard_tokens
        if max_tokens is not None and total >= max_tokens:
            break
    if held:
        flush([torch.cat(p) for p in zip(*pending)])
    return paths


class HarvestedActivations:
    """The shards of a harvest folder read in stream order: an iterable of [<= batch_size, d] batches (read
    again on every iteration), `rows(idx)` for random access, and `tokens`, the token files' fields as [N]
    int64 tensors (None when a shard has no token file). The first `max_tokens` rows when given."""

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        batch_size: int = 4096,
        max_tokens: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix in SHARD_SUFFIXES)
        if not paths:
            raise ValueError(f"folder={str(folder)!r} holds no {' or '.join(SHARD_SUFFIXES)} shards")
        self.shards = [open_shard(p) for p in paths]
        self.batch_size, self.dtype = batch_size, dtype
        sizes = [a.shape[0] for a, _ in self.shards]
        self.N = sum(sizes) if max_tokens is None else min(sum(sizes), max_tokens)
        self.starts = np.cumsum([0, *sizes])
        self.d = self.shards[0][0].shape[1]
        self.tokens = None
        if all(tokens_path(p).is_file() for p in paths):
            files = [np.load(tokens_path(p)) for p in paths]
            joined = {k: np.concatenate([f[k] for f in files])[: self.N] for k in TOKEN_FIELDS}
            self.tokens = {k: torch.from_numpy(v).long() for k, v in joined.items()}

    def __len__(self) -> int:
        return self.N

    def __iter__(self) -> Iterator[torch.Tensor]:
        for s, (arr, bf16) in enumerate(self.shards):
            end = min(arr.shape[0], self.N - int(self.starts[s]))
            for a in range(0, max(end, 0), self.batch_size):
                yield _to_torch(arr[a : min(a + self.batch_size, end)], bf16).to(self.dtype)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """[len(idx), d]: the rows at the stream positions idx (int, in [0, N))."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < self.N):
            raise IndexError(f"rows must be in [0, {self.N})")
        out = torch.zeros(idx.numel(), self.d, dtype=self.dtype)
        shard = np.searchsorted(self.starts, idx.numpy(), side="right") - 1
        for s in np.unique(shard):
            mine = np.flatnonzero(shard == s)
            arr, bf16 = self.shards[s]
            local = idx.numpy()[mine] - int(self.starts[s])
            out[torch.from_numpy(mine)] = _to_torch(arr[local], bf16).to(self.dtype)
        return out


class _Strided:
    """Items start, start + step, ... of a re-iterable, itself re-iterable (read lazily, each pass again)."""

    def __init__(self, items: Iterable, start: int, step: int):
        self.items, self.start, self.step = items, start, step

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.items), self.start, None, self.step)


class HarvestSource(Source):
    """Streams activations from a running model over input-id batches (wrapping around at the end): the
    on-the-fly source, for runs whose activations are too many to store.

    batches: a list of [b, T] input ids, or any re-iterable of them (each pass reads them again, e.g.
    sae.corpus.TokenBatches over a streamed dataset). Activations of successive batches fill a shuffle buffer
    of at least `buffer_tokens` rows, which is permuted (seeded by the epoch and its first batch) and served.
    The position is (epoch, first batch of the buffer, row in the buffer); a resumed source skips to that
    batch, recomputes the buffer and continues exactly. A harvester with a target module gives (input,
    target) pairs (d_out set).
    """

    def __init__(
        self,
        harvester: Harvester,
        batches: Iterable[torch.Tensor],
        batch_size: int,
        *,
        buffer_tokens: int = 1 << 14,
        seed: int = 0,
    ):
        first = next(iter(batches), None)
        if first is None:
            raise ValueError("batches must hold at least one batch of input ids")
        self.harvester, self.batches, self.batch_size = harvester, batches, batch_size
        self.buffer_tokens, self.seed = buffer_tokens, seed
        harvester(first[:1, :1])
        self.d_in, self.d_out = harvester.d_in, harvester.d_out
        self.epoch, self.first, self.pos = 0, 0, 0
        self.part_of: tuple[int, int] | None = None  # (group, groups) for a data group's part
        self._buf, self._next, self._reader, self._last = None, 0, None, False

    def _fill(self) -> None:
        while True:
            if self._reader is None:  # (re)start reading at batch `first`
                self._reader = itertools.islice(iter(self.batches), self.first, None)
            parts, rows, i = [], 0, self.first
            while rows < self.buffer_tokens:
                ids = next(self._reader, None)
                if ids is None:
                    break
                parts.append(self.harvester(ids))
                rows += parts[-1].shape[0]
                i += 1
            self._last = rows < self.buffer_tokens  # the reader ran out: this buffer ends the epoch
            if parts:
                break
            self.epoch, self.first, self._reader = self.epoch + 1, 0, None  # the epoch ended on a buffer's edge
        buf = torch.cat(parts)
        self._buf, self._next = buf[_perm(buf.shape[0], self.seed, self.epoch, self.first).to(buf.device)], i

    def next_batch(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            if self._buf is None:
                self._fill()
            take = self._buf[self.pos : self.pos + need]
            parts.append(take)
            need -= take.shape[0]
            self.pos += take.shape[0]
            if self.pos == self._buf.shape[0]:
                self.first, self.pos, self._buf = self._next, 0, None
                if self._last:
                    self.epoch, self.first, self._reader = self.epoch + 1, 0, None
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def sample(self, n: int) -> torch.Tensor:
        parts, rows = [], 0
        for ids in self.batches:
            parts.append(self.harvester(ids))
            rows += parts[-1].shape[0]
            if rows >= n:
                break
        return torch.cat(parts)[:n]

    def part(self, group: int, groups: int) -> HarvestSource:
        """Data group `group` of `groups`: a source of batch_size / groups rows that runs the model on its own
        input ids only (`batches.part(group, groups)` where the batches have one, as sae.corpus.TokenBatches,
        else every groups-th batch), with a shuffle buffer of its own of buffer_tokens rows. Unlike the stored
        shards' parts, the groups' batches together are not this source's batches: each reads other text."""
        size = _part_size(self.batch_size, group, groups)
        if hasattr(self.batches, "part"):
            batches = self.batches.part(group, groups)
        else:
            if next(itertools.islice(iter(self.batches), groups - 1, None), None) is None:
                raise ValueError(f"{groups} data groups need {groups} batches of input ids or more")
            batches = _Strided(self.batches, group, groups)
        mine = HarvestSource(self.harvester, batches, size, buffer_tokens=self.buffer_tokens, seed=self.seed)
        mine.part_of = (group, groups)
        return mine

    def state_dict(self) -> dict:
        """The position; a part's names its part: it means nothing to another part."""
        state = {"epoch": self.epoch, "first": self.first, "pos": self.pos}
        return state if self.part_of is None else state | {"part": list(self.part_of)}

    def load_state_dict(self, state: dict) -> None:
        part = tuple(state["part"]) if "part" in state else None
        if part != self.part_of:
            raise ValueError(f"a data position of part {part} (group, groups) cannot resume part {self.part_of}")
        self.epoch, self.first, self.pos = state["epoch"], state["first"], state["pos"]
        self._buf, self._reader = None, None
