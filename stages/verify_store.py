"""`kdmtl verify STORE`: is a feature store (or the prepared data) current, intact and right?"""

import click
from upath import UPath

from pipeline.errors import KdmtlError
from pipeline.store.checks import Verification, read_every_chunk, recompute
from pipeline.store.features import FeatureStore
from pipeline.store.manifest import read_manifest, store_kind
from pipeline.store.prepared import PreparedStore, open_prepared
from pipeline.training import resolve_device
from schemas.params import Params
from schemas.prepared import PreparedManifest
from stages.common import (
    current_fingerprint,
    current_teacher,
    dask_scheduler,
    params_option,
    prepared_path,
    scheduler_option,
    store_argument,
    trained_checkpoint,
    user_errors,
)


def verify_prepared(path: UPath, report: Verification) -> None:
    manifest = read_manifest(path, PreparedManifest, "prepared dataset", "run `kdmtl prepare`")
    problems = PreparedStore(path, manifest).problems(full=True)
    report.problems += problems
    report.remedy = "run `kdmtl prepare` again"
    if not problems:
        files = sum(len(a.chunk_files) for s in manifest.splits.values() for a in s.arrays.values())
        report.checked.append(f"every array matches the manifest; {files} chunk files as written")


def teacher_files(params: Params, task: str) -> str:
    """What a teacher's fingerprint covers, for the report."""
    spec = params.teacher.imported.get(task)
    if spec is None:
        return f"{trained_checkpoint(params, task)} (sha256)"
    return f"teacher.imported.{task} (sha256 of {spec.file} and {spec.weights}; kwargs, taps)"


def verify_features(path: UPath, checks: int, params: Params, report: Verification) -> None:
    features = FeatureStore.open(path)
    manifest = features.manifest
    prepared = open_prepared(prepared_path(params))
    fingerprint = current_fingerprint(params, manifest.task)
    if fingerprint is None:
        current_teacher(params, manifest.task, prepared)  # raises: names the missing file
    stale = features.stale_against(fingerprint, prepared.manifest.fingerprint)
    report.problems += [f"stale: {problem}" for problem in stale]
    if not stale:
        report.checked.append(
            f"manifest matches {teacher_files(params, manifest.task)} and {prepared.path} "
            "(fingerprint)"
        )
    done = len(features.done_shards())
    if manifest.complete:
        report.checked.append(f"complete: {done} of {manifest.num_shards} shards written")
    else:
        report.problems.append(f"incomplete: {done} of {manifest.num_shards} shards written")
    # A stale or unfinished store, or shard files missing or of another size: extraction
    # remakes or resumes it.
    report.remedy = features.remedy
    damage = features.problems(full=True)
    report.problems += damage
    if damage:
        if set(damage) - set(features.problems()):  # found by the sha256 alone: in place
            report.remedy = features.damaged_shard_remedy
        return  # reading on would decode what is known to be damaged
    report.checked.append(f"every array matches the manifest; {done} shards' files as written")
    found = len(report.problems)
    damaged = read_every_chunk(features, report)
    if not stale:
        teacher = current_teacher(params, manifest.task, prepared)
        device = resolve_device(params.device)
        recompute(features, teacher.network, prepared, checks, device, report, skip=damaged)
    if len(report.problems) > found:  # wrong when written: no resume would write it again
        report.remedy = f"delete {path}, then {features.remedy}"


@click.command("verify")
@store_argument
@click.option(
    "--checks", default=4, show_default=True, help="Sample views to recompute with the teacher."
)
@scheduler_option
@params_option
@user_errors
def command(store: UPath, checks: int, scheduler: str | None, params: Params) -> None:
    """Check a feature store against the current teacher (trained or imported) and prepared
    data, check every shard file against what was written (sha256), read every chunk
    (checksums), and recompute a few features with the teacher. Given the prepared data, check
    every chunk file against what was written. STORE is a path or a URL (s3://...). Exits 1 on
    any problem."""
    report = Verification()
    kind = store_kind(store)
    if kind == "kdmtl.prepared":
        with dask_scheduler(scheduler):
            verify_prepared(store, report)
        click.echo(f"{store}: prepared data")
    elif kind == "kdmtl.features":
        with dask_scheduler(scheduler):
            verify_features(store, checks, params, report)
        manifest = FeatureStore.open(store).manifest
        click.echo(f"{store}: teacher {manifest.task}, {manifest.num_samples} samples")
    elif not store.exists():
        raise KdmtlError(f"no store at {store}: give a feature store or the prepared data")
    else:
        raise KdmtlError(
            f"{store} is not a kdmtl store, or its zarr.json is missing or damaged: give a "
            "feature store or the prepared data; a damaged store must be deleted and made again "
            "(`kdmtl prepare`, `kdmtl extract-features`)"
        )
    for line in report.checked:
        click.echo(f"  ok: {line}")
    for line in report.problems:
        click.echo(f"  PROBLEM: {line}", err=True)
    if report.problems:
        click.echo(f"  to mend it: {report.remedy}", err=True)
        raise click.exceptions.Exit(1)
    click.echo("verified")
