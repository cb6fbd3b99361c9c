"""What every chunk or shard file of a store must hold, recorded as it is written.

Zarr reads a missing chunk as its fill value, silently, and no checksum can catch a file that is
not there. kdmtl writes every chunk, so each store records the size and sha256 of each chunk (or
shard) file as it is written, and of each array's metadata: readers compare sizes when they open a
store (one `stat` a file), and `kdmtl verify` compares digests. Digests are dask tasks: threads
here, or the workers of a dask.distributed cluster when a client is active.
"""

import os

import dask
import numpy as np
import zarr
from upath import UPath

from pipeline.errors import DataError
from pipeline.files import sha256_file
from pipeline.store.location import files_below, is_local
from schemas.base import FileRecord

# A record as stored in a uint64 array: the size, then the sha256 as four big-endian words.
RECORD_WORDS = 5


def record_file(path: UPath) -> FileRecord:
    return FileRecord(size=UPath(path).stat().st_size, sha256=sha256_file(path))


def record_metadata(root: UPath) -> dict[str, FileRecord]:
    """A record of every zarr.json below the store at `root` (the root's own holds the sealed
    manifest), by path relative to `root`."""
    root = UPath(root)
    return {
        name: record_file(root / name) for name in files_below(root) if name.endswith("/zarr.json")
    }


def metadata_problems(root: UPath, records: dict[str, FileRecord]) -> list[str]:
    """What differs in the metadata files from their records. Always by sha256: they are a few
    KB, and a same-size edit (padding a changed value with spaces) changes how data decodes."""
    files = [(UPath(root) / name, record) for name, record in records.items()]
    return [problem for problem in file_problems(files, full=True) if problem]


def chunk_file(folder: UPath, array: zarr.Array, index: int) -> UPath:
    """The file of chunk (or shard) `index` along the sample axis of the array stored in
    `folder`."""
    shards = array.shards or array.chunks
    key = array.metadata.encode_chunk_key((index, *[0] * (len(shards) - 1)))
    return folder / key


def to_words(record: FileRecord) -> np.ndarray:
    digest = np.frombuffer(bytes.fromhex(record.sha256), dtype=">u8").astype(np.uint64)
    return np.array([record.size, *digest], dtype=np.uint64)


def from_words(words: np.ndarray) -> FileRecord | None:
    """The record, or None where none was written (all zeros)."""
    if not words.any():
        return None
    digest = words[1:].astype(">u8").tobytes().hex()
    return FileRecord(size=int(words[0]), sha256=digest)


def size_problem(
    path: UPath, record: FileRecord, sizes: dict[str, int] | None = None
) -> str | None:
    """What is wrong with the file's presence or size against its record; None when it holds
    as many bytes as were written. `sizes` (file system path -> size) is a listing to look the
    file up in, rather than asking for it."""
    try:
        size = path.stat().st_size if sizes is None else sizes[path.path]
    except (FileNotFoundError, KeyError):
        return f"{path} is missing"
    except OSError as error:
        return f"{path} cannot be read ({error.strerror or error})"
    if size != record.size:
        return f"{path} has {size} bytes, {record.size} were written"
    return None


def listed_sizes(paths: list[UPath]) -> dict[str, int] | None:
    """The sizes of every file below the folder that holds all of `paths`, from one listing, in
    object storage (one request per thousand files, where asking each costs one); None for local
    files, which are asked for one by one (a stat is cheap)."""
    if not paths or is_local(paths[0]):
        return None
    folder = os.path.commonpath([path.path for path in paths])
    listing = paths[0].fs.find(folder, detail=True)
    return {name: info["size"] for name, info in listing.items() if info["type"] == "file"}


def _digest(path: UPath) -> str | None:
    """The file's sha256; None if it cannot be read (it was checked present a moment ago)."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def file_problems(files: list[tuple[UPath, FileRecord]], full: bool) -> list[str | None]:
    """What is wrong with each file against its record (None where nothing is): absent, another
    size, or (with `full`) other bytes. The digests are computed in parallel, as dask tasks."""
    sizes = listed_sizes([path for path, _ in files])
    found = [size_problem(path, record, sizes) for path, record in files]
    if not full:
        return found
    # A worker elsewhere finds a local file by its absolute path; messages keep the given one.
    hashed = [i for i, problem in enumerate(found) if problem is None]
    where = [files[i][0].absolute() if is_local(files[i][0]) else files[i][0] for i in hashed]
    digests = dask.compute(*[dask.delayed(_digest)(path) for path in where])
    for i, digest in zip(hashed, digests, strict=True):
        path, record = files[i]
        if digest is None:
            found[i] = f"{path} cannot be read"
        elif digest != record.sha256:
            found[i] = f"{path} differs from what was written (sha256)"
    return found


def refuse_damage(what: str, found: list[str], remedy: str) -> None:
    """One DataError for the problems `found` in `what`, if any: the first, and how many more."""
    if found:
        more = f" (and {len(found) - 1} more problems)" if len(found) > 1 else ""
        raise DataError(f"{what} is damaged: {found[0]}{more}; {remedy}")


def layout_problem(
    folder: UPath,
    array: zarr.Array,
    shape: list[int],
    dtype: str,
    chunks: list[int],
    shards: list[int] | None,
) -> str | None:
    """How the array stored in `folder` differs from the layout its manifest records."""
    held = [list(array.shape), str(array.dtype), list(array.chunks)]
    held.append(list(array.shards) if array.shards else None)
    if held == [shape, dtype, chunks, shards]:
        return None
    return (
        f"{folder} is {held[1]} {held[0]} in chunks of {held[2]} and shards of {held[3]}; the "
        f"manifest says {dtype} {shape} in chunks of {chunks} and shards of {shards}"
    )
