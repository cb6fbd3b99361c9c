"""`kdmtl extract-features --teacher TASK` (DVC stage `extract_features@TASK`)."""

import os

import click

from pipeline.distributed import launched_by_torchrun, process_device
from pipeline.precision import resolve_precision
from pipeline.store.extract import extract, feature_shapes
from pipeline.store.features import assign_shards, open_or_create, plan_manifest
from pipeline.store.prepared import open_prepared
from pipeline.training import resolve_device
from schemas.params import Params
from stages.common import (
    choose_task,
    current_teacher,
    feature_store_path,
    params_option,
    prepared_path,
    user_errors,
)


def parse_shard_of(value: str | None) -> tuple[int, int]:
    """`I/N` from the option, else RANK/WORLD_SIZE when started by torchrun, else 0/1."""
    if value is None:
        if launched_by_torchrun():
            return int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
        return 0, 1
    try:
        part, parts = (int(x) for x in value.split("/"))
    except ValueError:
        part, parts = -1, 0
    if not 0 <= part < parts:
        raise click.BadParameter(
            f"{value!r} is not I/N with 0 <= I < N, e.g. 0/2", param_hint="'--shard-of'"
        )
    return part, parts


@click.command("extract-features")
@click.option("--teacher", "task", required=True, help="Task of the teacher, one of params' tasks.")
@click.option(
    "--shard-of",
    default=None,
    metavar="I/N",
    help="Extract part I of N (0-based) of the shards, with N processes sharing the store; "
    "defaults to RANK/WORLD_SIZE under torchrun.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Also compare each written shard's sha256 with its record, and write again those that "
    "differ: mends a shard whose bytes were damaged in place (a full read of the store).",
)
@params_option
@user_errors
def command(task: str, shard_of: str | None, check: bool, params: Params) -> None:
    """Run a teacher (trained or imported) once over the training data and cache its features in
    features/TASK.zarr.

    Resumes a killed run from its completed shards, and writes again any shard whose files are
    missing or of another size than written (with --check, of other bytes)."""
    choose_task(task, params)
    part, parts = parse_shard_of(shard_of)
    prepared = open_prepared(prepared_path(params))
    prepared.check_matches(params.data)
    teacher = current_teacher(params, task, prepared)
    device = process_device(resolve_device(params.device))
    network = teacher.network.to(device)
    manifest = plan_manifest(
        task,
        teacher.fingerprint,
        prepared,
        feature_shapes(network, prepared.manifest.height, prepared.manifest.width),
        params.features,
        params.data.augment,
        resolve_precision(params.features.precision, device),
        teacher.imported,
    )
    path = feature_store_path(params, task)
    inputs = {"paths.prepared": prepared.path, **teacher.files}
    store = open_or_create(path, manifest, params.features, parts == 1, inputs)
    shards = assign_shards(manifest.num_shards, part, parts)
    if check:
        click.echo(f"{path}: comparing the written shards' sha256 with their records", err=True)
    stats = extract(
        network, prepared, store, shards, params.features.batch_size, device, check=check
    )
    complete = store.mark_complete_if_all_done()
    state = (
        "the store is complete"
        if complete
        else f"{len(store.done_shards())} of {manifest.num_shards} shards are written so far"
    )
    mended = f", {stats.damaged} of them damaged before" if stats.damaged else ""
    click.echo(
        f"{path}: wrote {stats.shards} shards{mended} ({stats.samples} samples x "
        f"{manifest.views.views} views, {stats.raw_bytes / 1e6:.1f} MB raw) in "
        f"{stats.seconds:.1f} s; {state}"
    )
