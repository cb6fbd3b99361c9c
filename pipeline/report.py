"""The comparison report: one table over DVC experiments, rows per method, mean +/- std over seeds.

Input is the JSON that `dvc exp show --json` prints: a list of records (the workspace, each
baseline commit) whose `experiments` hold the runs. Each run carries its params and the metrics
files; a run counts when it has `metrics/eval.json`.
"""

import math
import statistics
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw
from pydantic import ValidationError

from pipeline.errors import KdmtlError
from schemas.checkpoint import EvaluationReport


@dataclass(frozen=True)
class Run:
    name: str
    method: str
    seed: int
    report: EvaluationReport


def method_label(params: dict) -> str:
    """How a run is named in the table: the student's architecture, method and weighting."""
    student = params.get("student", {})
    arch = (student.get("model") or params.get("model") or {}).get("arch", "segnet")
    method = student.get("method", "kd")
    if method == "kd" and student.get("weighting", "ew") != "ew":
        method = f"kd + {student['weighting']}"
    return method if arch == "segnet" else f"{arch}: {method}"


def _records(records: list[dict]) -> Iterator[dict]:
    """Every committed run and finished experiment; the workspace only repeats one of them, and a
    queued or running experiment still shows its baseline's metrics."""
    for record in records:
        if record.get("rev") != "workspace":
            yield record
        for experiment in record.get("experiments") or []:
            state = (experiment.get("executor") or {}).get("state", "success")
            if state == "success":
                yield from experiment.get("revs", [])


def runs_from_experiments(records: list[dict], metrics_file: str) -> list[Run]:
    """One run per method and seed (an experiment repeated with the same params, or applied and
    committed as a baseline, counts once)."""
    runs, seen = [], set()
    for record in _records(records):
        data = record.get("data") or {}
        metrics = (data.get("metrics") or {}).get(metrics_file, {}).get("data")
        params = (data.get("params") or {}).get("params.yaml", {}).get("data")
        if metrics is None or params is None:
            continue
        key = (method_label(params), params.get("student", {}).get("seed", 0))
        if key in seen:
            continue
        seen.add(key)
        name = record.get("name") or record["rev"][:7]
        try:
            report = EvaluationReport.model_validate(metrics)
        except ValidationError as error:
            raise KdmtlError(f"{name}: {error}") from None
        runs.append(Run(name, *key, report))
    if not runs:
        raise KdmtlError(
            f"no experiment has {metrics_file}: run `dvc repro` or `dvc exp run` first"
        )
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class MethodRow:
    method: str
    seeds: list[int]
    metrics: dict[tuple[str, str], tuple[float, float]]  # (task, metric) -> mean, std
    delta: tuple[float, float]


def summarize(runs: list[Run]) -> tuple[list[tuple[str, str]], dict[str, float], list[MethodRow]]:
    """The columns, the teachers' metrics, and one row per method (mean, std over its runs)."""
    first = runs[0].report
    columns = [(task, metric) for task, metrics in first.student.items() for metric in metrics]
    teachers = {f"{t}/{m}": first.teachers[t][m] for t, m in columns}
    grouped: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        grouped[run.method].append(run)
    rows = [
        MethodRow(
            method,
            sorted(run.seed for run in group),
            {(t, m): _mean_std([run.report.student[t][m] for run in group]) for t, m in columns},
            _mean_std([run.report.delta_mtl for run in group]),
        )
        for method, group in grouped.items()
    ]
    return columns, teachers, sorted(rows, key=lambda row: -row.delta[0])


def _cell(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.4f}" if seeds == 1 else f"{mean:.4f} ± {std:.4f}"


def markdown_table(runs: list[Run]) -> str:
    columns, teachers, rows = summarize(runs)
    header = ["method", "seeds", *[f"{t} {m}" for t, m in columns], "Δ_MTL (%)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    teacher_cells = [f"{teachers[f'{t}/{m}']:.4f}" for t, m in columns]
    lines.append("| single-task teachers | | " + " | ".join(teacher_cells) + " | 0 |")
    for row in rows:
        cells = [_cell(*row.metrics[c], len(row.seeds)) for c in columns]
        mean, std = row.delta
        delta = f"{mean:+.2f}" if len(row.seeds) == 1 else f"{mean:+.2f} ± {std:.2f}"
        seeds = ", ".join(map(str, row.seeds))
        lines.append(f"| {row.method} | {seeds} | " + " | ".join(cells) + f" | {delta} |")
    return "\n".join(lines) + "\n"


def delta_chart(runs: list[Run]) -> Image.Image:
    """Horizontal bars of Delta_MTL per method with +/- one standard deviation."""
    _, _, rows = summarize(runs)
    label_width, bar_width, row_height, margin = 150, 360, 22, 24
    low = min(0.0, *(r.delta[0] - r.delta[1] for r in rows))
    high = max(0.0, *(r.delta[0] + r.delta[1] for r in rows))
    span = (high - low) or 1.0
    size = (label_width + bar_width + 70, margin * 2 + row_height * len(rows))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def x(value: float) -> float:
        return label_width + (value - low) / span * bar_width

    draw.text((4, 4), "Delta_MTL (%) against the single-task teachers", fill="black")
    for i, row in enumerate(rows):
        top = margin + i * row_height
        mean, std = row.delta
        colour = (0, 114, 178) if mean >= 0 else (213, 94, 0)
        left, right = sorted((x(0), x(mean)))
        draw.rectangle([left, top + 4, right, top + row_height - 4], fill=colour)
        if std > 0 and math.isfinite(std):
            middle = top + row_height / 2
            draw.line([x(mean - std), middle, x(mean + std), middle], fill="black", width=1)
        draw.text((4, top + 5), row.method, fill="black")
        draw.text((label_width + bar_width + 6, top + 5), f"{mean:+.2f}", fill="black")
    draw.line([x(0), margin - 4, x(0), image.size[1] - margin + 4], fill="black")
    return image
