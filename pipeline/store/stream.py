"""Batches streamed from chunked stores, reading each chunk once per epoch.

A `ChunkStream` walks the chunks of a `ChunkSource` (all arrays of a source share one chunk grid
along the sample axis), shuffles the chunk order each epoch, and shuffles samples within a bounded
buffer of chunks, reading the next group of chunks ahead. Memory holds at most twice
`buffer_chunks` chunks, whatever the dataset size. Under a DataLoader with worker processes, each
worker takes every k-th chunk and opens its stores lazily.
"""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class ChunkSource(Protocol):
    """Arrays on one chunk grid: `read_chunk(c, epoch)` returns every array's values over chunk
    c; sources that draw random augmentation views seed them with the epoch."""

    chunk_size: int

    def __len__(self) -> int: ...

    def read_chunk(self, chunk: int, epoch: int = 0) -> dict[str, np.ndarray]: ...


Batch = dict[str, torch.Tensor]


class ChunkStream(IterableDataset):
    """Shuffled (or ordered) batches from a ChunkSource.

    The epoch number advances at each pass, so that worker processes kept alive across epochs
    shuffle alike without being told; `seed` and the epoch fix the order.
    """

    def __init__(
        self,
        source: ChunkSource,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        buffer_chunks: int = 4,
        drop_last: bool = False,
        read_ahead: bool = True,
    ) -> None:
        self.source = source
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_chunks = buffer_chunks
        self.drop_last = drop_last
        self.read_ahead = read_ahead
        self.epoch = 0

    @property
    def num_chunks(self) -> int:
        return -(-len(self.source) // self.source.chunk_size)

    def __len__(self) -> int:
        """Batches per epoch (exact with one worker; an upper bound with several)."""
        full, rest = divmod(len(self.source), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def chunk_order(self, epoch: int) -> np.ndarray:
        chunks = np.arange(self.num_chunks)
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(chunks)
        return chunks

    def __iter__(self) -> Iterator[Batch]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        rng = np.random.default_rng([self.seed, epoch, 1])
        chunks = self.chunk_order(epoch)
        worker = get_worker_info()
        if worker is not None:
            chunks = chunks[worker.id :: worker.num_workers]
        pending: dict[str, np.ndarray] | None = None  # fewer than a batch, carried over
        groups = [
            chunks[i : i + self.buffer_chunks] for i in range(0, len(chunks), self.buffer_chunks)
        ]
        for blocks in self._read_groups(groups, epoch):
            if pending is not None:
                blocks.insert(0, pending)
            # (block, row) of every buffered sample: batches are gathered straight from the
            # blocks, one copy per batch, instead of concatenating the buffer first.
            rows = [(b, r) for b, block in enumerate(blocks) for r in range(_length(block))]
            if self.shuffle:
                rows = [rows[i] for i in rng.permutation(len(rows))]
            whole = len(rows) - len(rows) % self.batch_size
            for start in range(0, whole, self.batch_size):
                yield _gather(blocks, rows[start : start + self.batch_size])
            pending = _gather_arrays(blocks, rows[whole:]) if whole < len(rows) else None
        if pending is not None and not self.drop_last:
            yield {name: torch.from_numpy(values) for name, values in pending.items()}

    def _read_groups(
        self, groups: list[np.ndarray], epoch: int
    ) -> Iterator[list[dict[str, np.ndarray]]]:
        """Each group's chunks; with `read_ahead`, a thread reads the next group while the
        current one's batches train (the codecs release the GIL), so memory holds two groups."""

        def read(group: np.ndarray) -> list[dict[str, np.ndarray]]:
            return [self.source.read_chunk(int(c), epoch) for c in group]

        if not self.read_ahead:
            yield from map(read, groups)
            return
        with ThreadPoolExecutor(1) as reader:
            upcoming = reader.submit(read, groups[0]) if groups else None
            for index in range(len(groups)):
                blocks = upcoming.result()
                if index + 1 < len(groups):
                    upcoming = reader.submit(read, groups[index + 1])
                yield blocks


def _length(block: dict[str, np.ndarray]) -> int:
    return len(next(iter(block.values())))


def _gather_arrays(
    blocks: list[dict[str, np.ndarray]], rows: list[tuple[int, int]]
) -> dict[str, np.ndarray]:
    return {name: np.stack([blocks[b][name][r] for b, r in rows]) for name in blocks[0]}


def _gather(blocks: list[dict[str, np.ndarray]], rows: list[tuple[int, int]]) -> Batch:
    return {name: torch.from_numpy(values) for name, values in _gather_arrays(blocks, rows).items()}


def make_loader(stream: ChunkStream, num_workers: int) -> DataLoader:
    """A DataLoader over a stream: workers start with `spawn` (zarr runs an asyncio loop on a
    thread, which must not be forked), stay alive across epochs and read ahead of training."""
    if num_workers == 0:
        return DataLoader(stream, batch_size=None)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        multiprocessing_context="spawn",
        persistent_workers=True,
        prefetch_factor=4,
    )
