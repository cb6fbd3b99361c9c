"""`kdmtl report`: the methods compared over DVC experiments, per set of teachers: a Markdown
table, a chart of Delta_MTL and the training curves, as PNG files that need no internet."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import click

from pipeline.errors import KdmtlError
from pipeline.files import write_atomically
from pipeline.report import (
    Curve,
    Run,
    curves_chart,
    delta_chart,
    markdown_report,
    runs_from_experiments,
    teacher_sets,
)
from schemas.params import Params
from stages.common import params_option, user_errors


def _dvc(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise KdmtlError(f"`dvc {' '.join(args)}` failed here: {last}")
    return done.stdout


def experiment_records(path: Path | None, all_commits: bool) -> list[dict]:
    """The runs of `dvc exp show --json`, from a saved file or from DVC here."""
    if path is not None:
        text = path.read_text()
    else:
        text = _dvc("exp", "show", "--json", *(["--all-commits"] if all_commits else []))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise KdmtlError(f"not the JSON of `dvc exp show --json`: {error}") from None
    if not records:
        raise KdmtlError(
            "DVC shows no runs here: experiments start from a commit, so commit the pipeline's "
            "outputs after `dvc repro` (`git add -A && git commit`)"
        )
    return records


def workspace_is_current() -> bool:
    """Whether the workspace's outputs are those that dvc.lock records for its params and code
    (`dvc status` finds nothing to run): only then is the workspace a run of its own."""
    return json.loads(_dvc("status", "--json") or "{}") == {}


class RevisionFiles:
    """Files as a run left them: the workspace's from disk, a commit's or an experiment's from
    git (DVC commits every `cache: false` output, the curves among them)."""

    def __init__(self) -> None:
        from scmrepo.exceptions import SCMError
        from scmrepo.git import Git

        try:
            self._git: Git | None = Git(".")
        except SCMError:  # no git repository here: only the workspace has files
            self._git = None
        else:
            self._here = Path.cwd().resolve().relative_to(Path(self._git.root_dir).resolve())

    def read(self, rev: str, path: str) -> str | None:
        from scmrepo.exceptions import SCMError

        if rev == "workspace":
            file = Path(path)
            return file.read_text() if file.is_file() else None
        if self._git is None:
            return None
        try:
            return self._git.get_fs(rev).cat_file((self._here / path).as_posix()).decode()
        except (SCMError, OSError, UnicodeDecodeError):
            return None


def _tsv(text: str) -> Curve:
    """A DVCLive curve: a `step` column, then the value's."""
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    return {int(row[0]): float(row[1]) for row in rows[1:] if len(row) >= 2}


def run_curves(run: Run, files: RevisionFiles, folder: str) -> dict[str, Curve] | None:
    """The student's training loss (the sum of its task losses) and main test metrics per epoch,
    or None when the run's curve files cannot be read."""
    texts = {f"loss_{task}": f"train/loss_{task}" for task in run.headline.tasks}
    texts |= {t.metric: f"test/{t.metric}" for t in run.headline.tasks.values()}
    curves = {}
    for name, stem in texts.items():
        text = files.read(run.rev, f"{folder}/plots/metrics/{stem}.tsv")
        if text is None:
            return None
        try:
            curves[name] = _tsv(text)
        except ValueError:
            return None
    losses = [curves.pop(f"loss_{task}") for task in run.headline.tasks]
    epochs = set.intersection(*(set(loss) for loss in losses))
    curves["loss"] = {e: sum(loss[e] for loss in losses) for e in sorted(epochs)}
    return curves


@click.command("report")
@click.option(
    "--experiments",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A saved `dvc exp show --json` (the workspace left out); by default kdmtl runs it here.",
)
@click.option(
    "--all-commits",
    is_flag=True,
    help="Every commit and its experiments, not only the last commit's (`dvc exp show -A`).",
)
@params_option
@user_errors
def command(experiments: Path | None, all_commits: bool, params: Params) -> None:
    """Compare the methods of the workspace, the last commit and its DVC experiments, per set of
    teachers: methods.md (mean ± std over seeds), delta_mtl.png and curves.png in the report
    folder. Each row says which runs it holds."""
    metrics = params.paths.metrics
    records = experiment_records(experiments, all_commits)
    with_workspace = experiments is None and workspace_is_current()
    runs, notes = runs_from_experiments(
        records, f"{metrics}/eval.json", params.paths.teachers, with_workspace
    )
    if experiments is None and not with_workspace:
        notes.insert(
            0,
            "the workspace is left out: its outputs are not those of its params and code "
            "(`dvc status`); run `dvc repro` to count it",
        )
    sets = teacher_sets(runs)
    files = RevisionFiles()
    curves, without = {}, []
    for run in runs:
        found = run_curves(run, files, f"{metrics}/student")
        if found is None:
            without.append(run.sources[0])
        else:
            curves[run.rev] = found
    if without:
        notes.append(f"no training curves for {', '.join(without)}: their files are not here")
    folder = Path(params.paths.report)
    table = markdown_report(sets)
    written = []
    for name, make in (
        ("methods.md", table.encode),
        ("delta_mtl.png", lambda: delta_chart(sets)),
        ("curves.png", lambda: curves_chart(sets, curves)),
    ):
        content = make()
        write_atomically(folder / name, lambda partial, c=content: partial.write_bytes(c))
        written.append(str(folder / name))
    click.echo(table)
    for note in notes:
        click.echo(f"note: {note}")
    counts = f"{_count(len(runs), 'run')}, {_count(len(sets), 'set')} of teachers"
    click.echo(f"{counts}; wrote {', '.join(written)}")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' * (number != 1)}"
