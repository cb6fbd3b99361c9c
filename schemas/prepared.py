"""Manifest of a prepared dataset (`data/prepared.zarr`), kept in the Zarr group's attributes."""

from typing import Literal

from pydantic import Field

from schemas.base import Contract


class ArrayInfo(Contract):
    shape: list[int]
    dtype: str
    chunks: list[int]


class SplitInfo(Contract):
    num_samples: int = Field(ge=1)
    arrays: dict[str, ArrayInfo]


class PreparedManifest(Contract):
    """What a prepared store holds. `fingerprint` is a sha256 of every array's decoded content."""

    kind: Literal["kdmtl.prepared"] = "kdmtl.prepared"
    source: str
    tasks: list[str]
    class_names: list[str]
    height: int
    width: int
    chunk_size: int
    splits: dict[str, SplitInfo]
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    kdmtl_version: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
