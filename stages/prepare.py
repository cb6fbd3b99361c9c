"""`kdmtl prepare`: write the chosen dataset to the prepared Zarr store (DVC stage `prepare`)."""

import click

from pipeline.data.sources import make_source
from pipeline.errors import KdmtlError
from pipeline.store.prepared import write_prepared
from schemas.params import Params
from stages.common import params_option, prepared_path, user_errors


@click.command("prepare")
@params_option
@user_errors
def command(params: Params) -> None:
    """Render or import the dataset into data/prepared.zarr (train and test splits)."""
    path = prepared_path(params)
    source = make_source(params.data)
    missing = [task for task in params.tasks if task not in source.tasks]
    if missing:  # a folder's tasks are known once it is read
        raise KdmtlError(
            f"tasks: {params.data.root} has no {missing[0]} targets (it has "
            f"{', '.join(source.tasks)}): add them, or remove {missing[0]} from tasks and from "
            "teacher.trained"
        )
    manifest = write_prepared(source, path, params.data.chunk_size)
    counts = ", ".join(f"{split} {info.num_samples}" for split, info in manifest.splits.items())
    click.echo(
        f"wrote {path}: {manifest.source}, {counts} samples of {manifest.height}x{manifest.width}, "
        f"{manifest.num_classes} classes, tasks {', '.join(manifest.tasks)}; "
        f"fingerprint {manifest.fingerprint[:12]}"
    )
