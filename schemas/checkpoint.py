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
    """What every kdmtl checkpoint's metadata holds: its kind, the network it stores, and the
    [height, width] of the images it was trained on (null in checkpoints made before kdmtl
    recorded it)."""

    kind: str
    model: ModelSpec
    image_size: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=2, max_length=2)


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
    split, Delta_MTL overall and per task, the sha256 of the student's checkpoint and each
    teacher's fingerprint. A teacher that gives no prediction (an imported one without `output`)
    has no metrics and its task no delta; Delta_MTL is the mean over the other tasks (null when
    there are none)."""

    delta_mtl: float | None
    delta_per_task: dict[str, float]
    student: dict[str, dict[str, float]]
    teachers: dict[str, dict[str, float]]
    student_checkpoint: str
    teacher_checkpoints: dict[str, str]


class TaskHeadline(Contract):
    metric: str  # the task's main metric
    student: float
    teacher: float | None  # None: the teacher gives no prediction
    delta: float | None  # the task's Delta_MTL: the mean over all of its metrics


class EvaluationHeadline(Contract):
    """`metrics/eval.json`, the numbers that `dvc metrics show` and `dvc exp show` list: Delta_MTL
    and, per task, the student's main metric, its teacher's and the task's delta. In the file:
    `{"delta_mtl": D, TASK: {METRIC: S, "teacher_METRIC": T, "delta": d}, ...}`, a task whose
    teacher gives no prediction holding `{METRIC: S}` alone."""

    delta_mtl: float | None
    tasks: dict[str, TaskHeadline] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _from_file(cls, data: object) -> object:
        if not isinstance(data, dict) or "tasks" in data:
            return data
        tasks = {}
        expected = "expected {METRIC, teacher_METRIC, delta} or {METRIC}"
        for task, values in data.items():
            if task == "delta_mtl":
                continue
            if not isinstance(values, dict):
                raise ValueError(f"{task}: {expected}")
            metrics = [k for k in values if k != "delta" and not k.startswith("teacher_")]
            if len(metrics) != 1:
                raise ValueError(f"{task}: {expected}")
            metric = metrics[0]
            compared = {metric, f"teacher_{metric}", "delta"}
            if set(values) not in ({metric}, compared):
                raise ValueError(f"{task}: {expected}")
            tasks[task] = {
                "metric": metric,
                "student": values[metric],
                "teacher": values.get(f"teacher_{metric}"),
                "delta": values.get("delta"),
            }
        headline = {key: data[key] for key in ("delta_mtl",) if key in data}  # else missing
        return headline | {"tasks": tasks}

    @model_serializer
    def _to_file(self) -> dict[str, object]:
        return {"delta_mtl": self.delta_mtl} | {
            task: {t.metric: t.student}
            | ({} if t.teacher is None else {f"teacher_{t.metric}": t.teacher, "delta": t.delta})
            for task, t in self.tasks.items()
        }
