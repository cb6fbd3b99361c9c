"""Metadata stored in checkpoints beside the weights, and the metrics files of training stages."""

from typing import Literal

from schemas.base import Contract
from schemas.params import TrainParams


class ModelSpec(Contract):
    """Enough to rebuild a network before loading its weights."""

    arch: str
    filters: list[int]
    heads: dict[str, int]  # task -> output channels


class TeacherMetadata(Contract):
    kind: Literal["kdmtl.teacher"] = "kdmtl.teacher"
    task: str
    model: ModelSpec
    train: TrainParams
    seed: int
    prepared_fingerprint: str
    class_names: list[str]
    test_metrics: dict[str, float]
    kdmtl_version: str


class TeacherReport(Contract):
    """`metrics/teachers/TASK.json`: the teacher's test metrics and the trivial baseline's."""

    test: dict[str, float]
    baseline: dict[str, float]
    epochs: int
