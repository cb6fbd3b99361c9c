"""The comparison report over DVC experiments: per set of teachers, one table with a row per method
(mean +/- std over seeds), a chart of Delta_MTL and the training curves.

Input is the JSON that `dvc exp show --json` prints: a list of records (the workspace, each
baseline commit) whose `experiments` hold the runs. Each run carries its params, its metrics files
and the hashes of its outputs; a run counts when it has the evaluation's headline metrics.

Rows never mix runs of different teachers (the teacher checkpoints' hashes that DVC recorded, and
the teachers' test metrics, must agree) or of different params: runs differing in a param other
than the student's seed go to separate rows, labelled with the param. A param that a run's method
does not use (an adaptor's rate under a weighting method, say) changes nothing, so it neither splits
rows nor labels them.
"""

import io
import json
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydantic import ValidationError

from pipeline.distill import DISTILLERS
from pipeline.errors import KdmtlError
from schemas.checkpoint import EvaluationHeadline

# Params a row's label shows anyway (method_label), or that runs of one row differ in.
LABEL_PARAMS = {"student.method", "student.weighting", "student.model.arch", "model.arch"}
SEED_PARAM = "student.seed"
OUTPUT_PARAMS = "student.kd_outputs."
# Flat params (or their prefixes) that only a distilling method (`DISTILLERS`) uses.
DISTILLATION_PARAMS = (
    "student.weighting",
    "student.kd_source",
    "student.kd_weights.",
    OUTPUT_PARAMS,
    "student.adaptor_",
)
GRADNORM_PARAMS = "student.gradnorm_alpha"
ADAPTOR_LR = "student.adaptor_lr"
UNUSED = "(unused)"  # a row's value of a param its method does not use


@dataclass(frozen=True)
class Run:
    sources: tuple[str, ...]  # where DVC shows it: "workspace", a commit, an experiment
    rev: str  # the commit holding its files, or "workspace"
    params: dict  # as in params.yaml
    teachers: tuple[tuple[str, ...], ...]  # per task (task, checkpoint hash) or (task, "", metric)
    headline: EvaluationHeadline

    @property
    def compared_params(self) -> dict[str, object]:
        return compared_params(self.params)

    @property
    def seed(self) -> int:
        return int(self.compared_params.get(SEED_PARAM, 0))


def distils_outputs(params: dict) -> bool:
    """Whether a run distilled its teachers' predictions (`student.kd_outputs`)."""
    student = params.get("student", {})
    weights = (student.get("kd_outputs") or {}).get("weights") or {}
    return student.get("method", "kd") in DISTILLERS and any(w > 0 for w in weights.values())


def compared_params(params: dict) -> dict[str, object]:
    """The params, flat, that the run's method uses (`unused_params`) and that are not null (a
    params file may leave a key out); an adaptor rate equal to the method's own is left out too,
    as params leave it now (older runs list kd's 0.1). A null `student.model` is the teachers'
    `model`, so that a wider student's row and the others name their widths."""
    student = params.get("student", {})
    method = student.get("method", "kd")
    own_rate = DISTILLERS[method].adaptor_lr if method in DISTILLERS else None
    unused = unused_params(params)
    flat = flatten_params(params)
    if not student.get("model"):
        flat |= flatten_params(params.get("model") or {}, "student.model.")
    return {
        key: value
        for key, value in flat.items()
        if value is not None
        and not key.startswith(unused)
        and not (key == ADAPTOR_LR and value == own_rate)
    }


def unused_params(params: dict) -> tuple[str, ...]:
    """The flat params (or their prefixes) that a run's method leaves unused: distillation's under
    a weighting method, output distillation's where it is off, GradNorm's without GradNorm."""
    student = params.get("student", {})
    method = student.get("method", "kd")
    unused: tuple[str, ...] = ()
    if method not in DISTILLERS:
        unused += DISTILLATION_PARAMS
    elif not distils_outputs(params):
        unused += (OUTPUT_PARAMS,)
    weighting = student.get("weighting", "ew") if method in DISTILLERS else method
    if weighting != "gradnorm":
        unused += (GRADNORM_PARAMS,)
    return unused


