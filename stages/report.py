"""`kdmtl report`: one table comparing methods over DVC experiments, and a chart of Delta_MTL."""

import json
import subprocess
import sys
from pathlib import Path

import click

from pipeline.errors import KdmtlError
from pipeline.files import write_atomically
from pipeline.report import delta_chart, markdown_table, runs_from_experiments
from schemas.params import Params
from stages.common import params_option, user_errors


def experiment_records(path: Path | None) -> list[dict]:
    """The runs of `dvc exp show --json`, from a saved file or from DVC here."""
    if path is not None:
        text = path.read_text()
    else:
        shown = subprocess.run(
            [sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True
        )
        if shown.returncode != 0:
            last = (shown.stderr.strip().splitlines() or ["no message"])[-1]
            raise KdmtlError(f"`dvc exp show --json` failed here: {last}")
        text = shown.stdout
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise KdmtlError(f"not the JSON of `dvc exp show --json`: {error}") from None


@click.command("report")
@click.option(
    "--experiments",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A saved `dvc exp show --json`; by default kdmtl runs it in the current folder.",
)
@params_option
@user_errors
def command(experiments: Path | None, params: Params) -> None:
    """Compare the methods of all DVC experiments: a Markdown table (mean ± std over seeds) and a
    bar chart of Delta_MTL, in the report folder."""
    runs = runs_from_experiments(
        experiment_records(experiments), f"{params.paths.metrics}/eval.json"
    )
    folder = Path(params.paths.report)
    table = markdown_table(runs)
    write_atomically(folder / "methods.md", lambda partial: partial.write_text(table))
    chart = delta_chart(runs)
    write_atomically(folder / "delta_mtl.png", lambda partial: chart.save(partial, format="PNG"))
    click.echo(table)
    click.echo(f"{len(runs)} runs; wrote {folder / 'methods.md'} and {folder / 'delta_mtl.png'}")
