"""Teacher feature stores: each teacher's distilled features, computed once, in a Zarr v3 group.

Layout of `features/TASK.zarr` (split `train`):

- `train/bottleneck`, `train/decoder`: [N, V, C, h, w] features of V cached views per sample;
- `train/sample_id`: int64 [N], the prepared sample each row belongs to;
- `train/views`: float32 [N, V, 4], the augmentation parameters of each view (`pipeline.augment`);
- `train/written`: uint64 [num_shards, arrays, 5], one chunk per shard, set once that shard is
  written: the size and sha256 of each array's shard file (`pipeline.store.integrity`).

All arrays are chunked along samples on the prepared data's grid and sharded (`shard_chunks` chunks
per file), so a store holds tens of files. Features are stored in the manifest's encoding
(`pipeline.store.encodings`: float16 by default, optionally bit-rounded), compressed by Blosc and
checksummed with crc32c, so a corrupted chunk fails at read.
The group attributes hold a sealed `FeatureManifest`, marked complete only when every shard is
written.

Shards are the unit of work: each is written whole by one writer (a partial-shard write is a
read-modify-write that loses data when processes share a store), recorded in `written`
afterwards, and skipped when a killed run is started again. Readers check every recorded shard
file's size when they open a store; `kdmtl verify` checks their digests.
"""

import functools
import re
import time
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import zarr
from upath import UPath
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.codecs.numcodecs import BitRound

from pipeline import __version__
from pipeline.augment import SCALES
from pipeline.errors import DAMAGE, DataError, KdmtlError, reading
from pipeline.files import move_into_place, remove_leftovers, remove_tree, work_path
from pipeline.store.encodings import ENCODINGS, FeatureEncoding, array_encoding, encoding_named
from pipeline.store.integrity import (
    RECORD_WORDS,
    chunk_file,
    file_problems,
    from_words,
    layout_problem,
    metadata_problems,
    record_file,
    record_metadata,
    refuse_damage,
    to_words,
)
from pipeline.store.location import is_local, zarr_location
from pipeline.store.manifest import check_writable, group_problems, read_manifest, write_manifest
from pipeline.store.prepared import PreparedStore
from schemas.base import FileRecord
from schemas.features import FeatureArrayInfo, FeatureManifest, ImportedTeacherRecord, ViewSpec
from schemas.params import FeatureParams

SPLIT = "train"
# BitRound is a numcodecs codec, outside the Zarr v3 specification: zarr warns each time it reads
# the metadata. kdmtl writes and reads its own stores, so the warning says nothing to its users.
warnings.filterwarnings("ignore", "Numcodecs codecs are not in the Zarr version 3 specification")
BLOSC_BLOCK_BYTES = 1 << 18  # larger than Blosc's default: a better ratio, and faster, on features
# Shards are written whole and rarely all zero: skip zarr's scan of every inner chunk for the
# fill value (a third of the writer's time), and keep every chunk in its shard.
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}
# zarr writes each file to NAME.<uuid4 hex>.partial, then renames it: a kill leaves that file.
ZARR_PARTIAL = re.compile(r".+\.[0-9a-f]{32}\.partial")
# Object storage has no rename: a store is copied into place, its manifest first. Another
# --shard-of process may find it with the same manifest and its arrays still arriving.
SHARED_STORE_WAIT_S = 60.0


def feature_codecs(config: FeatureParams) -> tuple[list, list]:
    """(filters, compressors) of the feature arrays."""
    filters = []
    if config.keep_bits is not None:
        bits = encoding_named(config.encoding).mantissa_bits
        if not config.keep_bits < bits:  # params validation says so; guard the library too
            raise KdmtlError(
                f"features.keep_bits {config.keep_bits} does not fit {config.encoding}, which "
                f"has {bits} mantissa bits"
            )
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


def codec_records(config: FeatureParams, dtype: str) -> list[dict]:
    """The codecs of a feature array of `dtype` as zarr records them in its metadata."""
    filters, compressors = feature_codecs(config)
    probe = zarr.create_array(
        store={}, shape=(1,), dtype=dtype, filters=filters, compressors=compressors
    )
    return [c.to_dict() for c in probe.metadata.codecs]


