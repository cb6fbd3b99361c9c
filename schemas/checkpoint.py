"""Metadata stored in checkpoints beside the weights, and the metrics files of training stages."""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from schemas.base import Contract
from schemas.params import MAX_FILTERS, MAX_LEVELS, StudentParams, TrainParams

# Bounds on the heads a checkpoint's metadata may describe (the filters' are the params' own).
MAX_HEADS = 64  # one per task
MAX_HEAD_CHANNELS = 4096  # classes of a segmentation head


class ModelSpec(Contract):
    """Enough to rebuild a network before loading its weights."""

    arch: str
    filters: list[Annotated[int, Field(ge=1, le=MAX_FILTERS)]] = Field(
        min_length=1, max_length=MAX_LEVELS
    )
    heads: dict[str, Annotated[int, Field(ge=1, le=MAX_HEAD_CHANNELS)]] = Field(
        min_length=1, max_length=MAX_HEADS
    )  # task -> output channels


class CheckpointMetadata(Contract):
    """What every kdmtl checkpoint's metadata holds: its kind, and the network it stores."""

    kind: str
    model: ModelSpec


class TeacherMetadata(CheckpointMetadata):
    kind: Literal["kdmtl.teacher"] = "kdmtl.teacher"
    task: str
    train: TrainParams
    seed: int
    prepared_fingerprint: str
    class_names: list[str]
    test_metrics: dict[str, float]
    kdmtl_version: str

    @model_validator(mode="after")
    def _one_head(self) -> "TeacherMetadata":
        # A teacher's features are those of its only head (`Architecture.distilled_features`).
        if list(self.model.heads) != [self.task]:
            raise ValueError(
                f"model.heads must be the teacher's task {self.task!r} alone, "
                f"got {list(self.model.heads)}"
            )
        return self


class StudentMetadata(CheckpointMetadata):
    kind: Literal["kdmtl.student"] = "kdmtl.student"
    tasks: list[str]
    train: StudentParams
    augment: bool
    prepared_fingerprint: str
    distilled_from: dict[
        str, str
    ]  # task -> sha256 of the teacher checkpoint the features came from
    class_names: list[str]
    test_metrics: dict[str, dict[str, float]]
    kdmtl_version: str

    @model_validator(mode="after")
    def _a_head_per_task(self) -> "StudentMetadata":
        if set(self.model.heads) != set(self.tasks):
            raise ValueError(
                f"model.heads must have one head per task {self.tasks}, "
                f"got {list(self.model.heads)}"
            )
        return self


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
