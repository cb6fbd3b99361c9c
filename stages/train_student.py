"""`kdmtl train-student` (DVC stage `train_student`)."""

from pathlib import Path

import click

from pipeline import __version__
from pipeline.checkpoints import ensure_replaceable, save_checkpoint
from pipeline.distill import DISTILLERS
from pipeline.errors import KdmtlError
from pipeline.store.features import FeatureStore
from pipeline.store.prepared import open_prepared
from pipeline.student import check_stores, train_student
from schemas.checkpoint import ModelSpec, StudentMetadata
from schemas.params import Params
from stages.common import (
    current_fingerprint,
    current_teacher,
    feature_store_path,
    main_process_log,
    params_option,
    prepared_path,
    training_processes,
    user_errors,
)


@click.command("train-student")
@params_option
@user_errors
def command(params: Params) -> None:
    """Train the multi-task student: from the cached teacher features (methods kd and url), or
    plain; its
    curves and final metrics go to METRICS/student/ (DVCLive), updated after every epoch.
    Started by torchrun, trains with DistributedDataParallel, one process per GPU (README,
    "Several GPUs and machines")."""
    student_path = Path(params.paths.student)
    # Before training, not after: refuse what kdmtl must not replace.
    ensure_replaceable(student_path, StudentMetadata.model_fields["kind"].default)
    prepared = open_prepared(prepared_path(params))
    prepared.check_matches(params.data)
    config = params.student
    stores, teachers, distilled_from = None, None, {}
    distil = config.method in DISTILLERS
    if distil and config.kd_source == "cache":
        paths = {task: feature_store_path(params, task) for task in params.tasks}
        missing = [task for task, path in paths.items() if not path.exists()]
        if missing:
            commands = ", ".join(f"`kdmtl extract-features --teacher {t}`" for t in missing)
            raise KdmtlError(
                f"no feature store for {', '.join(missing)} in {params.paths.features}: run "
                f"{commands} (or `dvc repro`)"
            )
        stores = {task: FeatureStore.open(path) for task, path in paths.items()}
        fingerprints = {task: current_fingerprint(params, task) for task in params.tasks}
        check_stores(stores, prepared, fingerprints, params.features, params.data.augment)
        distilled_from = {t: store.manifest.teacher_fingerprint for t, store in stores.items()}
    elif distil:
        teachers = {}
        for task in params.tasks:
            teacher = current_teacher(params, task, prepared)
            teachers[task], distilled_from[task] = teacher.network, teacher.fingerprint
    model = params.student_model
    with (
        training_processes(params) as (replicas, device),
        main_process_log(Path(params.paths.metrics) / "student", replicas) as log,
    ):
        result = train_student(
            prepared,
            params.tasks,
            model,
            config,
            params.loader,
            device,
            augment=params.data.augment,
            stores=stores,
            teachers=teachers,
            on_epoch=log.epoch if log else None,
            replicas=replicas,
        )
        if not replicas.is_main:
            return
        metadata = StudentMetadata(
            tasks=params.tasks,
            model=ModelSpec(arch=model.arch, filters=model.filters, heads=result.model.heads),
            train=config,
            augment=params.data.augment,
            prepared_fingerprint=prepared.manifest.fingerprint,
            distilled_from=distilled_from,
            class_names=prepared.manifest.class_names,
            image_size=[prepared.manifest.height, prepared.manifest.width],
            test_metrics=result.test_metrics,
            kdmtl_version=__version__,
        )
        save_checkpoint(student_path, result.model, metadata)
        for task, metrics in result.test_metrics.items():
            log.final(f"test/{task}", metrics)
    shown = "; ".join(
        f"{task} " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        for task, metrics in result.test_metrics.items()
    )
    click.echo(f"wrote {student_path} ({config.method}): test {shown}")