def view_spec(config: FeatureParams, augment: bool) -> ViewSpec:
    return ViewSpec(
        views=config.views, augment=augment, scales=list(SCALES), flip=True, seed=config.seed
    )


def plan_manifest(
    task: str,
    teacher_fingerprint: str,
    prepared: PreparedStore,
    shapes: dict[str, tuple[int, ...]],
    config: FeatureParams,
    augment: bool,
    precision: str = "fp32",
    imported: ImportedTeacherRecord | None = None,
) -> FeatureManifest:
    """The manifest of the store that extraction with these inputs writes (not yet complete),
    with the teacher run in `precision` (resolved: fp32, bf16 or fp16); `imported` describes an
    imported teacher."""
    manifest = prepared.manifest
    count = manifest.splits[SPLIT].num_samples
    chunk = manifest.chunk_size
    shard = chunk * config.shard_chunks
    encoding = encoding_named(config.encoding)
    dtypes = {name: array_encoding(encoding, name).dtype for name in shapes}
    features = {
        name: FeatureArrayInfo(
            shape=[count, config.views, *shape],
            dtype=dtypes[name],
            chunks=[chunk, config.views, *shape],
            shards=[shard, config.views, *shape],
            codecs=codec_records(config, dtypes[name]),
        )
        for name, shape in shapes.items()
    }
    return FeatureManifest(
        task=task,
        teacher_fingerprint=teacher_fingerprint,
        imported=imported,
        prepared_fingerprint=manifest.fingerprint,
        split=SPLIT,
        num_samples=count,
        chunk_size=chunk,
        shard_size=shard,
        num_shards=-(-count // shard),
        views=view_spec(config, augment),
        encoding=config.encoding,
        precision=precision,
        features=features,
        kdmtl_version=__version__,
        metadata_files={},  # recorded once the store is created
    )


def _differences(held: FeatureManifest, wanted: FeatureManifest) -> list[str]:
    """What makes a store's content other than what `wanted` describes."""
    a = held.model_dump(exclude={"complete", "kdmtl_version", "metadata_files"})
    b = wanted.model_dump(exclude={"complete", "kdmtl_version", "metadata_files"})
    return [f"{key}: {a[key]!r} (wanted {b[key]!r})" for key in a if a[key] != b[key]]


@dataclass
class FeatureStore:
    """An opened feature store."""

    path: UPath
    manifest: FeatureManifest

    @classmethod
    def open(cls, path: UPath) -> "FeatureStore":
        path = UPath(path)
        # kdmtl names each store after its teacher's task: features/TASK.zarr
        remedy = f"run `kdmtl extract-features --teacher {path.stem}`"
        return cls(path, read_manifest(path, FeatureManifest, "feature store", remedy))

    @classmethod
    def create(
        cls, path: UPath, manifest: FeatureManifest, config: FeatureParams
    ) -> "FeatureStore":
        """Create the empty store; safe when several processes race to create the same one."""
        path = UPath(path)
        building = work_path(path, "creating")
        remove_tree(building)
        group = zarr.open_group(zarr_location(building), mode="w", zarr_format=3)
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
                config=WRITE_EVERY_CHUNK,
            )
        records = (manifest.num_shards, len(cls.shard_arrays(manifest)), RECORD_WORDS)
        split.create_array(
            "written",
            shape=records,
            chunks=(1, *records[1:]),
            dtype="uint64",
            compressors=[Crc32cCodec()],  # a damaged record fails to read: the shard is redone
            fill_value=0,
        )
        manifest = manifest.model_copy(update={"metadata_files": record_metadata(building)})
        write_manifest(building, manifest)
        if is_local(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        move_into_place(building, path)  # or another process made it first: use theirs
        return cls.open(path)

    @staticmethod
    def shard_arrays(manifest: FeatureManifest) -> list[str]:
        """The arrays with one file per shard, in the order of their records in `written`."""
        return [*manifest.features, "sample_id", "views"]

    @property
    def encoding(self) -> FeatureEncoding:
        name = self.manifest.encoding
        if name not in ENCODINGS:
            raise DataError(
                f"{self.path} holds features in the encoding {name!r}, which this kdmtl does not "
                f"know (it knows {', '.join(ENCODINGS)}): {self.remedy}"
            )
        return encoding_named(name)

    def encoding_of(self, name: str) -> FeatureEncoding:
        """How the store keeps its array `name`."""
        return array_encoding(self.encoding, name)

    @property
    def remedy(self) -> str:
        task = self.manifest.task
        return f"extract the features again (`kdmtl extract-features --teacher {task}`)"

    @property
    def damaged_shard_remedy(self) -> str:
        """For a shard file of the recorded size whose bytes are not those written: a plain
        resume checks sizes only, so it would keep the shard."""
        task = self.manifest.task
        return f"write its damaged shards again (`kdmtl extract-features --teacher {task} --check`)"

    def array(self, name: str, mode: str = "r+") -> zarr.Array:
        with reading(self.path / SPLIT / name / "zarr.json", self.remedy):
            array = zarr.open_array(
                zarr_location(self.path / SPLIT / name), mode=mode, zarr_format=3
            )
        # The runtime config is not stored with the array: each opening sets it again.
        return array.with_config(WRITE_EVERY_CHUNK)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.manifest.shard_size
        return start, min(start + self.manifest.shard_size, self.manifest.num_samples)

    def shard_records(self) -> dict[int, dict[str, FileRecord] | None]:
        """Per shard, its files' records; None for a shard not written, or whose record cannot
        be read (a write killed midway, or damage)."""
        written = self.array("written", "r")
        names = self.shard_arrays(self.manifest)
        records: dict[int, dict[str, FileRecord] | None] = {}
        for shard in range(self.manifest.num_shards):
            try:
                words = written[shard]
            except DAMAGE:
                records[shard] = None
                continue
            parsed = [from_words(w) for w in words]
            complete = all(r is not None for r in parsed)
            records[shard] = dict(zip(names, parsed, strict=True)) if complete else None
        return records

    def done_shards(self) -> set[int]:
        return {shard for shard, record in self.shard_records().items() if record is not None}

    def shard_files(self) -> dict[str, Callable[[int], UPath]]:
        """Per array, the path of its file of a given shard (each array opened once)."""
        files = {}
        for name in self.shard_arrays(self.manifest):
            array, folder = self.array(name, "r"), self.path / SPLIT / name
            files[name] = functools.partial(chunk_file, folder, array)
        return files

    def shard_problems(
        self, full: bool = False, shards: Collection[int] | None = None
    ) -> dict[int, list[str]]:
        """Per written shard (of `shards`, default all), what differs in its files from their
        records: presence and size (with `full`, the sha256 as well)."""
        files = self.shard_files()
        recorded = [
            (shard, (files[name](shard), record))
            for shard, records in self.shard_records().items()
            if records is not None and (shards is None or shard in shards)
            for name, record in records.items()
        ]
        found = {shard: [] for shard, _ in recorded}
        problems = file_problems([file for _, file in recorded], full)
        for (shard, _), problem in zip(recorded, problems, strict=True):
            if problem:
                found[shard].append(problem)
        return found

    def mark_done(self, shard: int) -> None:
        """Record the shard's files, as written: from now on readers expect exactly these."""
        files = self.shard_files()
        words = [to_words(record_file(file(shard))) for file in files.values()]
        self.array("written")[shard] = np.stack(words)

    def forget(self, shard: int) -> None:
        """Drop the shard's record before it is written again (until then it is not done), and
        its files: zarr reads a shard file it writes over, and a damaged one would stop it."""
        self.array("written")[shard] = 0
        for file in self.shard_files().values():
            file(shard).unlink(missing_ok=True)

    def mark_complete_if_all_done(self) -> bool:
        """Set the manifest's completion once every shard is written (the last writer does)."""
        if len(self.done_shards()) < self.manifest.num_shards:
            return False
        self.manifest = self.manifest.model_copy(update={"complete": True})
        write_manifest(self.path, self.manifest)
        return True

    def layout_problems(self) -> list[str]:
        """What differs in the store's structure from the manifest: the metadata files, the
        group, each array's shape, dtype, chunks and shards. Rewriting shards cannot mend it."""
        m = self.manifest
        expected = {
            name: (info.shape, info.dtype, info.chunks, info.shards)
            for name, info in m.features.items()
        }
        shard, chunk, count, views = m.shard_size, m.chunk_size, m.num_samples, m.views.views
        expected["sample_id"] = ([count], "int64", [chunk], [shard])
        expected["views"] = ([count, views, 4], "float32", [chunk, views, 4], [shard, views, 4])
        records = [m.num_shards, len(self.shard_arrays(m)), RECORD_WORDS]
        expected["written"] = (records, "uint64", [1, *records[1:]], None)
        found = metadata_problems(self.path, m.metadata_files)
        found += group_problems(self.path / SPLIT, self.remedy)
        for name, layout in expected.items():
            try:
                problem = layout_problem(self.path / SPLIT / name, self.array(name, "r"), *layout)
            except DataError as error:
                problem = str(error)
            if problem:
                found.append(problem)
        return found

    def problems(self, full: bool = False) -> list[str]:
        """What disagrees with the manifest: the layout, the completion, and each written shard
        file's presence and size (with `full`, its sha256 as well)."""
        found = self.layout_problems()
        if found:
            return found  # the shards cannot be located through damaged metadata
        shards = self.shard_problems(full)
        missing = sorted(set(range(self.manifest.num_shards)) - set(shards))
        if self.manifest.complete and missing:
            found.append(f"shards {missing} have no record of being written, yet it is complete")
        return found + [problem for problems in shards.values() for problem in problems]

    def check_intact(self) -> None:
        """Refuse a store whose shard files are not those written (cheap: sizes only)."""
        refuse_damage(f"feature store {self.path}", self.problems(), self.remedy)

    def stale_against(self, teacher_fingerprint: str, prepared_fingerprint: str) -> list[str]:
        """What makes the store out of date for this teacher (its fingerprint) and prepared data."""
        problems = []
        held = self.manifest.teacher_fingerprint
        if held != teacher_fingerprint:
            problems.append(
                f"teacher differs (store {held[:12]}, teacher {teacher_fingerprint[:12]})"
            )
        if self.manifest.prepared_fingerprint != prepared_fingerprint:
            problems.append(
                f"prepared data differs (store {self.manifest.prepared_fingerprint[:12]}, "
                f"prepared {prepared_fingerprint[:12]})"
            )
        return problems

    def layout_against(self, config: FeatureParams, augment: bool) -> list[str]:
        """What makes the store's values other than the features params would give: the
        encoding, BitRound's kept bits, and the cached views (their seed only with augmentation).
        Codecs that change only the bytes on disk (compressor, level) do not count."""
        problems = []
        info = next(iter(self.manifest.features.values()))
        held = (self.manifest.encoding, keep_bits(info.codecs))
        wanted = (config.encoding, config.keep_bits)
        if held != wanted:
            problems.append(
                f"features stored as {held[0]} with keep_bits {held[1]} (params: {wanted[0]}, "
                f"keep_bits {wanted[1]})"
            )
        views, expected = self.manifest.views, view_spec(config, augment)
        if not augment:  # every view is the image itself, whatever the seed
            views, expected = (
                views.model_copy(update={"seed": 0}),
                expected.model_copy(update={"seed": 0}),
            )
        if views != expected:
            problems.append(f"views {self.manifest.views} (params: {view_spec(config, augment)})")
        return problems


def keep_bits(codecs: list[dict]) -> int | None:
    """BitRound's kept mantissa bits in an array's codecs, None without BitRound."""
    return next(
        (c["configuration"]["keepbits"] for c in codecs if c["name"] == "numcodecs.bitround"),
        None,
    )


class FeatureChunks:
    """A store as a ChunkSource: the values of its arrays `names` (all its features by default),
    with the sample ids and views, over one chunk of the prepared grid. Arrays
    are opened lazily in each process (safe with `spawn` workers); the small `sample_id` and
    `views` arrays are read whole, once, rather than once per chunk."""

    def __init__(self, store: FeatureStore, names: Collection[str] | None = None) -> None:
        self.store = store
        self.names = list(store.manifest.features if names is None else names)
        self.chunk_size = store.manifest.chunk_size
        self._arrays: dict[str, zarr.Array] | None = None
        self._small: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.store.manifest.num_samples

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_arrays": None, "_small": {}}

    def read_chunk(self, chunk: int, epoch: int = 0) -> dict[str, np.ndarray]:
        remedy = f"the store is damaged: {self.store.damaged_shard_remedy}"
        if self._arrays is None:
            for name in ("sample_id", "views"):
                with reading(self.store.path / SPLIT / name, remedy):
                    self._small[name] = self.store.array(name, "r")[:]
            # Last: another thread that sees the arrays open also sees the small ones read.
            self._arrays = {name: self.store.array(name, "r") for name in self.names}
        start = chunk * self.chunk_size
        stop = min(start + self.chunk_size, len(self))
        arrays = {}
        for name, array in self._arrays.items():
            with reading(self.store.path / SPLIT / name, remedy):
                arrays[name] = array[start:stop]
        return arrays | {name: values[start:stop] for name, values in self._small.items()}


def open_or_create(
    path: UPath,
    manifest: FeatureManifest,
    config: FeatureParams,
    may_reset: bool,
    inputs: dict[str, UPath],
) -> FeatureStore:
    """The store to extract into: resumed when it holds the same content, else made anew.

    Only a feature store that kdmtl made is ever replaced, and never one of the command's
    `inputs` (params key -> path). A store for other inputs is replaced only when `may_reset` (a
    single process); processes that share a store refuse, since one of them could delete shards
    another has written. A single process also removes what killed runs left behind.
    """
    path = UPath(path)
    check_writable(path, "kdmtl.features", "paths.features", inputs)
    if may_reset:
        remove_leftovers(path)
    if not path.exists():
        return FeatureStore.create(path, manifest, config)
    store, other, damage = _resumable(path, manifest)
    wait_for_copy = bool(damage) and not other and not may_reset and not is_local(path)
    if wait_for_copy:
        deadline = time.monotonic() + SHARED_STORE_WAIT_S
        while damage and not other and time.monotonic() < deadline:
            time.sleep(1.0)
            store, other, damage = _resumable(path, manifest)
    if not other and not damage:
        if may_reset:
            for unfinished in path.rglob("*.partial"):
                if ZARR_PARTIAL.fullmatch(unfinished.name):
                    unfinished.unlink()
        return store
    if not may_reset:
        if other:
            raise DataError(
                f"{path} holds other features ({'; '.join(other)}); remove it, or extract with "
                "one process, before extracting with --shard-of"
            )
        still = (
            f" (still, after waiting {SHARED_STORE_WAIT_S:.0f} s for another process's copy)"
            if wait_for_copy
            else ""
        )
        refuse_damage(
            f"feature store {path}{still}",
            damage,
            "extract with one process, without --shard-of, which makes it anew",
        )
    remove_tree(path)
    return FeatureStore.create(path, manifest, config)


def _resumable(
    path: UPath, manifest: FeatureManifest
) -> tuple[FeatureStore | None, list[str], list[str]]:
    """The store at `path`, what makes its content other than `manifest`, and what damage in
    its metadata stops a resume (resuming rewrites damaged shards, not damaged metadata)."""
    try:
        store = FeatureStore.open(path)
    except DataError as error:
        return None, [str(error)], []
    other = _differences(store.manifest, manifest)
    return store, other, [] if other else store.layout_problems()


def assign_shards(num_shards: int, part: int, parts: int) -> list[int]:
    """The contiguous range of shards process `part` of `parts` extracts."""
    return [int(s) for s in np.array_split(np.arange(num_shards), parts)[part]]
