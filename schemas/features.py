"""Manifest of a teacher feature store (`features/TASK.zarr`), kept in the group attributes."""

from typing import Any, Literal

from pydantic import Field

from schemas.base import Contract, FileRecord


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


class FeatureManifest(Contract):
    """What a feature store holds and what it was computed from.

    Per-shard completion lives in the store's `SPLIT/complete` array, one chunk per shard, because
    several processes write shards at once and must not share one attributes file; `complete` here
    is set only once every shard is written.
    """

    kind: Literal["kdmtl.features"] = "kdmtl.features"
    task: str
    checkpoint_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
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
