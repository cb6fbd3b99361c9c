"""Chunk sources held in memory: every chunk decoded once, then served from memory every epoch.

Decoding a cached teacher feature costs far more than using it (a float16 chunk goes through
Blosc, a checksum and zarr's write path backwards); when the decoded data fits in memory, paying
that once instead of once per epoch is what makes the cache cheaper than running the teachers.
"""

import os
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch

from pipeline.progress import progress_bar
from pipeline.store.stream import Block, ChunkSource

# A container's memory limit and use (cgroup v2, then v1): the machine's free memory is not the
# container's, and going over its limit kills the process without a message.
CGROUP_FILES = [
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
]


def available_memory() -> int:
    """Bytes free for a new allocation now: the machine's available memory, or what is left under
    the container's limit if that is less."""
    free = psutil.virtual_memory().available
    for limit_file, usage_file in CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit():  # "max": no limit
            free = min(free, max(int(limit) - usage, 0))
        break
    return free


def num_chunks(source: ChunkSource) -> int:
    return -(-len(source) // source.chunk_size)


def chunk_nbytes(block: Block) -> int:
    return sum(values.nbytes for values in block.values())


class ResidentChunks:
    """A ChunkSource's chunks, each read once from `source` and kept: `read_chunk` then returns
    the same values as `source.read_chunk` would, from memory. Chunks are read by a pool of
    threads (Blosc and zarr's codecs release the GIL), with a progress bar. With a `device`, the
    arrays named in `on_device` are kept there as tensors (the rest stay numpy arrays).

    The arrays are shared between epochs: callers replace a block's entries, never write into
    them (a fresh dict is returned each time)."""

    def __init__(
        self,
        source: ChunkSource,
        description: str,
        device: torch.device | None = None,
        on_device: Collection[str] = (),
        threads: int = 0,
        progress: bool = True,
    ) -> None:
        self.chunk_size = source.chunk_size
        self.length = len(source)
        count = num_chunks(source)

        def read(chunk: int) -> Block:
            block = source.read_chunk(chunk)
            if device is not None:
                for name in on_device:
                    block[name] = torch.from_numpy(block[name]).to(device)
            return block

        first = read(0)  # in this thread: sources open their arrays lazily
        threads = threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(threads) as pool:
            rest = pool.map(read, range(1, count))
            bar = progress_bar(rest, progress, total=count, initial=1, desc=description)
            self.chunks = [first, *bar]

    def __len__(self) -> int:
        return self.length

    def read_chunk(self, chunk: int, epoch: int = 0) -> Block:
        return dict(self.chunks[chunk])
