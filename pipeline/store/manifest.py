"""The kdmtl manifest of a Zarr store: a validated record in the root group's attributes."""

from pathlib import Path
from typing import TypeVar

import zarr
from pydantic import BaseModel, ValidationError

from pipeline.errors import DataError

MANIFEST_KEY = "kdmtl"
M = TypeVar("M", bound=BaseModel)


def read_manifest(path: Path, schema: type[M], what: str, remedy: str) -> M:
    """The validated manifest of a kdmtl Zarr store, or a DataError saying what to run."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise DataError(f"no {what} at {path}: {remedy}")
    attrs = zarr.open_group(path, mode="r").attrs.asdict()
    if MANIFEST_KEY not in attrs:
        raise DataError(f"{path} has no kdmtl manifest (incomplete?): {remedy}")
    try:
        return schema.model_validate(attrs[MANIFEST_KEY])
    except ValidationError as error:
        raise DataError(f"{path} has an invalid manifest: {error.errors()[0]['msg']}") from None
