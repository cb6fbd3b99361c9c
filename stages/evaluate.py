"""`kdmtl evaluate` (DVC stage `evaluate`): the student against its teachers on the test split."""

from pathlib import Path

import click

from pipeline.checkpoints import load_student
from pipeline.errors import KdmtlError
from pipeline.evaluation import compare, prediction_grid
from pipeline.files import sha256_file, write_atomically
from pipeline.store.prepared import PreparedSplit, open_prepared
from pipeline.store.stream import ChunkStream
from pipeline.tasks import make_tasks
from pipeline.training import resolve_device
from schemas.params import Params
from stages.common import load_current_teacher, params_option, user_errors, write_json

GRID_IMAGES = 4


@click.command("evaluate")
@params_option
@user_errors
def command(params: Params) -> None:
    """Evaluate the student and every teacher on the test split: metrics/eval.json with
    Delta_MTL, and a picture of predictions under plots/eval/."""
    prepared = open_prepared(Path(params.paths.prepared))
    student_path = Path(params.paths.student)
    if not student_path.is_file():
        raise KdmtlError(f"no student at {student_path}: run `kdmtl train-student` first")
    student, metadata = load_student(student_path)
    if metadata.prepared_fingerprint != prepared.manifest.fingerprint:
        raise KdmtlError(f"{student_path} was trained on other prepared data than {prepared.path}")
    teachers = {}
    for task in metadata.tasks:
        teachers[task], _, path = load_current_teacher(params, task, prepared)
        distilled = metadata.distilled_from.get(task)
        if distilled is not None and distilled != sha256_file(path):
            raise KdmtlError(
                f"{student_path} was distilled from another {task} teacher than {path}: "
                "run `kdmtl train-student` again (or `dvc repro`)"
            )
    tasks = make_tasks(metadata.tasks, prepared.manifest.num_classes)
    device = resolve_device(params.device)
    test = ChunkStream(PreparedSplit(prepared, "test", metadata.tasks), 32, shuffle=False)
    report = compare(student, teachers, tasks, test, device)
    write_json(Path(params.paths.metrics) / "eval.json", report.model_dump())
    first = next(iter(ChunkStream(test.source, GRID_IMAGES, shuffle=False)))
    picture = prediction_grid(student, teachers, tasks, first, device)
    png = Path(params.paths.plots) / "eval" / "predictions.png"
    write_atomically(png, lambda partial: picture.save(partial, format="PNG"))
    click.echo(
        f"Delta_MTL of the student against its teachers: {report.delta_mtl:+.2f}% "
        "(the mean of the tasks' deltas; positive: the student is better)"
    )
    for task in tasks:
        main = tasks[task].main_metric
        student_main, teacher_main = report.student[task][main], report.teachers[task][main]
        click.echo(
            f"  {task}: {main} student {student_main:.4f}, teacher {teacher_main:.4f}; "
            f"task delta {report.delta_per_task[task]:+.2f}%, the mean over its "
            f"{len(report.student[task])} metrics"
        )
    click.echo(f"wrote {Path(params.paths.metrics) / 'eval.json'} and {png}")
