"""The prepared dataset: a Zarr v3 group with `train` and `test` subgroups.

Each split holds `image` (uint8 [N,3,H,W]) and one target array per task of the source (`semseg`
int16 [N,H,W] with -1 ignored, `depth` float32 [N,1,H,W] with 0 invalid, `normal` float32
[N,3,H,W] with a zero vector invalid), chunked along the sample axis. The group attributes hold a
`PreparedManifest` under the key "kdmtl", written last: a store without it is incomplete.
"""

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

import dask.array as da
import numpy as np
import torch
import zarr
from torch.utils.data import Dataset
from tqdm import tqdm
from upath import UPath
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline import __version__
from pipeline.data.sources import ARRAY_LAYOUT, SPLITS, DataSource, array_shape
from pipeline.errors import DataError, reading
from pipeline.files import (
    parent_folders,
    remove_leftovers,
    remove_tree,
    replace_directory,
    work_path,
)
from pipeline.progress import progress_bar
from pipeline.store.integrity import (
    chunk_file,
    file_problems,
    layout_problem,
    metadata_problems,
    record_file,
    record_metadata,
    refuse_damage,
)
from pipeline.store.location import zarr_location
from pipeline.store.manifest import check_writable, group_problems, read_manifest, write_manifest
from schemas.params import DataParams
from schemas.prepared import ArrayInfo, PreparedManifest, SplitInfo

REMEDY = "run `kdmtl prepare` again"


def default_codecs() -> list:
    """Blosc zstd with byte shuffle, then a crc32c checksum so a corrupted chunk fails at read."""
    return [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec()]


def content_params(data: DataParams) -> dict:
    """The data params that decide what a prepared store holds (augmentation happens later)."""
    return data.model_dump(mode="json", exclude={"augment"})


