"""What every chunk or shard file of a store must hold, recorded as it is written.

Zarr reads a missing chunk as its fill value, silently, and no checksum can catch a file that is
not there. kdmtl writes every chunk, so each store records the size and sha256 of each chunk (or
shard) file as it is written, and of each array's metadata: readers compare sizes when they open a
store (one `stat` a file), and `kdmtl verify` compares digests.
"""

from pathlib import Path

import numpy as np
import zarr

from pipeline.errors import DataError
from pipeline.files import sha256_file
from schemas.base import FileRecord

# A record as stored in a uint64 array: the size, then the sha256 as four big-endian words.
RECORD_WORDS = 5


def record_file(path: Path) -> FileRecord:
    return FileRecord(size=Path(path).stat().st_size, sha256=sha256_file(path))


def record_metadata(root: Path) -> dict[str, FileRecord]:
    """A record of every zarr.json below the store at `root` (the root's own holds the sealed
    manifest), by path relative to `root`."""
    return {
        path.relative_to(root).as_posix(): record_file(path)
        for path in sorted(Path(root).rglob("zarr.json"))
        if path.parent != Path(root)
    }


def metadata_problems(root: Path, records: dict[str, FileRecord]) -> list[str]:
    """What differs in the metadata files from their records. Always by sha256: they are a few
    KB, and a same-size edit (padding a changed value with spaces) changes how data decodes."""
    found = (file_problem(Path(root) / name, record, True) for name, record in records.items())
    return [problem for problem in found if problem]


def chunk_file(folder: Path, array: zarr.Array, index: int) -> Path:
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


def file_problem(path: Path, record: FileRecord, full: bool) -> str | None:
    """What is wrong with the file against its record: absent, another size, or (with `full`)
    other bytes; None when it matches."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as error:
        return f"{path} cannot be read ({error.strerror})"
    if size != record.size:
        return f"{path} has {size} bytes, {record.size} were written"
    if full and record_file(path).sha256 != record.sha256:
        return f"{path} differs from what was written (sha256)"
    return None


def refuse_damage(what: str, found: list[str], remedy: str) -> None:
    """One DataError for the problems `found` in `what`, if any: the first, and how many more."""
    if found:
        more = f" (and {len(found) - 1} more problems)" if len(found) > 1 else ""
        raise DataError(f"{what} is damaged: {found[0]}{more}; {remedy}")


def layout_problem(
    folder: Path,
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
