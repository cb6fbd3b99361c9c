"""The `kdmtl` click group."""

import click

from stages import (
    evaluate,
    export,
    extract_features,
    inspect_store,
    predict,
    prepare,
    report,
    train_student,
    train_teacher,
    verify_store,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdmtl")
def main() -> None:
    """kdmtl: knowledge distillation of single-task teachers into one multi-task network,
    with teacher features cached in Zarr (Li and Bilen, 2020).

    Every command but inspect, predict and export reads ./params.yaml (or --params FILE) and
    writes where its params say.
    """


for module in (
    prepare,
    train_teacher,
    extract_features,
    train_student,
    evaluate,
    predict,
    export,
    report,
    inspect_store,
    verify_store,
):
    main.add_command(module.command)
