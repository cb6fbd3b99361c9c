"""`kdmtl evaluate` (DVC stage `evaluate`): the student against its teachers on the test split."""

from pathlib import Path

import click

from pipeline.checkpoints import load_student
from pipeline.errors import KdmtlError
from pipeline.evaluation import compare, headline, prediction_grid
from pipeline.files import sha256_file, write_atomically
from pipeline.store.prepared import PreparedSplit, open_prepared
from pipeline.store.stream import ChunkStream
from pipeline.tasks import make_tasks
from pipeline.training import resolve_device
from schemas.params import Params
from stages.common import (
    current_teacher,
    params_option,
    prepared_path,
    user_errors,
    write_json,
)

GRID_IMAGES = 4


@click.command("evaluate")
@params_option
@user_errors
def command(params: Params) -> None:
    """Evaluate the student and every teacher on the test split: METRICS/eval.json (Delta_MTL and
    each task's main metric and delta), METRICS/details/eval.json (every metric), and a picture of
    predictions, PLOTS/eval/predictions.png."""
    prepared = open_prepared(prepared_path(params))
    student_path = Path(params.paths.student)
    if not student_path.is_file():
        raise KdmtlError(f"no student at {student_path}: run `kdmtl train-student` first")
    student, metadata = load_student(student_path)
    if metadata.prepared_fingerprint != prepared.manifest.fingerprint:
        raise KdmtlError(f"{student_path} was trained on other prepared data than {prepared.path}")
    teachers, fingerprints = {}, {}
    for task in metadata.tasks:
        teacher = current_teacher(params, task, prepared)
        fingerprints[task] = teacher.fingerprint
        distilled = metadata.distilled_from.get(task)
        if distilled is not None and distilled != teacher.fingerprint:
            raise KdmtlError(
                f"{student_path} was distilled from another {task} teacher than "
                f"{teacher.source}: run `kdmtl train-student` again (or `dvc repro`)"
            )
        if teacher.predicts:
            teachers[task] = teacher.network
    tasks = make_tasks(metadata.tasks, prepared.manifest.num_classes)
    device = resolve_device(params.device)
    test = ChunkStream(PreparedSplit(prepared, "test", metadata.tasks), 32, shuffle=False)
    checkpoints = (sha256_file(student_path), fingerprints)
    report = compare(student, teachers, tasks, test, device, checkpoints)
    metrics = Path(params.paths.metrics)
    write_json(metrics / "details" / "eval.json", report.model_dump())
    write_json(metrics / "eval.json", headline(report, tasks).model_dump())
    first = next(iter(ChunkStream(test.source, GRID_IMAGES, shuffle=False, read_ahead=False)))
    picture = prediction_grid(student, teachers, tasks, first, device)
    png = Path(params.paths.plots) / "eval" / "predictions.png"
    write_atomically(png, lambda partial: picture.save(partial, format="PNG"))
    if report.delta_mtl is None:
        click.echo("no teacher gives predictions: the student is evaluated against ground truth")
    else:
        click.echo(
            f"Delta_MTL of the student against its teachers: {report.delta_mtl:+.2f}% "
            "(the mean of the tasks' deltas; positive: the student is better)"
        )
    for task in tasks:
        main = tasks[task].main_metric
        line = f"  {task}: {main} student {report.student[task][main]:.4f}"
        if task in report.teachers:
            line += (
                f", teacher {report.teachers[task][main]:.4f}; task delta "
                f"{report.delta_per_task[task]:+.2f}%, the mean over its "
                f"{len(report.student[task])} metrics"
            )
        else:
            line += " (its imported teacher gives no prediction: no delta)"
        click.echo(line)
    click.echo(f"wrote {metrics / 'eval.json'}, {metrics / 'details' / 'eval.json'} and {png}")
