"""The kdmtl manifest of a Zarr store, and which paths kdmtl may write a store to.

The manifest is a validated record in the root group's attributes, sealed with a sha256 of its
content, so that a damaged or hand-edited manifest is refused rather than trusted. A store's
`kind` says that kdmtl made it: kdmtl replaces or deletes only paths whose manifest says so.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import TypeVar

import zarr
from pydantic import BaseModel, ValidationError
from upath import UPath

from pipeline.errors import DataError, reading
from pipeline.store.location import files_below, is_local, zarr_location

MANIFEST_KEY = "kdmtl"
SEAL_KEY = "kdmtl_seal"
M = TypeVar("M", bound=BaseModel)


def seal_of(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def write_manifest(path: UPath, manifest: BaseModel) -> None:
    """Store the manifest, sealed, in the attributes of the group at `path`."""
    record = manifest.model_dump(mode="json")
    group = zarr.open_group(zarr_location(path), mode="r+", zarr_format=3)
    group.attrs.update({MANIFEST_KEY: record, SEAL_KEY: seal_of(record)})


def read_manifest(path: UPath, schema: type[M], what: str, remedy: str) -> M:
    """The validated manifest of a kdmtl Zarr store, or a DataError saying what to run."""
    path = UPath(path)
    # kdmtl cannot tell a store whose zarr.json is missing or unreadable from someone's folder,
    # so it will not replace it: the person deletes it.
    damaged_remedy = f"if it is a damaged kdmtl store, delete it, then {remedy}"
    if not (path / "zarr.json").is_file():
        if path.is_dir() and any(path.iterdir()):
            raise DataError(f"no {what} at {path} (the folder has no zarr.json): {damaged_remedy}")
        raise DataError(f"no {what} at {path}: {remedy}")
    with reading(path / "zarr.json", damaged_remedy):
        attrs = zarr.open_group(zarr_location(path), mode="r", zarr_format=3).attrs.asdict()
    if MANIFEST_KEY not in attrs:
        raise DataError(f"{path} has no kdmtl manifest (incomplete?): {remedy}")
    if SEAL_KEY not in attrs:
        raise DataError(f"{path} was made by an older kdmtl (its manifest has no seal): {remedy}")
    if attrs[SEAL_KEY] != seal_of(attrs[MANIFEST_KEY]):
        raise DataError(
            f"the manifest of {path} was edited or damaged (its seal does not match): {remedy}"
        )
    try:
        return schema.model_validate(attrs[MANIFEST_KEY])
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        problem = f"{key}: {first['msg']}" if key else first["msg"]
        raise DataError(
            f"{path} has an invalid manifest ({problem}; made by another kdmtl version?): {remedy}"
        ) from None


def group_problems(path: UPath, remedy: str) -> list[str]:
    """What is wrong with the metadata of the inner group at `path`: nothing reads through it,
    but a store with a damaged group is damaged."""
    try:
        with reading(path / "zarr.json", remedy):
            zarr.open_group(zarr_location(path), mode="r", zarr_format=3)
    except DataError as error:
        return [str(error)]
    return []


def store_kind(path: UPath) -> str | None:
    """The `kind` a kdmtl manifest gives the store at `path`, read from its raw metadata; None
    when it is not a readable kdmtl store."""
    try:
        metadata = json.loads((UPath(path) / "zarr.json").read_text())
        return str(metadata["attributes"][MANIFEST_KEY]["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def enclosing_store(path: UPath) -> UPath | None:
    """The nearest folder above `path` that is a Zarr store (it holds a zarr.json)."""
    path = UPath(path)
    if not is_local(path):
        return next((p for p in path.parents if (p / "zarr.json").is_file()), None)
    for parent in path.absolute().resolve().parents:
        if (parent / "zarr.json").is_file():
            return Path(os.path.relpath(parent))
    return None


def _written_by_kdmtl(parts: tuple[str, ...]) -> bool:
    """Whether kdmtl writes a file at these parts of a path in a store: group and array metadata
    (`zarr.json` at most two levels down) and chunk files (`SPLIT/ARRAY/c/...`)."""
    metadata = parts[-1] == "zarr.json" and len(parts) <= 3
    return metadata or (len(parts) > 3 and parts[2] == "c")


def _foreign_files(path: UPath) -> list[UPath]:
    """Files (and, locally, links and other entries) in the store at `path` that kdmtl does not
    write."""
    path = UPath(path)
    if not is_local(path):
        return [path / name for name in files_below(path) if not _written_by_kdmtl(name.split("/"))]
    foreign = []
    for file in path.rglob("*"):
        parts = file.relative_to(path).parts
        if file.is_symlink() or not (file.is_dir() or _written_by_kdmtl(parts)):
            foreign.append(file)
    return foreign


def _resolved(path: UPath) -> UPath:
    """`path` as one spelling per place: absolute, with links followed, where it is local."""
    return path.absolute().resolve() if is_local(path) else path


def check_writable(
    path: UPath, kind: str, key: str, inputs: dict[str, UPath] | None = None
) -> None:
    """Refuse to write a store of `kind` at `path` (set by params key `key`) where that would
    replace or delete something kdmtl did not make: an existing file or folder that is not a
    kdmtl store of that kind, a place inside another store, or one of the command's `inputs`
    (params key -> path), or a folder that holds one of them."""
    path = UPath(path)
    fix = f"move it away or set {key} to another path"
    target = _resolved(path)
    for input_key, input_path in (inputs or {}).items():
        source = _resolved(UPath(input_path))
        if target == source or target in source.parents:
            raise DataError(
                f"{path} would replace {input_path} ({input_key}), which this command reads: {fix}"
            )
    if not is_local(path) and "/" not in path.path.strip("/"):
        raise DataError(f"{path} is a whole bucket; a store is a folder in one: {fix}")
    if path.is_symlink():
        raise DataError(f"{path} is a symbolic link; kdmtl replaces only folders it made: {fix}")
    if path.exists():
        found = store_kind(path)
        if found != kind:
            what = f"a {found} store" if found else "not a readable kdmtl store"
            raise DataError(
                f"{path} exists and is {what}; kdmtl replaces only the {kind} stores it made "
                f"(delete it yourself if it is a damaged one): {fix}"
            )
        foreign = _foreign_files(path)
        if foreign:
            raise DataError(
                f"{path} holds files kdmtl did not write ({foreign[0]}"
                f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}): {fix}"
            )
    outer = enclosing_store(path)
    if outer is not None:
        raise DataError(f"{path} lies inside the Zarr store {outer}: {fix}")
