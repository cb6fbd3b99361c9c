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
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.codecs.numcodecs import BitRound

from pipeline import __version__
from pipeline.augment import SCALES
from pipeline.errors import DataError
from pipeline.store.manifest import MANIFEST_KEY, read_manifest
from pipeline.store.prepared import PreparedStore
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
