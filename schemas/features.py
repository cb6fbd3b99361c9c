"""Manifest of a teacher feature store (`features/TASK.zarr`), kept in the group attributes."""

from typing import Any, Literal

from pydantic import AliasChoices, Field

from schemas.base import Contract, FileRecord
from schemas.params import ImportedTeacherParams


class FeatureArrayInfo(Contract):
    """One cached feature: [N, V, C, h, w]."""

    shape: list[int]
    dtype: str
    chunks: list[int]
    shards: list[int]
    codecs: list[dict[str, Any]]


class ViewSpec(Contract):
    """How the cached views were drawn."""

    views: int = Field(ge=1)
    augment: bool
    scales: list[float]
    flip: bool
    seed: int


class ImportedTeacherRecord(ImportedTeacherParams):
    """What an imported teacher was built from (params `teacher.imported.TASK`), with the sha256
    of its factory's file and of its weights."""

    file_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class FeatureManifest(Contract):
    """What a feature store holds and what it was computed from.

    Per-shard completion lives in the store's `SPLIT/complete` array, one chunk per shard, because
    several processes write shards at once and must not share one attributes file; `complete` here
    is set only once every shard is written.
    """

    kind: Literal["kdmtl.features"] = "kdmtl.features"
    task: str
    # sha256 identifying the teacher: of its kdmtl checkpoint, or of an imported teacher's record
    # (`imported`, file paths left out). Older stores call it checkpoint_sha256.
    teacher_fingerprint: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        validation_alias=AliasChoices("teacher_fingerprint", "checkpoint_sha256"),
    )
    imported: ImportedTeacherRecord | None = None
    prepared_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    split: str
    num_samples: int
    chunk_size: int
    shard_size: int
    num_shards: int
    views: ViewSpec
    encoding: str  # a registered feature encoding: how stored values map to features
    # The teacher's forward pass; stores made before precisions were recorded ran in fp32.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    features: dict[str, FeatureArrayInfo]
    kdmtl_version: str
    # every zarr.json below the root, by relative path; recorded when the store is created
    metadata_files: dict[str, FileRecord]
    complete: bool = False
