"""`kdmtl train-teacher --teacher TASK` (DVC stage `train_teacher@TASK`)."""

from pathlib import Path

import click

from pipeline import __version__
from pipeline.checkpoints import ensure_replaceable, save_checkpoint
from pipeline.store.prepared import open_prepared
from pipeline.teacher import train_teacher
from pipeline.training import resolve_device
from schemas.checkpoint import ModelSpec, TeacherMetadata, TeacherReport
from schemas.params import Params
from stages.common import (
    choose_task,
    forget_reports,
    params_option,
    user_errors,
    write_curves,
    write_json,
)


@click.command("train-teacher")
@click.option("--teacher", "task", required=True, help="Task of the teacher, one of params' tasks.")
@params_option
@user_errors
def command(task: str, params: Params) -> None:
    """Train one single-task teacher on the prepared data."""
    choose_task(task, params)
    checkpoint = Path(params.paths.teachers) / f"{task}.pt"
    metrics = Path(params.paths.metrics) / "teachers" / f"{task}.json"
    curves = Path(params.paths.plots) / "teachers" / task
    # Before training, not after: refuse what kdmtl must not replace.
    ensure_replaceable(checkpoint, TeacherMetadata.model_fields["kind"].default)
    store = open_prepared(Path(params.paths.prepared))
    store.check_matches(params.data)
    forget_reports(curves, metrics, TeacherReport)  # of the checkpoint this run replaces
    train = params.teacher.for_task(task)
    result = train_teacher(
        store, task, params.model, train, params.loader, params.seed, resolve_device(params.device)
    )
    metadata = TeacherMetadata(
        task=task,
        model=ModelSpec(
            arch=params.model.arch, filters=params.model.filters, heads=result.model.heads
        ),
        train=train,
        seed=params.seed,
        prepared_fingerprint=store.manifest.fingerprint,
        class_names=store.manifest.class_names,
        test_metrics=result.test_metrics,
        kdmtl_version=__version__,
    )
    save_checkpoint(checkpoint, result.model, metadata)
    report = TeacherReport(
        test=result.test_metrics, baseline=result.baseline_metrics, epochs=train.epochs
    )
    write_json(metrics, report.model_dump())
    write_curves(curves, result.history)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.test_metrics.items())
    base = ", ".join(f"{k} {v:.4f}" for k, v in result.baseline_metrics.items())
    click.echo(f"wrote {checkpoint}: test {shown}\n  trivial baseline: {base}")
