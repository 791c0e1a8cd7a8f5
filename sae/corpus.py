"""Text in: Hugging Face `datasets` (local parquet / json / csv / arrow / text files, a folder written by
`save_to_disk`, or a Hub name), read whole or streamed, and cut into context windows of token ids.

Windows follow SAELens's rule (its ActivationsStore with prepend_bos=True): documents are tokenised without
special tokens and concatenated; every window starts with the BOS token, and a BOS separates two documents
inside a window (neither is added where the text already starts with BOS); a document longer than the
window goes on in the next window, after its BOS; the last, partial window is dropped. A tokenizer without
a BOS token (or prepend_bos=False) gives plain concatenation.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow", ".csv": "csv", ".txt": "text"}


def load_dataset(
    name: str | os.PathLike,
    *,
    split: str = "train",
    streaming: bool = False,
    part: tuple[int, int] = (0, 1),
):
    """A `datasets` Dataset (IterableDataset when streaming) of `name`'s split: a local file (by suffix:
    BUILDERS), a folder of such files or one written by `save_to_disk`, or a Hub dataset name. part=(i, n):
    the i-th of n disjoint parts (data-parallel groups read their own)."""
    try:
        import datasets
        from datasets.distributed import split_dataset_by_node
    except ImportError as e:
        raise ImportError("--dataset needs the `datasets` package: pip install datasets") from e
    i, n = part
    if not 0 <= i < n:
        raise ValueError(f"part must be (index, count) with 0 <= index < count, got {part}")
    path = Path(name)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"split={split!r} is not in {path}: it has {sorted(ds)}")
            ds = ds[split]
        ds = ds.to_iterable_dataset() if streaming else ds
    elif path.is_file():
        if path.suffix not in BUILDERS:
            raise ValueError(f"dataset={str(name)!r}: unknown file type {path.suffix!r} (known: {sorted(BUILDERS)})")
        files = {split: str(path)}
        ds = datasets.load_dataset(BUILDERS[path.suffix], data_files=files, split=split, streaming=streaming)
    else:
        ds = datasets.load_dataset(str(name), split=split, streaming=streaming)
    return split_dataset_by_node(ds, rank=i, world_size=n) if n > 1 else ds


def texts(ds, column: str = "text") -> Iterator[str]:
    """The non-empty strings of `column`, row by row."""
    names = getattr(ds, "column_names", None)
    if names is not None and column not in names:
        raise ValueError(f"column={column!r} is not a column of the dataset; it has {names}")
    for row in ds:
        if column not in row:
            raise ValueError(f"column={column!r} is not a column of the dataset; it has {sorted(row)}")
        if row[column]:
            yield row[column]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def context_windows(docs: Iterable[str], tokenizer, context: int, *, prepend_bos: bool = True) -> Iterator[list[int]]:
    """Windows of `context` token ids from documents (the module docstring has the rule). tokenizer: a
    Hugging Face tokenizer, or any callable tokenizer(text, add_special_tokens=False, verbose=False) ->
    {"input_ids": [...]} with a bos_token_id attribute (None: no BOS)."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    bos = getattr(tokenizer, "bos_token_id", None) if prepend_bos else None
    window: list[int] = []
    for doc in docs:
        ids, first = _ids(tokenizer, doc), True
        while ids:
            if bos is not None and ids[0] != bos and (not window or first):
                window.append(bos)  # the window's BOS, or the separator before a new document
            take = context - len(window)
            window += ids[:take]
            ids, first = ids[take:], False
            if len(window) == context:
                yield window
                window = []


def window_batches(windows: Iterable[list[int]], batch_size: int) -> Iterator[torch.Tensor]:
    """[batch_size, context] int64 batches of windows (a last, partial batch is dropped)."""
    batch = []
    for w in windows:
        batch.append(w)
        if len(batch) == batch_size:
            yield torch.tensor(batch)
            batch = []


class TokenBatches:
    """A re-iterable of [batch_size, context] input-id batches (each pass reads the documents again), for
    sources that wrap around (HarvestSource) and for harvesting. docs: a function that returns the documents
    (strings) anew on each call, e.g. `lambda: texts(ds, "text")`."""

    def __init__(
        self,
        docs: Callable[[], Iterable[str]],
        tokenizer,
        *,
        context: int = 128,
        batch_size: int = 8,
        prepend_bos: bool = True,
    ):
        self.docs, self.tokenizer, self.context, self.batch_size = docs, tokenizer, context, batch_size
        self.prepend_bos = prepend_bos

    def __iter__(self) -> Iterator[torch.Tensor]:
        windows = context_windows(self.docs(), self.tokenizer, self.context, prepend_bos=self.prepend_bos)
        return window_batches(windows, self.batch_size)

    def part(self, group: int, groups: int) -> TokenBatches:
        """The batches of documents group, group + groups, group + 2 groups, ... (a data group tokenises and
        runs the model on its own documents only; as `datasets` splits a stream whose shards do not divide)."""
        if not 0 <= group < groups:
            raise ValueError(f"group must be in [0, groups={groups}), got {group}")
        docs = lambda: itertools.islice(self.docs(), group, None, groups)
        return TokenBatches(
            docs, self.tokenizer, context=self.context, batch_size=self.batch_size, prepend_bos=self.prepend_bos
        )
