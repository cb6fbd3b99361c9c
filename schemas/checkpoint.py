"""Metadata stored in checkpoints beside the weights, and the evaluation's metrics files."""

from typing import Annotated, Literal

from pydantic import Field, model_serializer, model_validator

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


class EvaluationReport(Contract):
    """`metrics/details/eval.json`: every metric of the student and of its teachers on the test
    split, Delta_MTL overall and per task, and the sha256 of each checkpoint evaluated."""

    delta_mtl: float
    delta_per_task: dict[str, float]
    student: dict[str, dict[str, float]]
    teachers: dict[str, dict[str, float]]
    student_checkpoint: str
    teacher_checkpoints: dict[str, str]


class TaskHeadline(Contract):
    metric: str  # the task's main metric
    student: float
    teacher: float
    delta: float  # the task's Delta_MTL: the mean over all of its metrics


class EvaluationHeadline(Contract):
    """`metrics/eval.json`, the numbers that `dvc metrics show` and `dvc exp show` list: Delta_MTL
    and, per task, the student's main metric, its teacher's and the task's delta. In the file:
    `{"delta_mtl": D, TASK: {METRIC: S, "teacher_METRIC": T, "delta": d}, ...}`."""

    delta_mtl: float
    tasks: dict[str, TaskHeadline] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _from_file(cls, data: object) -> object:
        if not isinstance(data, dict) or "tasks" in data:
            return data
        tasks = {}
        for task, values in data.items():
            if task == "delta_mtl":
                continue
            if not isinstance(values, dict):
                raise ValueError(f"{task}: expected {{METRIC, teacher_METRIC, delta}}")
            metrics = [k for k in values if k != "delta" and not k.startswith("teacher_")]
            if len(metrics) != 1 or len(values) != 3 or f"teacher_{metrics[0]}" not in values:
                raise ValueError(f"{task}: expected {{METRIC, teacher_METRIC, delta}}")
            metric = metrics[0]
            tasks[task] = {
                "metric": metric,
                "student": values[metric],
                "teacher": values[f"teacher_{metric}"],
                "delta": values.get("delta"),
            }
        return {"delta_mtl": data.get("delta_mtl"), "tasks": tasks}

    @model_serializer
    def _to_file(self) -> dict[str, object]:
        return {"delta_mtl": self.delta_mtl} | {
            task: {t.metric: t.student, f"teacher_{t.metric}": t.teacher, "delta": t.delta}
            for task, t in self.tasks.items()
        }
