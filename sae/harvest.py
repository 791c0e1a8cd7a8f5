"""Harvesting activations from a PyTorch / Hugging Face model through a forward hook on a named module.

The hook records the module's output (the first element when it returns a tuple) and stops the forward
pass there, so layers after it never run. Activations stream as a Source with a shuffle buffer, or are
written as shards for `ShardSource`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from .data import Source, _perm, write_shard


class _Stop(Exception):
    pass


class Harvester:
    """Activations of `module_name` (a dotted name, as in model.named_modules()) of `model`.

    Call with input_ids [b, T] (and optionally attention_mask [b, T]) -> [tokens, d] in `dtype`: the
    activations at every position, padding positions (mask 0) dropped.
    """

    def __init__(self, model: torch.nn.Module, module_name: str, *, dtype: torch.dtype = torch.float32):
        try:
            self.module = model.get_submodule(module_name)
        except AttributeError as e:
            names = [n for n, _ in model.named_modules() if n]
            # "layers.2" for "encoder.layer.2": prefer the names with the same last part, then the closest
            tail = [n for n in names if n.rsplit(".", 1)[-1] == module_name.rsplit(".", 1)[-1]]
            close = difflib.get_close_matches(module_name, tail or names, n=5, cutoff=0 if tail else 0.5)
            close = close or names[:5]
            raise ValueError(
                f"module_name={module_name!r} is not a module of the model; closest: {', '.join(close)} "
                f"(all {len(names)}: model.named_modules())"
            ) from e
        self.model, self.module_name, self.dtype = model.eval(), module_name, dtype
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        caught = []

        def hook(_module, _inputs, output):
            caught.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        handle = self.module.register_forward_hook(hook)
        try:
            kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.to(self.device)}
            self.model(input_ids.to(self.device), **kwargs)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not caught:
            raise RuntimeError(f"module {self.module_name!r} did not run in the forward pass")
        acts = caught[0]
        acts = acts.reshape(-1, acts.shape[-1])
        if attention_mask is not None:
            acts = acts[attention_mask.reshape(-1).to(acts.device).bool()]
        return acts.to(self.dtype)


def token_batches(
    texts: Iterable[str], tokenizer, *, context: int = 128, batch_size: int = 8
) -> Iterator[torch.Tensor]:
    """Tokenise texts, join them with the tokenizer's EOS token, and cut the stream into [batch_size,
    context] batches of input ids (a final partial batch is dropped). tokenizer: a Hugging Face tokenizer, or
    any callable tokenizer(text, verbose=False) -> {"input_ids": [...]}."""
    eos = getattr(tokenizer, "eos_token_id", None)
    buf: list[int] = []
    need = context * batch_size
    for text in texts:
        buf.extend(tokenizer(text, verbose=False)["input_ids"])  # long texts are cut into windows below
        if eos is not None:
            buf.append(eos)
        while len(buf) >= need:
            yield torch.tensor(buf[:need]).reshape(batch_size, context)
            buf = buf[need:]


def harvest_to_shards(
    harvester: Harvester,
    batches: Iterable[torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    shard_tokens: int = 1 << 16,
    max_tokens: int | None = None,
    suffix: str = ".safetensors",
) -> list[Path]:
    """Run the harvester over batches of input ids and write [shard_tokens, d] shards (the last may be
    shorter) to out_dir as shard-00000<suffix>, ...; stops after max_tokens tokens. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, pending, held, total = [], [], 0, 0

    def flush(rows: torch.Tensor):
        paths.append(write_shard(out_dir / f"shard-{len(paths):05d}{suffix}", rows))

    for ids in batches:
        acts = harvester(ids).cpu()
        if max_tokens is not None:
            acts = acts[: max_tokens - total]
        pending.append(acts)
        held += acts.shape[0]
        total += acts.shape[0]
        while held >= shard_tokens:
            rows = torch.cat(pending)
            flush(rows[:shard_tokens])
            pending, held = [rows[shard_tokens:]], rows.shape[0] - shard_tokens
        if max_tokens is not None and total >= max_tokens:
            break
    if held:
        flush(torch.cat(pending))
    return paths


class HarvestSource(Source):
    """Streams activations from a model over a sequence of input-id batches (wrapping around at the end).

    Activations of successive batches fill a shuffle buffer of at least `buffer_tokens` rows, which is
    permuted (seeded by the epoch and its first batch) and served. The position is (epoch, first batch of
    the buffer, row in the buffer); a resumed source recomputes that buffer and continues exactly.
    """

    def __init__(
        self,
        harvester: Harvester,
        batches: Sequence[torch.Tensor],
        batch_size: int,
        *,
        buffer_tokens: int = 1 << 14,
        seed: int = 0,
    ):
        if len(batches) == 0:
            raise ValueError("batches must hold at least one batch of input ids")
        self.harvester, self.batches, self.batch_size = harvester, batches, batch_size
        self.buffer_tokens, self.seed = buffer_tokens, seed
        self.d_in = harvester(batches[0][:1, :1]).shape[-1]
        self.epoch, self.first, self.pos = 0, 0, 0
        self._buf, self._next = None, 0

    def _fill(self) -> None:
        parts, rows, i = [], 0, self.first
        while rows < self.buffer_tokens and i < len(self.batches):
            parts.append(self.harvester(self.batches[i]))
            rows += parts[-1].shape[0]
            i += 1
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
                if self.first == len(self.batches):
                    self.epoch, self.first = self.epoch + 1, 0
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def sample(self, n: int) -> torch.Tensor:
        parts, rows = [], 0
        for ids in self.batches:
            parts.append(self.harvester(ids))
            rows += parts[-1].shape[0]
            if rows >= n:
                break
        return torch.cat(parts)[:n]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "first": self.first, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.first, self.pos = state["epoch"], state["first"], state["pos"]
        self._buf = None
