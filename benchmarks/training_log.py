"""What live logging through DVCLive costs a training run: opening the log (DVCLive looks for the
DVC project; the first opening also imports DVCLive) and one epoch's values (the default kd
student's 12 values, then metrics.json).

    python benchmarks/training_log.py [--epochs 30] [--repeats 5]

Run from the repository root (a DVC project, as under `dvc repro`). Prints the medians.
"""

import statistics
import tempfile
import time
from pathlib import Path

import click

from stages.common import TrainingLog

# The default kd student's row: 3 task losses, 6 distillation distances, 3 test metrics.
NAMES = [
    *(f"loss_{t}" for t in ("semseg", "depth", "normal")),
    *(f"dist_{t}.{f}" for t in ("semseg", "depth", "normal") for f in ("bottleneck", "decoder")),
    "test_mIoU",
    "test_abs_err",
    "test_mean_angle",
]


def one_run(folder: Path, epochs: int) -> tuple[float, float]:
    """Seconds to open the log, and per epoch logged."""
    started = time.perf_counter()
    with TrainingLog(folder) as log:
        opened = time.perf_counter()
        for epoch in range(1, epochs + 1):
            log.epoch({"epoch": epoch} | {name: 1.0 / epoch for name in NAMES})
        logged = time.perf_counter()
    return opened - started, (logged - opened) / epochs


@click.command()
@click.option("--epochs", default=30, show_default=True)
@click.option("--repeats", default=5, show_default=True)
def main(epochs: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory(dir=".") as scratch:
        runs = [one_run(Path(scratch) / f"run{i}", epochs) for i in range(repeats)]
    opening = statistics.median(r[0] for r in runs[1:] or runs)
    per_epoch = statistics.median(r[1] for r in runs)
    click.echo(
        f"first open {runs[0][0] * 1000:.0f} ms, then {opening * 1000:.0f} ms; one epoch's "
        f"{len(NAMES)} values {per_epoch * 1000:.1f} ms (medians of {repeats} runs of {epochs} "
        "epochs)"
    )


if __name__ == "__main__":
    main()
