"""Teacher feature stores: each teacher's distilled features, computed once, in a Zarr v3 group.

Layout of `features/TASK.zarr` (split `train`):

- `train/bottleneck`, `train/decoder`: [N, V, C, h, w] features of V cached views per sample;
- `train/sample_id`: int64 [N], the prepared sample each row belongs to;
- `train/views`: float32 [N, V, 4], the augmentation parameters of each view (`pipeline.augment`);
- `train/complete`: uint8 [num_shards], one chunk per shard, set once that shard is written.

All arrays are chunked along samples on the prepared data's grid and sharded (`shard_chunks` chunks
per file), so a store holds tens of files. Features are stored as float16 by default, optionally
bit-rounded, compressed by Blosc and checksummed with crc32c, so a corrupted chunk fails at read.
The group attributes hold a `FeatureManifest`, marked complete only when every shard is written.

Shards are the unit of work: each is written whole by one writer (a partial-shard write is a
read-modify-write that loses data when processes share a store), flagged in `complete` afterwards,
and skipped when a killed run is started again.
"""

import os
import queue
import shutil
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.codecs.numcodecs import BitRound

from pipeline import __version__
from pipeline.augment import SCALES, apply_views, draw_views
from pipeline.data.prepared import MANIFEST_KEY, PreparedSplit, PreparedStore, read_manifest
from pipeline.errors import DataError, KdmtlError
from pipeline.models import FEATURES, Architecture
from pipeline.progress import progress_bar
from schemas.features import FeatureArrayInfo, FeatureManifest, ViewSpec
from schemas.params import FeatureParams

SPLIT = "train"
# BitRound is a numcodecs codec, outside the Zarr v3 specification: zarr warns each time it reads
# the metadata. kdmtl writes and reads its own stores, so the warning says nothing to its users.
warnings.filterwarnings("ignore", "Numcodecs codecs are not in the Zarr version 3 specification")
BLOSC_BLOCK_BYTES = 1 << 18  # larger than Blosc's default: a better ratio, and faster, on features
# Shards are written whole and rarely all zero: skip zarr's scan for empty chunks (half the cost).
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


def feature_codecs(config: FeatureParams) -> tuple[list, list]:
    """(filters, compressors) of the feature arrays."""
    filters = []
    if config.keep_bits is not None:
        filters.append(BitRound(keepbits=config.keep_bits))
    compressors = [
        BloscCodec(
            cname=config.compressor,
            clevel=config.clevel,
            shuffle="shuffle",
            blocksize=BLOSC_BLOCK_BYTES,
        ),
        Crc32cCodec(),
    ]
    return filters, compressors


