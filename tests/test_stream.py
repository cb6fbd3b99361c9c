"""ChunkStream: every sample once per epoch, each chunk read once, bounded memory, reproducible."""

import threading

import numpy as np
import pytest
import torch

from pipeline.errors import DataError
from pipeline.store.stream import ChunkStream, make_loader


class CountingSource:
    """A ChunkSource over arange(n) that counts its chunk reads."""

    def __init__(self, num_samples: int, chunk_size: int) -> None:
        self.num_samples = num_samples
        self.chunk_size = chunk_size
        self.reads: list[int] = []

    def __len__(self) -> int:
        return self.num_samples

    def read_chunk(self, chunk: int, epoch: int = 0) -> dict[str, np.ndarray]:
        self.reads.append(chunk)
        start = chunk * self.chunk_size
        index = np.arange(start, min(start + self.chunk_size, self.num_samples))
        return {"index": index, "value": index.astype(np.float32) * 2}


def epoch_indices(stream: ChunkStream) -> list[int]:
    return [i for batch in stream for i in batch["index"].tolist()]


@pytest.mark.parametrize(
    ("num_samples", "chunk_size", "batch_size"), [(37, 5, 4), (40, 8, 8), (3, 4, 2)]
)
def test_each_sample_once_and_each_chunk_read_once_per_epoch(num_samples, chunk_size, batch_size):
    source = CountingSource(num_samples, chunk_size)
    stream = ChunkStream(source, batch_size, shuffle=True, seed=3, buffer_chunks=2)
    for _epoch in range(3):
        source.reads.clear()
        batches = list(stream)
        indices = [i for b in batches for i in b["index"].tolist()]
        assert sorted(indices) == list(range(num_samples))
        assert sorted(source.reads) == list(range(-(-num_samples // chunk_size)))
        assert all(len(b["index"]) == batch_size for b in batches[:-1])
        assert len(batches) == len(stream)
        for b in batches:  # arrays stay aligned within a batch
            assert torch.equal(b["value"], b["index"].float() * 2)


def test_shuffling_mixes_within_the_buffer_and_changes_each_epoch():
    stream = ChunkStream(CountingSource(64, 8), 4, shuffle=True, seed=0, buffer_chunks=2)
    first, second = epoch_indices(stream), epoch_indices(stream)
    assert first != second and first != list(range(64))
    # With a buffer of 2 chunks, the first 16 samples come from just two chunks.
    assert len({i // 8 for i in first[:16]}) == 2


def test_the_same_seed_gives_the_same_order():
    first = epoch_indices(ChunkStream(CountingSource(30, 4), 3, True, seed=7))
    again = epoch_indices(ChunkStream(CountingSource(30, 4), 3, True, seed=7))
    other = epoch_indices(ChunkStream(CountingSource(30, 4), 3, True, seed=8))
    assert first == again != other


def test_unshuffled_streams_keep_the_order_and_drop_last_drops_the_rest():
    assert epoch_indices(ChunkStream(CountingSource(10, 3), 4, shuffle=False)) == list(range(10))
    stream = ChunkStream(CountingSource(10, 3), 4, shuffle=False, drop_last=True)
    assert epoch_indices(stream) == list(range(8))
    assert len(stream) == 2


@pytest.mark.parametrize("read_ahead", [False, True])
def test_memory_is_bounded_by_the_buffer(read_ahead: bool):
    """Samples read but not yet yielded never exceed the buffer (twice over when the next group
    is read ahead) plus a partial batch."""
    source = CountingSource(1000, 10)
    stream = ChunkStream(source, 7, shuffle=True, buffer_chunks=3, read_ahead=read_ahead)
    yielded, most_held = 0, 0
    for batch in stream:
        held = len(source.reads) * 10 - yielded
        most_held = max(most_held, held)
        yielded += len(batch["index"])
    assert yielded == 1000
    assert most_held <= (2 if read_ahead else 1) * 3 * 10 + 7


class ThreadRecordingSource(CountingSource):
    """A CountingSource that notes the threads it is read from."""

    def __init__(self, num_samples: int, chunk_size: int) -> None:
        super().__init__(num_samples, chunk_size)
        self.threads: set[str] = set()

    def read_chunk(self, chunk: int, epoch: int = 0) -> dict[str, np.ndarray]:
        self.threads.add(threading.current_thread().name)
        return super().read_chunk(chunk, epoch)


def test_reading_ahead_reads_in_another_thread_and_changes_no_batch():
    batches = {}
    for read_ahead in (False, True):
        source = ThreadRecordingSource(45, 4)
        stream = ChunkStream(
            source, 5, shuffle=True, seed=2, buffer_chunks=2, read_ahead=read_ahead
        )
        batches[read_ahead] = [[b["index"].tolist() for b in stream] for _ in range(2)]
        on_main = source.threads == {threading.main_thread().name}
        assert on_main != read_ahead, source.threads
    assert batches[True] == batches[False]


def test_spawned_workers_split_the_chunks_and_keep_shuffling_across_epochs():
    stream = ChunkStream(CountingSource(48, 4), 4, shuffle=True, seed=1)
    loader = make_loader(stream, num_workers=2)
    assert loader.multiprocessing_context.get_start_method() == "spawn"
    epochs = [[i for b in loader for i in b["index"].tolist()] for _ in range(2)]
    for indices in epochs:
        assert sorted(indices) == list(range(48))
    assert epochs[0] != epochs[1]


class FailingSource(CountingSource):
    def read_chunk(self, chunk: int, epoch: int = 0) -> dict[str, np.ndarray]:
        if chunk == 5:
            raise DataError("chunk 5 is damaged: run `kdmtl prepare` again")
        return super().read_chunk(chunk, epoch)


def test_an_error_read_ahead_comes_out_unchanged_and_an_early_stop_leaves_no_thread():
    stream = ChunkStream(FailingSource(40, 4), 4, shuffle=False, buffer_chunks=2)
    with pytest.raises(DataError, match=r"^chunk 5 is damaged: run `kdmtl prepare` again$"):
        list(stream)
    # Other tests' background threads may end meanwhile: only new threads count.
    threads = set(threading.enumerate())
    batches = iter(ChunkStream(CountingSource(40, 4), 4, shuffle=False, buffer_chunks=2))
    next(batches)
    assert set(threading.enumerate()) - threads  # the reader thread runs
    batches.close()  # the consumer stops: the reader thread ends with the generator
    assert set(threading.enumerate()) - threads == set()
