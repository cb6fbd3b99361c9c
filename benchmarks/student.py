"""Student training benchmarks: the cost of distilling from the cache, the gain over online
teachers, and memory as the dataset grows.

    python benchmarks/student.py speed [--epochs 3] [--repeats 3] [--paper --samples 8]
                                       [--device cuda]
    python benchmarks/student.py memory

`speed` on the default setting runs after `dvc repro` (it uses data/prepared.zarr, the teachers and
the feature stores); with `--paper` it builds the paper-width setting of `setups.py` first.
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
from setups import Setting, default_setting, paper_setting

from pipeline.student import train_student
from pipeline.training import resolve_device
from schemas.params import Params


def epoch_seconds(
    setting: Setting, method: str, kd_source: str, epochs: int, resident: str, device: torch.device
) -> float:
    """Median wall time of an epoch (training and the per-epoch test evaluation) after the first:
    what comes before the first epoch (building, decoding resident data) is not counted."""
    params = setting.params
    config = params.student.model_copy(
        update={"method": method, "kd_source": kd_source, "epochs": epochs}
    )
    loader = params.loader.model_copy(update={"resident": resident})
    cached = method == "kd" and kd_source == "cache"
    online = method == "kd" and kd_source == "online"
    ends = []
    train_student(
        setting.prepared, params.tasks, params.student_model, config, loader, device,
        stores=setting.stores if cached else None, teachers=setting.teachers if online else None,
        progress=False, on_epoch=lambda _row: ends.append(time.perf_counter()),
    )  # fmt: skip
    return statistics.median(b - a for a, b in itertools.pairwise(ends))


@click.group()
def main() -> None:
    """Student training benchmarks."""


@main.command()
@click.option("--epochs", default=3, show_default=True, help="At least 2: the first is not timed.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--workers", default=0, show_default=True, help="loader.num_workers")
@click.option("--paper", is_flag=True, help="The paper-width setting instead of the default one.")
@click.option("--samples", default=32, show_default=True, help="Training samples with --paper.")
@click.option("--device", "device_name", default="cpu", show_default=True, help="cpu, cuda, auto")
@click.option("--skip-ew", is_flag=True, help="Leave out the ew row.")
def speed(
    epochs: int,
    repeats: int,
    workers: int,
    paper: bool,
    samples: int,
    device_name: str,
    skip_ew: bool,
) -> None:
    """Epoch time of ew, kd from the cache (streamed), kd oracle (the cache decoded into memory
    before the clock starts, on the GPU with a GPU: the best any reader could do) and kd online,
    interleaved."""
    device = resolve_device(device_name)
    oracle = "device" if device.type == "cuda" else "ram"
    modes = {"ew": ("ew", "cache", "off"), "kd cache": ("kd", "cache", "off")}
    if device.type == "cuda":  # resident in host memory, batches copied to the GPU
        modes["kd resident ram"] = ("kd", "cache", "ram")
    modes[f"kd oracle (resident {oracle})"] = ("kd", "cache", oracle)
    modes["kd online"] = ("kd", "online", "off")
    if skip_ew:
        del modes["ew"]
    with tempfile.TemporaryDirectory() as folder:
        setting = paper_setting(Path(folder), samples, device) if paper else default_setting()
        loader = setting.params.loader.model_copy(update={"num_workers": workers})
        setting.params = setting.params.model_copy(update={"loader": loader})
        runs = {name: [] for name in modes}
        for _ in range(repeats):
            for name, (method, source, resident) in modes.items():
                runs[name].append(epoch_seconds(setting, method, source, epochs, resident, device))
    med = {name: statistics.median(times) for name, times in runs.items()}
    data = setting.params.data
    click.echo(
        f"{data.num_train} training samples of {data.height}x{data.width}, student and teachers "
        f"{setting.params.model.filters}, batch {setting.params.student.batch_size}, on {device}\n"
    )
    click.echo(f"| method | epoch time (median of {repeats}, {epochs} epochs each) | runs |")
    click.echo("|---|---|---|")
    for name, times in runs.items():
        click.echo(f"| {name} | {med[name]:.2f} s | {', '.join(f'{t:.2f}' for t in times)} |")
    cache, best, online = (
        med["kd cache"],
        med[next(m for m in med if "oracle" in m)],
        med["kd online"],
    )
    if "ew" in med:
        click.echo(f"\nkd cache / ew: {cache / med['ew']:.3f}")
    click.echo(f"kd cache / kd oracle (the reader's own cost): {cache / best:.3f}")
    click.echo(
        f"kd online / kd cache (what caching buys): {online / cache:.3f}, "
        f"limit kd online / kd oracle {online / best:.3f}"
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