def feature_shapes(teacher: Architecture, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """(C, h, w) of each feature tap for images of the given size."""
    with torch.inference_mode():
        device = next(teacher.parameters()).device
        features = teacher.eval().distilled_features(
            torch.zeros(1, 3, height, width, device=device)
        )
    return {name: tuple(features[name].shape[1:]) for name in FEATURES}


def plan_manifest(
    task: str,
    checkpoint_sha256: str,
    prepared: PreparedStore,
    shapes: dict[str, tuple[int, ...]],
    config: FeatureParams,
    augment: bool,
) -> FeatureManifest:
    """The manifest of the store that extraction with these inputs writes (not yet complete)."""
    manifest = prepared.manifest
    count = manifest.splits[SPLIT].num_samples
    chunk = manifest.chunk_size
    shard = chunk * config.shard_chunks
    filters, compressors = feature_codecs(config)
    probe = zarr.create_array(
        store={}, shape=(1,), dtype=config.dtype, filters=filters, compressors=compressors
    )
    codecs = [c.to_dict() for c in probe.metadata.codecs]
    features = {
        name: FeatureArrayInfo(
            shape=[count, config.views, *shape],
            dtype=config.dtype,
            chunks=[chunk, config.views, *shape],
            shards=[shard, config.views, *shape],
            codecs=codecs,
        )
        for name, shape in shapes.items()
    }
    return FeatureManifest(
        task=task,
        checkpoint_sha256=checkpoint_sha256,
        prepared_fingerprint=manifest.fingerprint,
        split=SPLIT,
        num_samples=count,
        chunk_size=chunk,
        shard_size=shard,
        num_shards=-(-count // shard),
        views=ViewSpec(
            views=config.views, augment=augment, scales=list(SCALES), flip=True, seed=config.seed
        ),
        features=features,
        kdmtl_version=__version__,
    )


def _differences(held: FeatureManifest, wanted: FeatureManifest) -> list[str]:
    """What makes a store's content other than what `wanted` describes."""
    a = held.model_dump(exclude={"complete", "kdmtl_version"})
    b = wanted.model_dump(exclude={"complete", "kdmtl_version"})
    return [f"{key}: {a[key]!r} (wanted {b[key]!r})" for key in a if a[key] != b[key]]


@dataclass
class FeatureStore:
    """An opened feature store."""

    path: Path
    manifest: FeatureManifest

    @classmethod
    def open(cls, path: Path) -> "FeatureStore":
        remedy = "run `kdmtl extract-features` first"
        return cls(Path(path), read_manifest(path, FeatureManifest, "feature store", remedy))

    @classmethod
    def create(cls, path: Path, manifest: FeatureManifest, config: FeatureParams) -> "FeatureStore":
        """Create the empty store; safe when several processes race to create the same one."""
        path = Path(path)
        building = path.with_name(f"{path.name}.creating-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        group = zarr.open_group(building, mode="w", zarr_format=3)
        split = group.create_group(SPLIT)
        filters, compressors = feature_codecs(config)
        for name, info in manifest.features.items():
            split.create_array(
                name,
                shape=info.shape,
                chunks=info.chunks,
                shards=info.shards,
                dtype=info.dtype,
                filters=filters,
                compressors=compressors,
                fill_value=0,
                config=WRITE_EVERY_CHUNK,
            )
        count, chunk, shard = manifest.num_samples, manifest.chunk_size, manifest.shard_size
        views = manifest.views.views
        for name, shape, dtype in (
            ("sample_id", (count,), "int64"),
            ("views", (count, views, 4), "float32"),
        ):
            split.create_array(
                name,
                shape=shape,
                chunks=(chunk, *shape[1:]),
                shards=(shard, *shape[1:]),
                dtype=dtype,
                compressors=compressors,
                fill_value=0,
            )
        split.create_array(
            "complete", shape=(manifest.num_shards,), chunks=(1,), dtype="uint8", fill_value=0
        )
        group.attrs[MANIFEST_KEY] = manifest.model_dump(mode="json")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            building.rename(path)
        except OSError:  # another process created it first: use theirs
            shutil.rmtree(building, ignore_errors=True)
        return cls.open(path)

    def array(self, name: str, mode: str = "r+") -> zarr.Array:
        return zarr.open_array(self.path / SPLIT / name, mode=mode)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.manifest.shard_size
        return start, min(start + self.manifest.shard_size, self.manifest.num_samples)

    def done_shards(self) -> set[int]:
        """Shards whose flag reads as set; an unreadable flag (a write killed midway) is unset."""
        flags = self.array("complete")
        done = set()
        for shard in range(self.manifest.num_shards):
            try:
                if flags[shard]:
                    done.add(shard)
            except ValueError:
                continue
        return done

    def mark_done(self, shard: int) -> None:
        self.array("complete")[shard] = 1

    def mark_complete_if_all_done(self) -> bool:
        """Set the manifest's completion once every shard is written (the last writer does)."""
        if len(self.done_shards()) < self.manifest.num_shards:
            return False
        self.manifest = self.manifest.model_copy(update={"complete": True})
        group = zarr.open_group(self.path, mode="r+")
        group.attrs[MANIFEST_KEY] = self.manifest.model_dump(mode="json")
        return True

    def stale_against(self, checkpoint_sha256: str, prepared_fingerprint: str) -> list[str]:
        """What makes the store out of date for this teacher checkpoint and prepared data."""
        problems = []
        if self.manifest.checkpoint_sha256 != checkpoint_sha256:
            problems.append(
                f"teacher checkpoint differs (store {self.manifest.checkpoint_sha256[:12]}, "
                f"checkpoint {checkpoint_sha256[:12]})"
            )
        if self.manifest.prepared_fingerprint != prepared_fingerprint:
            problems.append(
                f"prepared data differs (store {self.manifest.prepared_fingerprint[:12]}, "
                f"prepared {prepared_fingerprint[:12]})"
            )
        return problems


class FeatureChunks:
    """A store as a ChunkSource: every array's values over one chunk of the prepared grid. Arrays
    are opened lazily in each process (safe with `spawn` workers); the small `sample_id` and
    `views` arrays are read whole, once, rather than once per chunk."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.chunk_size = store.manifest.chunk_size
        self._arrays: dict[str, zarr.Array] | None = None
        self._small: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.store.manifest.num_samples

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_arrays": None, "_small": {}}

    def read_chunk(self, chunk: int, epoch: int = 0) -> dict[str, np.ndarray]:
        if self._arrays is None:
            features = self.store.manifest.features
            self._arrays = {name: self.store.array(name, "r") for name in features}
            self._small = {name: self.store.array(name, "r")[:] for name in ("sample_id", "views")}
        start = chunk * self.chunk_size
        stop = min(start + self.chunk_size, len(self))
        arrays = {name: a[start:stop] for name, a in self._arrays.items()}
        return arrays | {name: values[start:stop] for name, values in self._small.items()}


def open_or_create(
    path: Path, manifest: FeatureManifest, config: FeatureParams, may_reset: bool
) -> FeatureStore:
    """The store to extract into: resumed when it holds the same content, else made anew.

    A store for other inputs is replaced only when `may_reset` (a single process); processes that
    share a store refuse, since one of them could delete shards another has written.
    """
    path = Path(path)
    if not path.exists():
        return FeatureStore.create(path, manifest, config)
    try:
        store = FeatureStore.open(path)
        differences = _differences(store.manifest, manifest)
    except DataError as error:
        store, differences = None, [str(error)]
    if not differences:
        return store
    if not may_reset:
        raise DataError(
            f"{path} holds other features ({'; '.join(differences)}); remove it, or extract "
            "with one process, before extracting with --shard-of"
        )
    shutil.rmtree(path)
    return FeatureStore.create(path, manifest, config)


def assign_shards(num_shards: int, part: int, parts: int) -> list[int]:
    """The contiguous range of shards process `part` of `parts` extracts."""
    return [int(s) for s in np.array_split(np.arange(num_shards), parts)[part]]


@dataclass
class ExtractionStats:
    shards: int
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


@torch.inference_mode()
def teacher_features(
    teacher: Architecture,
    images: torch.Tensor,
    views: np.ndarray,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Features [n, V, C, h, w] in `dtype` of each sample's views, from the teacher (eval mode)."""
    count, num_views = views.shape[:2]
    flat = views.reshape(count * num_views, -1)  # (sample, view) pairs, sample-major
    outputs: dict[str, torch.Tensor] = {}
    for first in range(0, len(flat), batch_size):
        stop = min(first + batch_size, len(flat))
        samples = torch.arange(first, stop) // num_views
        inputs, _ = apply_views(flat[first:stop], images[samples], {})
        for name, feature in teacher.distilled_features(inputs.to(device)).items():
            if name not in outputs:
                outputs[name] = torch.empty((len(flat), *feature.shape[1:]), dtype=dtype)
            outputs[name][first:stop] = feature
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
    teacher: Architecture,
    prepared: PreparedStore,
    store: FeatureStore,
    shards: list[int],
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> ExtractionStats:
    """Run the teacher over `shards` of the prepared train split and write their features.

    Shards already flagged complete are skipped, so a killed run continues where it stopped."""
    todo = sorted(set(shards) - store.done_shards())
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
    dtype_name = store.manifest.features[FEATURES[0]].dtype
    dtype = getattr(torch, dtype_name)
    try:
        for shard, images, views in shard_inputs(store, prepared, todo):
            features = teacher_features(teacher, images, views, batch_size, device, dtype)
            for name, feature in features.items():
                if not torch.isfinite(feature).all():
                    raise KdmtlError(
                        f"teacher {store.manifest.task}'s {name} feature is not finite in "
                        f"{dtype_name} (overflow?); set features.dtype: float32"
                    )
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
        len(todo), written["samples"], written["bytes"], time.perf_counter() - started
    )
