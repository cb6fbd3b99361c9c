"""Compare student training methods over seeds on the current pipeline's data and teachers.

    python benchmarks/methods.py --methods kd,ew --seeds 0,1,2

Run after `dvc repro`. Each (method, seed) trains a student with `kdmtl train-student` and
evaluates it with `kdmtl evaluate`, writing under a temporary folder; the teachers, the prepared
data and the feature stores are shared. Prints each task's metrics and Delta_MTL as mean +/- std.
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import yaml

KDMTL = str(Path(sys.executable).parent / "kdmtl")


def run_one(folder: Path, method: str, seed: int) -> dict:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["student"]["seed"] = seed
    params["student"]["method"] = method
    out = folder / f"{method}-{seed}"
    params["paths"] |= {
        "student": str(out / "student.pt"),
        "metrics": str(out / "metrics"),
        "plots": str(out / "plots"),
    }
    path = folder / f"{method}-{seed}.yaml"
    path.write_text(yaml.safe_dump(params))
    for command in ("train-student", "evaluate"):
        subprocess.run([KDMTL, command, "--params", str(path)], check=True, capture_output=True)
    return json.loads((out / "metrics" / "eval.json").read_text())


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +/- {spread:.4f}"


@click.command()
@click.option("--methods", default="kd,ew", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
def main(methods: str, seeds: str) -> None:
    reports: dict[str, list[dict]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for method in methods.split(","):
            reports[method] = []
            for seed in (int(s) for s in seeds.split(",")):
                reports[method].append(run_one(Path(folder), method, seed))
                click.echo(
                    f"{method} seed {seed}: Delta_MTL {reports[method][-1]['delta_mtl']:+.2f}%"
                )
    first = next(iter(reports.values()))[0]
    columns = [(task, metric) for task, metrics in first["student"].items() for metric in metrics]
    header = " | ".join(f"{task} {metric}" for task, metric in columns)
    click.echo(f"\n| method | {header} | Delta_MTL (%) |")
    click.echo("|---" * (len(columns) + 2) + "|")
    teacher = " | ".join(f"{first['teachers'][t][m]:.4f}" for t, m in columns)
    click.echo(f"| single-task teachers | {teacher} | 0 |")
    for method, runs in reports.items():
        cells = " | ".join(mean_std([r["student"][t][m] for r in runs]) for t, m in columns)
        delta = [r["delta_mtl"] for r in runs]
        spread = statistics.stdev(delta) if len(delta) > 1 else 0.0
        click.echo(f"| {method} | {cells} | {statistics.mean(delta):+.2f} +/- {spread:.2f} |")
    click.echo(
        f"\n{sum(len(r) for r in reports.values())} runs in {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
