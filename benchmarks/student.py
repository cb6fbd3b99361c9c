"""Student training benchmarks: the cost of distilling from the cache, the gain over online
teachers, and memory as the dataset grows.

    python benchmarks/student.py speed [--epochs 3] [--repeats 3]
    python benchmarks/student.py memory

Run after `dvc repro` (speed uses data/prepared.zarr, the teachers and the feature stores).
"""

import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
import yaml

from pipeline.checkpoints import load_teacher
from pipeline.store.features import FeatureStore
from pipeline.store.prepared import open_prepared
from pipeline.student import train_student
from schemas.params import Params

CPU = torch.device("cpu")


def epoch_seconds(
    params: Params, method: str, kd_source: str, epochs: int, resident: str = "off"
) -> float:
    """Median wall time of an epoch (training and the per-epoch test evaluation) after the first:
    what comes before the first epoch (building, decoding resident data) is not counted."""
    prepared = open_prepared(Path(params.paths.prepared))
    config = params.student.model_copy(
        update={"method": method, "kd_source": kd_source, "epochs": epochs}
    )
    loader = params.loader.model_copy(update={"resident": resident})
    stores = teachers = None
    if method == "kd" and kd_source == "cache":
        stores = {
            t: FeatureStore.open(Path(params.paths.features) / f"{t}.zarr") for t in params.tasks
        }
    elif method == "kd":
        teachers = {
            t: load_teacher(Path(params.paths.teachers) / f"{t}.pt")[0] for t in params.tasks
        }
    ends = []
    train_student(
        prepared, params.tasks, params.student_model, config, loader, CPU,
        stores=stores, teachers=teachers, progress=False,
        on_epoch=lambda _row: ends.append(time.perf_counter()),
    )  # fmt: skip
    return statistics.median(b - a for a, b in itertools.pairwise(ends))


@click.group()
def main() -> None:
    """Student training benchmarks."""


@main.command()
@click.option("--epochs", default=3, show_default=True, help="At least 2: the first is not timed.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--workers", default=0, show_default=True, help="loader.num_workers")
def speed(epochs: int, repeats: int, workers: int) -> None:
    """Epoch time of ew, kd from the cache (streamed), kd oracle (the cache decoded in memory
    before the clock starts: the best any reader could do) and kd online, interleaved."""
    params = Params.model_validate(yaml.safe_load(Path("params.yaml").read_text()))
    params = params.model_copy(
        update={"loader": params.loader.model_copy(update={"num_workers": workers})}
    )
    runs = {"ew": [], "kd cache": [], "kd oracle": [], "kd online": []}
    for _ in range(repeats):
        runs["ew"].append(epoch_seconds(params, "ew", "cache", epochs))
        runs["kd cache"].append(epoch_seconds(params, "kd", "cache", epochs))
        runs["kd oracle"].append(epoch_seconds(params, "kd", "cache", epochs, resident="ram"))
        runs["kd online"].append(epoch_seconds(params, "kd", "online", epochs))
    med = {name: statistics.median(times) for name, times in runs.items()}
    click.echo(f"| method | epoch time (median of {repeats}, {epochs} epochs each) | runs |")
    click.echo("|---|---|---|")
    for name, times in runs.items():
        click.echo(f"| {name} | {med[name]:.2f} s | {', '.join(f'{t:.2f}' for t in times)} |")
    click.echo(f"\nkd cache / ew: {med['kd cache'] / med['ew']:.3f}")
    click.echo(
        f"kd cache / kd oracle (the reader's own cost): {med['kd cache'] / med['kd oracle']:.3f}"
    )
    click.echo(
        f"kd online / kd cache (what caching buys): {med['kd online'] / med['kd cache']:.3f}, "
        f"limit kd online / kd oracle {med['kd online'] / med['kd oracle']:.3f}"
    )


def peak_memory_mb(folder: Path, num_train: int) -> float:
    """Peak resident memory of `kdmtl train-student` (one epoch) on `num_train` samples."""
    params = {
        "data": {"num_train": num_train},
        "loader": {"resident": "off"},  # streamed: memory bounded by the buffer, not the data
        "teacher": {"epochs": 1},
        "student": {"epochs": 1},
    }
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    kdmtl = str(Path(sys.executable).parent / "kdmtl")
    run = lambda *args: subprocess.run([kdmtl, *args], cwd=folder, check=True, capture_output=True)  # noqa: E731
    run("prepare")
    for task in Params().tasks:
        run("train-teacher", "--teacher", task)
        run("extract-features", "--teacher", task)
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, kdmtl, "train-student"],
        cwd=folder, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return int(out.stdout.strip()) / 1024


@main.command()
@click.option("--samples", default=800, show_default=True, help="N; also runs 4N.")
def memory(samples: int) -> None:
    """Peak resident memory of student training at N and 4N training samples, streamed."""
    peaks = {}
    for count in (samples, 4 * samples):
        with tempfile.TemporaryDirectory() as folder:
            peaks[count] = peak_memory_mb(Path(folder), count)
        click.echo(f"| {count} | {peaks[count]:.0f} MB |")
    growth = peaks[4 * samples] / peaks[samples] - 1
    click.echo(f"\ngrowth from {samples} to {4 * samples} samples: {100 * growth:+.1f}%")


if __name__ == "__main__":
    main()
