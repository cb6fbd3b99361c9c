"""Metadata stored in checkpoints beside the weights, and the metrics files of training stages."""

from typing import Literal

from schemas.base import Contract
from schemas.params import StudentParams, TrainParams


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


class StudentMetadata(Contract):
    kind: Literal["kdmtl.student"] = "kdmtl.student"
    tasks: list[str]
    model: ModelSpec
    train: StudentParams
    augment: bool
    prepared_fingerprint: str
    distilled_from: dict[
        str, str
    ]  # task -> sha256 of the teacher checkpoint the features came from
    class_names: list[str]
    test_metrics: dict[str, dict[str, float]]
    kdmtl_version: str


class TeacherReport(Contract):
    """`metrics/teachers/TASK.json`: the teacher's test metrics and the trivial baseline's."""

    test: dict[str, float]
    baseline: dict[str, float]
    epochs: int


class EvaluationReport(Contract):
    """`metrics/eval.json`: the student against its teachers on the test split."""

    delta_mtl: float
    delta_per_task: dict[str, float]
    student: dict[str, dict[str, float]]
    teachers: dict[str, dict[str, float]]
