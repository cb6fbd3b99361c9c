"""The student against its teachers: metrics, Delta_MTL, and a picture of predictions."""

from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.metrics import delta_mtl
from pipeline.models import Architecture
from pipeline.tasks import Task, higher_is_better
from pipeline.training import Batch, Metrics, evaluate
from pipeline.visualize import colour_classes, colour_depth, colour_normals, grid
from schemas.checkpoint import EvaluationHeadline, EvaluationReport, TaskHeadline


def compare(
    student: Architecture,
    teachers: dict[str, nn.Module],
    tasks: dict[str, Task],
    batches: Iterable[Batch],
    device: torch.device,
    checkpoints: tuple[str, dict[str, str]],
) -> EvaluationReport:
    """Evaluate the student and each teacher on the same batches; Delta_MTL of the student with
    the teachers as single-task baselines, overall and per task. A task missing from `teachers`
    (its teacher gives no prediction) is evaluated against the ground truth only and left out
    of Delta_MTL. `checkpoints` (the sha256 of the student's checkpoint, and each teacher's
    fingerprint) goes into the report as is."""
    batches = list(batches)
    student_metrics = evaluate(student.to(device), tasks, batches, device)
    teacher_metrics: Metrics = {
        name: evaluate(teachers[name].to(device), {name: tasks[name]}, batches, device)[name]
        for name in tasks
        if name in teachers
    }
    directions = higher_is_better(tasks)
    per_task = {
        name: delta_mtl(
            {name: teacher_metrics[name]}, {name: student_metrics[name]}, {name: directions[name]}
        )
        for name in teacher_metrics
    }
    compared = {name: student_metrics[name] for name in teacher_metrics}
    return EvaluationReport(
        delta_mtl=delta_mtl(teacher_metrics, compared, directions) if compared else None,
        delta_per_task=per_task,
        student=student_metrics,
        teachers=teacher_metrics,
        student_checkpoint=checkpoints[0],
        teacher_checkpoints=checkpoints[1],
    )


def headline(report: EvaluationReport, tasks: dict[str, Task]) -> EvaluationHeadline:
    """The few numbers to compare runs by: Delta_MTL, and per task the main metric of student and
    teacher (None without a teacher prediction), and the task's delta."""
    return EvaluationHeadline(
        delta_mtl=report.delta_mtl,
        tasks={
            name: TaskHeadline(
                metric=task.main_metric,
                student=report.student[name][task.main_metric],
                teacher=report.teachers.get(name, {}).get(task.main_metric),
                delta=report.delta_per_task.get(name),
            )
            for name, task in tasks.items()
        },
    )


def _colour(task: str, values: torch.Tensor, depth_range: tuple[float, float]) -> np.ndarray:
    values = values.cpu().numpy()
    if task == "semseg":
        return colour_classes(values)
    if task == "depth":
        return colour_depth(values[0], *depth_range)
    return colour_normals(values)


@torch.no_grad()
def prediction_grid(
    student: Architecture,
    teachers: dict[str, nn.Module],
    tasks: dict[str, Task],
    batch: Batch,
    device: torch.device,
) -> Image.Image:
    """One row per image of `batch`: the input, then per task the ground truth, the student's and
    (when it gives one) the teacher's prediction. Depth shares one colour range per row."""
    images = batch["image"].to(device)
    student_out = student.to(device).eval()(images).predictions
    teacher_out = {
        name: teachers[name].to(device).eval()(images).predictions[name]
        for name in tasks
        if name in teachers
    }
    titles = ["input"]
    for name in tasks:
        titles += [f"{name} truth", f"{name} student"]
        titles += [f"{name} teacher"] if name in teacher_out else []
    rows = []
    for i in range(len(images)):
        row = [(batch["image"][i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)]
        depth_range = (0.0, 1.0)
        if "depth" in tasks:
            truth = batch["depth"][i]
            depth_range = (0.0, float(truth.max()) or 1.0)
        for name, task in tasks.items():
            shown = [batch[name][i], task.predict(student_out[name][i : i + 1])[0]]
            if name in teacher_out:
                shown.append(task.predict(teacher_out[name][i : i + 1])[0])
            row += [_colour(name, values, depth_range) for values in shown]
        rows.append(row)
    return grid(rows, titles)
