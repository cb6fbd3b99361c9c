"""`kdmtl train-teacher --teacher TASK` (DVC stage `train_teacher@TASK`)."""

from pathlib import Path

import click

from pipeline import __version__
from pipeline.checkpoints import ensure_replaceable, save_checkpoint
from pipeline.errors import KdmtlError
from pipeline.store.prepared import open_prepared
from pipeline.teacher import train_teacher
from schemas.checkpoint import ModelSpec, TeacherMetadata
from schemas.params import Params
from stages.common import (
    choose_task,
    main_process_log,
    params_option,
    prepared_path,
    trained_checkpoint,
    training_processes,
    user_errors,
)


@click.command("train-teacher")
@click.option("--teacher", "task", required=True, help="Task of the teacher, one of params' tasks.")
@params_option
@user_errors
def command(task: str, params: Params) -> None:
    """Train one single-task teacher on the prepared data; its curves and final metrics go to
    METRICS/teachers/TASK/ (DVCLive), updated after every epoch. Started by torchrun, trains
    with DistributedDataParallel, one process per GPU (README, "Several GPUs and machines")."""
    choose_task(task, params)
    if task in params.teacher.imported:
        raise KdmtlError(
            f"the {task} teacher is imported (teacher.imported.{task}): kdmtl does not train it; "
            f"run `kdmtl extract-features --teacher {task}` to cache its features"
        )
    checkpoint = trained_checkpoint(params, task)
    # Before training, not after: refuse what kdmtl must not replace.
    ensure_replaceable(checkpoint, TeacherMetadata.model_fields["kind"].default)
    store = open_prepared(prepared_path(params))
    store.check_matches(params.data)
    train = params.teacher.for_task(task)
    with (
        training_processes(params) as (replicas, device),
        main_process_log(Path(params.paths.metrics) / "teachers" / task, replicas) as log,
    ):
        result = train_teacher(
            store,
            task,
            params.model,
            train,
            params.loader,
            params.seed,
            device,
            on_epoch=log.epoch if log else None,
            replicas=replicas,
        )
        if not replicas.is_main:
            return
        metadata = TeacherMetadata(
            task=task,
            model=ModelSpec(
                arch=params.model.arch, filters=params.model.filters, heads=result.model.heads
            ),
            train=train,
            seed=params.seed,
            prepared_fingerprint=store.manifest.fingerprint,
            class_names=store.manifest.class_names,
            image_size=[store.manifest.height, store.manifest.width],
            test_metrics=result.test_metrics,
            kdmtl_version=__version__,
        )
        save_checkpoint(checkpoint, result.model, metadata)
        log.final("test", result.test_metrics)
        log.final("baseline", result.baseline_metrics)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.test_metrics.items())
    base = ", ".join(f"{k} {v:.4f}" for k, v in result.baseline_metrics.items())
    click.echo(f"wrote {checkpoint}: test {shown}\n  trivial baseline: {base}")
