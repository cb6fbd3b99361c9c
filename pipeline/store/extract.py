"""Extraction: run a teacher over the prepared train split and write its features to a store.

A writer thread sits behind a bounded queue and writes whole shards while the teacher computes the
next ones; shards already recorded as written, with their files intact, are skipped, so a killed
run resumes where it stopped.
"""

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.augment import apply_views, draw_views
from pipeline.errors import KdmtlError
from pipeline.precision import Precision
from pipeline.progress import progress_bar
from pipeline.store.encodings import FeatureEncoding, array_encoding
from pipeline.store.features import SPLIT, FeatureStore
from pipeline.store.prepared import PreparedSplit, PreparedStore


def feature_shapes(teacher: nn.Module, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """(C, h, w) of each feature tap, and of the prediction, for images of the given size."""
    with torch.inference_mode():
        tensors = [*teacher.parameters(), *teacher.buffers()]  # none in a parameter-free one
        device = tensors[0].device if tensors else torch.device("cpu")
        features = teacher.eval().distilled_features(
            torch.zeros(1, 3, height, width, device=device)
        )
    return {name: tuple(feature.shape[1:]) for name, feature in features.items()}


@dataclass
class ExtractionStats:
    shards: int
    damaged: int  # of those, shards written before whose files were not as recorded
    samples: int
    raw_bytes: int
    seconds: float


def shard_inputs(
    store: FeatureStore, prepared: PreparedStore, shards: list[int]
) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
    """(shard, images [n, 3, H, W], views [n, V, 4]) for each shard, read from the prepared data."""
    images = PreparedSplit(prepared, SPLIT, [])
    manifest, spec = prepared.manifest, store.manifest.views
    for shard in shards:
        start, stop = store.shard_range(shard)
        first, last = start // manifest.chunk_size, -(-stop // manifest.chunk_size)
        block = np.concatenate([images.read_chunk(c)["image"] for c in range(first, last)])
        views = np.stack(
            [
                draw_views(
                    spec.seed, index, spec.views, manifest.height, manifest.width, spec.augment
                )
                for index in range(start, stop)
            ]
        )
        yield shard, torch.from_numpy(block), views


class NonFiniteFeature(KdmtlError):
    """A teacher feature holds NaN or Inf, as computed or once encoded."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the teacher's {name} feature is not finite")
        self.name = name


@torch.inference_mode()
def teacher_features(
    teacher: nn.Module,
    images: torch.Tensor,
    views: np.ndarray,
    batch_size: int,
    device: torch.device,
    encoding: FeatureEncoding | None = None,
    precision: Precision | None = None,
) -> dict[str, torch.Tensor]:
    """Features [n, V, C, h, w] of each sample's views, and the prediction where the teacher has
    one, from the teacher (eval mode, its forward pass in `precision`, fp32 by default):
    float32, or stored values of `encoding` (`array_encoding`), encoded on
    `device`. A value that is not finite, as computed or once encoded, raises NonFiniteFeature.

    From a GPU, features are copied into page-locked host memory without blocking the CPU, which
    prepares the next batch meanwhile, and the checks wait for the GPU once, at the end. (At the
    paper's size a shard's decoder feature is about 2 GB of float16: extraction pins a few of them,
    for the life of the process.)"""
    count, num_views = views.shape[:2]
    precision = precision or Precision("fp32", device)
    flat = views.reshape(count * num_views, -1)  # (sample, view) pairs, sample-major
    outputs: dict[str, torch.Tensor] = {}
    nonfinite: dict[str, torch.Tensor] = {}
    for first in range(0, len(flat), batch_size):
        stop = min(first + batch_size, len(flat))
        samples = torch.arange(first, stop) // num_views
        inputs, _ = apply_views(flat[first:stop], images[samples], {})
        with precision.autocast():
            features = teacher.distilled_features(inputs.to(device))
        for name, feature in features.items():
            feature = feature.float()
            stored = feature if encoding is None else array_encoding(encoding, name).encode(feature)
            # A float encoding keeps NaN and Inf and overflows to Inf; an integer one cannot
            # show them, so its input is checked.
            checked = stored if stored.is_floating_point() else feature
            bad = ~torch.isfinite(checked).all()
            nonfinite[name] = bad if name not in nonfinite else nonfinite[name] | bad
            if name not in outputs:
                outputs[name] = torch.empty(
                    (len(flat), *stored.shape[1:]),
                    dtype=stored.dtype,
                    pin_memory=device.type == "cuda",
                )
            outputs[name][first:stop].copy_(stored, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for name, bad in nonfinite.items():
        if bad:
            raise NonFiniteFeature(name)
    return {name: out.reshape(count, num_views, *out.shape[1:]) for name, out in outputs.items()}


class _ShardWriter:
    """A thread that writes finished shards while the teacher computes the next ones."""

    def __init__(self, store: FeatureStore, on_written) -> None:
        self.store = store
        self.on_written = on_written
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="feature-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        arrays = {}
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain after a failure, so that put() never blocks forever
            shard, values = item
            start, stop = self.store.shard_range(shard)
            try:
                for name, block in values.items():
                    if name not in arrays:
                        arrays[name] = self.store.array(name)
                    arrays[name][start:stop] = block
                self.store.mark_done(shard)
                self.on_written(stop - start, sum(v.nbytes for v in values.values()))
            except BaseException as error:  # re-raised in the extracting thread
                self.error = error

    def put(self, shard: int, values: dict[str, np.ndarray]) -> None:
        self.check()
        self.queue.put((shard, values))

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        self.queue.put(None)
        self.thread.join()

    def close(self) -> None:
        self.stop()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def extract(
    teacher: nn.Module,
    prepared: PreparedStore,
    store: FeatureStore,
    shards: list[int],
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    check: bool = False,
) -> ExtractionStats:
    """Run the teacher over `shards` of the prepared train split and write their features.

    Shards already written, with their files as recorded, are skipped, so a killed run continues
    where it stopped. Files are compared with their records by presence and size; with `check`,
    by sha256 too, which reads every written shard but finds a shard damaged in place."""
    # per recorded shard, how its files differ from the record
    recorded = store.shard_problems(full=check, shards=shards)
    todo = sorted(set(shards) - {shard for shard, problems in recorded.items() if not problems})
    damaged = set(todo) & recorded.keys()
    for shard in damaged:
        store.forget(shard)  # not done until written again, whatever happens meanwhile
    total = sum(stop - start for start, stop in map(store.shard_range, todo))
    teacher = teacher.to(device).eval()
    started = time.perf_counter()
    written = {"samples": 0, "bytes": 0}
    bar = progress_bar(
        enabled=progress, total=total, desc=f"extract {store.manifest.task}", unit="sample"
    )

    def on_written(samples: int, raw_bytes: int) -> None:
        written["samples"] += samples
        written["bytes"] += raw_bytes
        elapsed = max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(
            {
                "samples/s": f"{written['samples'] / elapsed:.0f}",
                "MB/s": f"{written['bytes'] / elapsed / 1e6:.1f}",
            },
            refresh=False,
        )
        bar.update(samples)

    writer = _ShardWriter(store, on_written)
    encoding = store.encoding
    precision = Precision(store.manifest.precision, device)
    try:
        for shard, images, views in shard_inputs(store, prepared, todo):
            try:
                features = teacher_features(
                    teacher, images, views, batch_size, device, encoding, precision
                )
            except NonFiniteFeature as error:
                stored = store.encoding_of(error.name)
                why = (
                    "the teacher gives NaN or Inf, or values beyond float16's range (65504): "
                    "for the range, set features.encoding: float32; else check its checkpoint"
                    if stored.dtype == "float16"
                    else "the teacher itself gives NaN or Inf; check its checkpoint"
                )
                raise KdmtlError(
                    f"teacher {store.manifest.task}'s {error.name} feature is not finite in "
                    f"{stored.name}: {why}"
                ) from None
            start, stop = store.shard_range(shard)
            values = {name: feature.numpy() for name, feature in features.items()}
            values["sample_id"] = np.arange(start, stop, dtype=np.int64)
            values["views"] = views
            writer.put(shard, values)
    except BaseException:
        writer.stop()
        raise
    else:
        writer.close()
    finally:
        bar.close()
    return ExtractionStats(
        len(todo), len(damaged), written["samples"], written["bytes"], time.perf_counter() - started
    )