def method_label(params: dict) -> str:
    """How a run is named in the table: the student's architecture, method and weighting, and
    whether it distilled the teachers' predictions."""
    student = params.get("student", {})
    arch = (student.get("model") or params.get("model") or {}).get("arch", "segnet")
    method = student.get("method", "kd")
    if method in DISTILLERS and student.get("weighting", "ew") != "ew":
        method = f"{method} + {student['weighting']}"
    if distils_outputs(params):
        method += " + outputs"
    return method if arch == "segnet" else f"{arch}: {method}"


def flatten_params(params: dict, prefix: str = "") -> dict[str, object]:
    """`{"student": {"lr": 0.1}}` -> `{"student.lr": 0.1}`, as `dvc exp show` names params."""
    flat: dict[str, object] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            flat |= flatten_params(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _records(records: list[dict], with_workspace: bool) -> Iterator[tuple[str, dict]]:
    """(source, record) for the workspace (when `with_workspace`), each commit and each finished
    experiment; a queued or running experiment still shows its baseline's metrics, so it is left
    out. Commits come before the workspace, so that a run shown by both is read from git."""
    for record in records:
        rev = record.get("rev", "")
        if rev != "workspace":
            yield f"{record.get('name') or rev[:7]} ({rev[:7]})", record
        for experiment in record.get("experiments") or []:
            state = (experiment.get("executor") or {}).get("state", "success")
            if state == "success":
                for run in experiment.get("revs", []):
                    yield run.get("name") or run["rev"][:7], run
    if with_workspace:
        yield from (("workspace", r) for r in records if r.get("rev") == "workspace")


def _teachers(headline: EvaluationHeadline, outs: dict, folder: str) -> tuple[tuple[str, ...], ...]:
    """Who the teachers were: the checkpoints' hashes that DVC recorded, or, for a run whose
    outputs DVC did not record, the teachers' test metrics."""
    hashes = {t: (outs.get(f"{folder}/{t}.pt") or {}).get("hash") or "" for t in headline.tasks}
    if all(hashes.values()):
        return tuple((task, digest) for task, digest in hashes.items())
    return tuple((task, "", repr(t.teacher)) for task, t in headline.tasks.items())


def _problems(error: ValidationError) -> str:
    problems = []
    for e in error.errors():
        message = e["msg"].removeprefix("Value error, ")
        problems.append(f"{'.'.join(map(str, e['loc']))}: {message}" if e["loc"] else message)
    return "; ".join(problems)


def runs_from_experiments(
    records: list[dict], metrics_file: str, teachers: str, with_workspace: bool = True
) -> tuple[list[Run], list[str]]:
    """The evaluated runs, and notes for the reader. A run is its params (`compared_params`) and
    its teachers: one that DVC shows in several places (the workspace and the commit it was
    committed as, say) counts once, with every place in its sources; two with the same params and
    teachers but other metrics (a rerun on another machine) count once too, the first kept, and a
    note says so."""
    runs: dict[str, Run] = {}
    notes = []
    for source, record in _records(records, with_workspace):
        data = record.get("data") or {}
        metrics = (data.get("metrics") or {}).get(metrics_file, {}).get("data")
        params = (data.get("params") or {}).get("params.yaml", {}).get("data")
        if metrics is None or params is None:
            continue
        try:
            headline = EvaluationHeadline.model_validate(metrics)
        except ValidationError as error:  # damaged, or written by an older kdmtl
            notes.append(
                f"{source} is left out: its {metrics_file} is not kdmtl's evaluation "
                f"({_problems(error)}); run `kdmtl evaluate` (or `dvc repro`) there again"
            )
            continue
        run_teachers = _teachers(headline, data.get("outs") or {}, teachers)
        key = json.dumps([compared_params(params), run_teachers], sort_keys=True, default=str)
        old = runs.get(key)
        if old is None:
            runs[key] = Run((source,), record.get("rev", ""), params, run_teachers, headline)
            continue
        runs[key] = Run((*old.sources, source), old.rev, old.params, old.teachers, old.headline)
        if headline != old.headline:
            notes.append(
                f"{source} has the params and teachers of {old.sources[0]} but other metrics "
                f"(Delta_MTL {_value(headline.delta_mtl):+.2f} against "
                f"{_value(old.headline.delta_mtl):+.2f}): "
                f"counted once, with {old.sources[0]}'s metrics"
            )
    if not runs:
        raise KdmtlError(
            f"no experiment has {metrics_file}: run `dvc repro` or `dvc exp run` first"
        )
    return list(runs.values()), notes


def _value(value: float | None) -> float:
    """A headline's number; NaN where there is none (a teacher that gives no prediction)."""
    return math.nan if value is None else value


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; a NaN or an infinity carries through, not an error."""
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class MethodRow:
    label: str
    runs: list[Run]
    metrics: dict[str, tuple[float, float]]  # task -> the main metric's mean, std
    deltas: dict[str, tuple[float, float]]  # task -> its delta's mean, std
    delta: tuple[float, float]

    @property
    def seeds(self) -> list[int]:
        return sorted(run.seed for run in self.runs)


@dataclass
class TeacherSet:
    """Runs distilled from, or compared with, the same teacher checkpoints."""

    name: str  # A, B, ...
    teachers: tuple[tuple[str, ...], ...]
    headline: EvaluationHeadline  # of one of its runs: the teachers' metrics
    rows: list[MethodRow] = field(default_factory=list)

    def describe(self) -> str:
        if all(len(teacher) == 2 for teacher in self.teachers):
            checkpoints = ", ".join(f"{task} {digest[:7]}" for task, digest in self.teachers)
            return f"Teachers {self.name} (checkpoints {checkpoints})"
        return f"Teachers {self.name} (checkpoints not recorded by DVC: told apart by metrics)"


def teacher_sets(runs: list[Run]) -> list[TeacherSet]:
    """Runs grouped by their teachers, then into rows by method and every other param that
    differs between them (the student's seed aside); rows sorted by Delta_MTL, best first."""
    grouped: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        grouped[run.teachers].append(run)
    sets = []
    for index, (teachers, members) in enumerate(grouped.items()):
        compared = [run.compared_params for run in members]
        keys = {k for params in compared for k in params} - LABEL_PARAMS - {SEED_PARAM}
        used = []  # per run, the params its method uses, null where its params leave them out
        for run, params in zip(members, compared, strict=True):
            unused = unused_params(run.params)
            used.append({key: params.get(key) for key in keys if not key.startswith(unused)})
        varying = sorted(
            key
            for key in keys
            if len({json.dumps(p[key], default=str) for p in used if key in p}) > 1
        )
        rows: dict[str, list[Run]] = defaultdict(list)
        for run, params in zip(members, used, strict=True):
            values = [params.get(key, UNUSED) for key in varying]
            rows[json.dumps([method_label(run.params), values], default=str)].append(run)
        teacher_set = TeacherSet(_set_name(index), teachers, members[0].headline)
        for key, row_runs in rows.items():
            label, values = json.loads(key)
            shown = [f"{k}={v}" for k, v in zip(varying, values, strict=True) if v != UNUSED]
            if shown:
                label += f" ({', '.join(shown)})"
            tasks = [run.headline.tasks for run in row_runs]
            teacher_set.rows.append(
                MethodRow(
                    label,
                    row_runs,
                    {task: _mean_std([t[task].student for t in tasks]) for task in tasks[0]},
                    {task: _mean_std([_value(t[task].delta) for t in tasks]) for task in tasks[0]},
                    _mean_std([_value(run.headline.delta_mtl) for run in row_runs]),
                )
            )
        teacher_set.rows.sort(key=lambda row: (math.isnan(row.delta[0]), -row.delta[0]))
        sets.append(teacher_set)
    return sets


def _set_name(index: int) -> str:
    return chr(ord("A") + index) if index < 26 else f"#{index + 1}"


def _cell(mean: float, std: float, runs: int, digits: int = 4, sign: str = "") -> str:
    value = f"{mean:{sign}.{digits}f}"
    return value if runs == 1 else f"{value} ± {std:.{digits}f}"


def markdown_report(sets: list[TeacherSet]) -> str:
    """One table per teacher set: its teachers' row, then a row per method."""
    parts = []
    for teacher_set in sets:
        teachers = teacher_set.headline.tasks
        header = ["method", "seeds"]
        for task, headline in teachers.items():
            header += [f"{task} {headline.metric}", f"{task} Δ (%)"]
        header += ["Δ_MTL (%)", "runs"]
        lines = [
            f"## {teacher_set.describe()}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        cells = ["single-task teachers", ""]
        cells += [c for t in teachers.values() for c in (f"{_value(t.teacher):.4f}", "")]
        lines.append("| " + " | ".join([*cells, "0", ""]) + " |")
        for row in teacher_set.rows:
            n = len(row.runs)
            cells = [row.label, ", ".join(map(str, row.seeds))]
            for task in teachers:
                cells += [_cell(*row.metrics[task], n), _cell(*row.deltas[task], n, 2, "+")]
            cells.append(_cell(*row.delta, n, 2, "+"))
            cells.append("; ".join(_places(run) for run in row.runs))
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    note = (
        "Δ: against the single-task teachers, in %, positive when the student is better; a task's "
        "Δ is the mean over all of its metrics (metrics/details/eval.json), Δ_MTL the mean over "
        "the tasks. Mean ± standard deviation over the seeds of a row."
    )
    return "\n\n".join([*parts, note]) + "\n"


def _places(run: Run, shown: int = 3) -> str:
    """Where DVC shows a run: its first places, then how many more (with `--all-commits`, every
    commit since it was made lists it)."""
    if len(run.sources) <= shown:
        return ", ".join(run.sources)
    return f"{', '.join(run.sources[: shown - 1])} and {len(run.sources) - shown + 1} more"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # only the report draws

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _row_names(sets: list[TeacherSet]) -> list[tuple[str, MethodRow]]:
    several = len(sets) > 1
    return [(f"{s.name}: {r.label}" if several else r.label, r) for s in sets for r in s.rows]


def delta_chart(sets: list[TeacherSet]) -> bytes:
    """A PNG: horizontal bars of Delta_MTL per row with +/- one standard deviation."""
    rows = _row_names(sets)
    figure = _figure(7, 1 + 0.35 * len(rows))
    axes = figure.add_subplot()
    means = [row.delta[0] for _, row in rows]
    errors = [row.delta[1] if math.isfinite(row.delta[1]) else 0.0 for _, row in rows]
    colours = ["#0072b2" if mean >= 0 else "#d55e00" for mean in means]
    axes.barh(range(len(rows)), means, xerr=errors, color=colours, capsize=3)
    axes.set_yticks(range(len(rows)), [name for name, _ in rows])
    axes.invert_yaxis()
    axes.axvline(0, color="black", linewidth=0.8)
    for y, mean in enumerate(means):
        outside = 4 if mean >= 0 else -4  # beyond the bar's end
        axes.annotate(
            f"{mean:+.2f}",
            (mean, y),
            xytext=(outside, 0),
            textcoords="offset points",
            ha="left" if mean >= 0 else "right",
            va="center",
        )
    axes.margins(x=0.15)
    axes.set_xlabel("Δ_MTL (%) against the single-task teachers")
    return _png(figure)


Curve = dict[int, float]  # epoch -> value


def curves_chart(sets: list[TeacherSet], curves: dict[str, dict[str, Curve]]) -> bytes:
    """A PNG: per row, the mean over its runs of the training loss (the sum of the task losses)
    and of each task's main test metric, per epoch. `curves[run.rev]` maps `loss` and each main
    metric's name to its curve; runs without curves are left out of the mean."""
    rows = _row_names(sets)
    metrics = list(dict.fromkeys(t.metric for s in sets for t in s.headline.tasks.values()))
    panels = ["loss", *metrics]
    figure = _figure(4 * len(panels), 3.4)
    for index, name in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for label, row in rows:
            series = [curves[run.rev][name] for run in row.runs if name in curves.get(run.rev, {})]
            epochs = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if epochs:
                mean = [math.fsum(s[e] for s in series) / len(series) for e in epochs]
                axes.plot(epochs, mean, marker="o", markersize=3, label=label)
        axes.set_title("training loss (sum of task losses)" if name == "loss" else f"test {name}")
        axes.set_xlabel("epoch")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
    if figure.axes[0].lines:
        figure.axes[0].legend(fontsize="small")
    return _png(figure)