def _fingerprint(class_names: list[str], digests: dict[str, tuple], params: dict) -> str:
    record = {"class_names": class_names, "arrays": digests, "params": params}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _checked(name: str, values: np.ndarray, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """The source's values in the stored dtype, refused if they do not fit it."""
    if values.shape != shape:
        raise ValueError(f"{name}: source gave {values.shape}, not {shape}")
    stored = np.ascontiguousarray(values, dtype=dtype)
    if stored.dtype.kind == "f" and not np.isfinite(stored).all():
        raise DataError(f"the {name} values are not all finite in {dtype} (too large?)")
    return stored


def _write_split(
    folder: UPath, source: DataSource, split: str, chunk_size: int, bar: tqdm
) -> tuple[SplitInfo, dict[str, tuple]]:
    """Write one split chunk by chunk into the group at `folder`; returns its description, with
    a record of each chunk file, and each array's content digest."""
    group = zarr.open_group(zarr_location(folder), mode="w", zarr_format=3)
    count = source.num_samples(split)
    height, width = source.config.height, source.config.width
    arrays, hashes = {}, {}
    for name in source.arrays:
        shape = array_shape(name, count, height, width)
        arrays[name] = group.create_array(
            name,
            shape=shape,
            chunks=(chunk_size, *shape[1:]),
            dtype=ARRAY_LAYOUT[name][1],
            compressors=default_codecs(),
            fill_value=0,
            config={"write_empty_chunks": True},  # every chunk has a file to check
        )
        hashes[name] = hashlib.sha256()
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        block = source.read(split, start, stop)
        for name, array in arrays.items():
            shape = (stop - start, *array.shape[1:])
            values = _checked(f"{split} {name}", block[name], array.dtype, shape)
            array[start:stop] = values
            hashes[name].update(values.tobytes())
        bar.update(stop - start)
    info = SplitInfo(
        num_samples=count,
        arrays={
            name: ArrayInfo(
                shape=list(a.shape),
                dtype=str(a.dtype),
                chunks=list(a.chunks),
                chunk_files=[
                    record_file(chunk_file(folder / name, a, c)) for c in range(a.cdata_shape[0])
                ],
            )
            for name, a in arrays.items()
        },
    )
    digests = {
        f"{split}/{name}": (list(a.shape), str(a.dtype), hashes[name].hexdigest())
        for name, a in arrays.items()
    }
    return info, digests


def write_prepared(
    source: DataSource, path: UPath, chunk_size: int, progress: bool = True
) -> PreparedManifest:
    """Write both splits of `source` to a new store at `path`.

    The store is built beside `path` and moved into place only once complete, so an interrupted or
    failed run leaves no store that a later step would trust. `path` is refused if it holds
    anything but a prepared store that kdmtl made.
    """
    path = UPath(path)
    check_writable(path, "kdmtl.prepared", "paths.prepared")
    remove_leftovers(path)
    partial = work_path(path, "partial")
    with parent_folders(path):
        total = sum(source.num_samples(split) for split in SPLITS)
        try:
            zarr.open_group(zarr_location(partial), mode="w", zarr_format=3)
            splits, digests = {}, {}
            with progress_bar(enabled=progress, total=total, desc="prepare", unit="sample") as bar:
                for split in SPLITS:
                    splits[split], split_digests = _write_split(
                        partial / split, source, split, chunk_size, bar
                    )
                    digests.update(split_digests)
            class_names = list(source.class_names)
            params = content_params(source.config.model_copy(update={"chunk_size": chunk_size}))
            manifest = PreparedManifest(
                source=source.name,
                tasks=list(source.tasks),
                class_names=class_names,
                height=source.config.height,
                width=source.config.width,
                chunk_size=chunk_size,
                splits=splits,
                data_params=params,
                metadata_files=record_metadata(partial),
                fingerprint=_fingerprint(class_names, digests, params),
                kdmtl_version=__version__,
            )
            write_manifest(partial, manifest)
            replace_directory(partial, path)
        except BaseException:
            remove_tree(partial)
            raise
    return manifest


@dataclass(frozen=True)
class PreparedStore:
    """An opened prepared dataset and its manifest."""

    path: UPath
    manifest: PreparedManifest

    def array(self, split: str, name: str) -> zarr.Array:
        with reading(self.path / split / name / "zarr.json", REMEDY):
            return zarr.open_array(zarr_location(self.path / split / name), mode="r", zarr_format=3)

    def dask(self, split: str, name: str) -> da.Array:
        """A lazy array, chunked as stored."""
        return da.from_zarr(self.array(split, name))

    def problems(self, full: bool = False) -> list[str]:
        """What disagrees with the manifest: the metadata files, each array's shape, dtype and
        chunks, and each chunk file's presence and size (with `full`, its sha256 as well)."""
        found = metadata_problems(self.path, self.manifest.metadata_files)
        files = []
        for split, split_info in self.manifest.splits.items():
            found += group_problems(self.path / split, REMEDY)
            for name, info in split_info.arrays.items():
                folder = self.path / split / name
                try:
                    array = self.array(split, name)
                except DataError as error:
                    found.append(str(error))
                    continue
                layout = (info.shape, info.dtype, info.chunks, None)
                problem = layout_problem(folder, array, *layout)
                if problem is None and len(info.chunk_files) != array.cdata_shape[0]:
                    problem = f"{folder} has {array.cdata_shape[0]} chunks, the manifest records "
                    problem += f"{len(info.chunk_files)}"
                if problem:
                    found.append(problem)
                    continue
                files += [
                    (chunk_file(folder, array, index), record)
                    for index, record in enumerate(info.chunk_files)
                ]
        return found + [problem for problem in file_problems(files, full) if problem]

    def check_intact(self) -> None:
        """Refuse a store whose chunk files are not those written (cheap: sizes only)."""
        refuse_damage("the prepared data", self.problems(), REMEDY)

    def check_matches(self, data: DataParams) -> None:
        """Refuse a store prepared with other data params than the current ones."""
        held, wanted = self.manifest.data_params, content_params(data)
        # A key added to the params after a store was made is absent from its record, and the
        # store holds what the key's default gives.
        defaults = content_params(DataParams())
        differ = [
            f"{key} {held.get(key, defaults[key])!r} (params: {value!r})"
            for key, value in wanted.items()
            if held.get(key, defaults[key]) != value
        ]
        if differ:
            raise DataError(
                f"{self.path} was prepared with other data params: {', '.join(differ)}; "
                "run `kdmtl prepare` again"
            )


def open_prepared(path: UPath) -> PreparedStore:
    """Open a complete and intact prepared store, or explain why it cannot be used."""
    remedy = "run `kdmtl prepare` first"
    path = UPath(path)
    store = PreparedStore(path, read_manifest(path, PreparedManifest, "prepared dataset", remedy))
    store.check_intact()
    return store


class PreparedSplit(Dataset):
    """One split of a prepared store: a torch Dataset, and a ChunkSource for `ChunkStream`.

    A sample is a dict: `index`, `image` (float32 [3,H,W] in [0,1]) and, per task, its target:
    `semseg` int64 [H,W] (-1 ignored), `depth` float32 [1,H,W], `normal` float32 [3,H,W].
    Whole chunks are read and the last `cache_chunks` kept, so reading in chunk order decompresses
    each chunk once. Arrays are opened lazily in each process (safe with `spawn` workers).
    """

    def __init__(self, store: PreparedStore, split: str, tasks: list[str], cache_chunks: int = 2):
        missing = [task for task in tasks if task not in store.manifest.tasks]
        if missing:
            raise DataError(
                f"{store.path} has no {missing[0]!r} targets; it holds {store.manifest.tasks}"
            )
        self.store = store
        self.split = split
        self.names = ("image", *tasks)
        self.chunk_size = store.manifest.chunk_size
        self.cache_chunks = cache_chunks
        self._arrays: dict[str, zarr.Array] | None = None
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return self.store.manifest.splits[self.split].num_samples

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"], state["_cache"] = None, OrderedDict()
        return state

    def read_chunk(self, chunk: int, epoch: int = 0) -> dict[str, np.ndarray]:
        """Every sample of chunk `chunk`, as arrays with a leading sample axis."""
        if self._arrays is None:
            self._arrays = {name: self.store.array(self.split, name) for name in self.names}
        start = chunk * self.chunk_size
        stop = min(start + self.chunk_size, len(self))
        block = {"index": np.arange(start, stop)}
        for name, array in self._arrays.items():
            with reading(self.store.path / self.split / name, f"the store is damaged: {REMEDY}"):
                values = array[start:stop]
            if name == "image":
                values = values.astype(np.float32) / np.float32(255)
            elif name == "semseg":
                values = values.astype(np.int64)
            block[name] = values
        return block

    def _cached_chunk(self, chunk: int) -> dict[str, np.ndarray]:
        if chunk in self._cache:
            self._cache.move_to_end(chunk)
        else:
            self._cache[chunk] = self.read_chunk(chunk)
            if len(self._cache) > self.cache_chunks:
                self._cache.popitem(last=False)
        return self._cache[chunk]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        block = self._cached_chunk(index // self.chunk_size)
        offset = index % self.chunk_size
        return {name: torch.as_tensor(values[offset]) for name, values in block.items()}
