"""Data-parallel training on the CPU: `torchrun --nproc-per-node 2` (gloo) against one process.

    python benchmarks/data_parallel.py [--epochs 4] [--repeats 3] [--method kd]

Builds the default setting (48x64 scenes, the default teachers, 1 epoch each, and their feature
stores) in a temporary folder, then trains the student with one process and with two, interleaved,
and prints the median samples per second of an epoch after the first (training and its test
evaluation), from the epoch times that `kdmtl train-student` logs. Two processes train a few
samples fewer per epoch (every process runs the same number of full steps); the rate counts the
samples they train.
"""

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import yaml

from pipeline.distributed import Replicas
from pipeline.store.stream import ChunkStream
from schemas.params import Params

BIN = Path(sys.executable).parent
NUM_TRAIN = 800  # the built-in scenes' training split
EPOCH_LINE = re.compile(r"student \w+ epoch (\d+)/\d+: .* \(([\d.]+) s\)")


class Sizes:
    """A ChunkSource of the prepared split's size, to count the samples each epoch trains."""

    def __init__(self, size: int, chunk_size: int) -> None:
        self.size, self.chunk_size = size, chunk_size

    def __len__(self) -> int:
        return self.size

    def read_chunk(self, chunk: int, epoch: int = 0) -> dict:
        return {"index": np.zeros(0)}


def trained_samples(params: Params, processes: int, epoch: int) -> int:
    """Samples that `processes` processes train in `epoch` (0-based) together."""
    if processes == 1:
        return NUM_TRAIN
    batch = params.student.batch_size
    source = Sizes(NUM_TRAIN, params.data.chunk_size)
    replicas = Replicas(processes, 0)
    stream = ChunkStream(source, batch, True, params.student.seed, replicas=replicas)
    return stream.steps(epoch) * batch


def epoch_seconds(output: str) -> list[float]:
    return [float(seconds) for _, seconds in EPOCH_LINE.findall(output)]


def train(folder: Path, processes: int) -> list[float]:
    command = [str(BIN / "kdmtl"), "train-student"]
    if processes > 1:
        command = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={processes}",
                   "--no-python", *command]  # fmt: skip
    environment = os.environ | {"OMP_NUM_THREADS": str(os.cpu_count() // processes)}
    run = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=environment)
    if run.returncode:
        raise click.ClickException(run.stderr[-2000:])
    return epoch_seconds(run.stdout + run.stderr)


@click.command()
@click.option("--epochs", default=4, show_default=True, help="At least 2: the first is not timed.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--method", default="kd", show_default=True, help="student.method")
def main(epochs: int, repeats: int, method: str) -> None:
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        changes = {"teacher": {"epochs": 1}, "student": {"epochs": epochs, "method": method}}
        (folder / "params.yaml").write_text(yaml.safe_dump(changes))
        params = Params.model_validate(changes)
        kdmtl = lambda *args: subprocess.run([BIN / "kdmtl", *args], cwd=folder, check=True)  # noqa: E731
        kdmtl("prepare")
        for task in params.tasks:
            kdmtl("train-teacher", "--teacher", task)
            kdmtl("extract-features", "--teacher", task)
        rates: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(repeats):
            for processes in rates:
                seconds = train(folder, processes)[1:]
                trained = [trained_samples(params, processes, e) for e in range(1, epochs)]
                rates[processes].append(
                    statistics.median(n / s for n, s in zip(trained, seconds, strict=True))
                )
    one, two = (statistics.median(rates[p]) for p in (1, 2))
    click.echo(f"student {method}, {NUM_TRAIN} samples, {os.cpu_count()} cores, {epochs} epochs\n")
    click.echo("| processes | samples/s (median) | runs |")
    click.echo("|---|---|---|")
    for processes, values in rates.items():
        shown = ", ".join(f"{v:.1f}" for v in values)
        click.echo(f"| {processes} | {statistics.median(values):.1f} | {shown} |")
    click.echo(f"\n2 processes / 1 process: {two / one:.2f}")


if __name__ == "__main__":
    main()
