"""Manifest of a prepared dataset (`data/prepared.zarr`), kept in the Zarr group's attributes."""

from typing import Any, Literal

from pydantic import Field

from schemas.base import Contract, FileRecord


class ArrayInfo(Contract):
    shape: list[int]
    dtype: str
    chunks: list[int]
    chunk_files: list[FileRecord]  # one per chunk along samples: zarr reads a missing one as 0


class SplitInfo(Contract):
    num_samples: int = Field(ge=1)
    arrays: dict[str, ArrayInfo]


class PreparedManifest(Contract):
    """What a prepared store holds. `fingerprint` is a sha256 of every array's decoded content and
    of `data_params`, the params that decide that content."""

    kind: Literal["kdmtl.prepared"] = "kdmtl.prepared"
    source: str
    tasks: list[str]
    class_names: list[str]
    height: int
    width: int
    chunk_size: int
    splits: dict[str, SplitInfo]
    data_params: dict[str, Any]
    metadata_files: dict[str, FileRecord]  # every zarr.json below the root, by relative path
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    kdmtl_version: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
