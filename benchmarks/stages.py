"""Samples per second of each pipeline stage at the paper's width, per precision.

    python benchmarks/stages.py [--samples 32] [--device cuda] [--precision fp32 --precision bf16]

On the built-in scenes at 288x384 with SegNet [64, 128, 256, 512, 512] (batch 2, as the paper
trains): prepare, one teacher (depth) trained for `--epochs`, its extraction, and the student
(tasks: depth only, so that one teacher serves) with kd from the cache and kd online. Training
figures are the median epoch after the first (training and its test evaluation); extraction is the
whole pass. Prints a Markdown table.
"""

import itertools
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch
from setups import PAPER_FILTERS, PAPER_HEIGHT, PAPER_WIDTH, extract_store, scenes

from pipeline.student import train_student
from pipeline.teacher import train_teacher
from pipeline.training import resolve_device
from schemas.params import (
    DataParams,
    FeatureParams,
    LoaderParams,
    ModelParams,
    StudentParams,
    TrainParams,
)

TASK = "depth"


def rate(ends: list[float], samples: int) -> float:
    """Samples per second of the median epoch after the first, from the epochs' end times."""
    return samples / statistics.median(b - a for a, b in itertools.pairwise(ends))


@click.command()
@click.option("--samples", default=32, show_default=True, help="Training samples.")
@click.option("--epochs", default=3, show_default=True, help="At least 2: the first is not timed.")
@click.option("--device", "device_name", default="cuda", show_default=True)
@click.option(
    "--precision",
    "precisions",
    multiple=True,
    default=["fp32", "bf16"],
    show_default=True,
    type=click.Choice(["fp32", "bf16", "fp16"]),
)
def main(samples: int, epochs: int, device_name: str, precisions: tuple[str, ...]) -> None:
    device = resolve_device(device_name)
    model = ModelParams(filters=PAPER_FILTERS)
    data = DataParams(
        num_train=samples, num_test=4, height=PAPER_HEIGHT, width=PAPER_WIDTH, chunk_size=4
    )
    loader = LoaderParams()
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        prepared = scenes(Path(folder), data)
        prepare_rate = (samples + 4) / (time.perf_counter() - started)
        for precision in precisions:
            train = TrainParams(epochs=epochs, batch_size=2, precision=precision)
            ends: list[float] = []
            teacher = train_teacher(
                prepared, TASK, model, train, loader, 0, device, False,
                lambda _row, ends=ends: ends.append(time.perf_counter()),
            ).model  # fmt: skip
            teacher_rate = rate(ends, samples)
            features = FeatureParams(batch_size=8, precision=precision)
            started = time.perf_counter()
            store = extract_store(
                teacher, prepared, Path(folder), features, device, f"{precision}-{TASK}"
            )
            extract_rate = samples / (time.perf_counter() - started)
            student = {}
            for source in ("cache", "online"):
                config = StudentParams(
                    epochs=epochs, batch_size=2, kd_source=source, precision=precision
                )
                ends = []
                train_student(
                    prepared, [TASK], model, config, loader, device,
                    stores={TASK: store} if source == "cache" else None,
                    teachers={TASK: teacher} if source == "online" else None,
                    progress=False,
                    on_epoch=lambda _row, ends=ends: ends.append(time.perf_counter()),
                )  # fmt: skip
                student[source] = rate(ends, samples)
            rows[precision] = (teacher_rate, extract_rate, student["cache"], student["online"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    click.echo(
        f"{samples} scenes at {PAPER_HEIGHT}x{PAPER_WIDTH}, SegNet {PAPER_FILTERS}, batch 2, "
        f"on {name}; prepare {prepare_rate:.1f} samples/s\n"
    )
    click.echo(
        "| precision | teacher training | extraction | student kd cache | student kd online "
        "| kd cache / kd online (time) |"
    )
    click.echo("|---|---|---|---|---|---|")
    for precision, (teacher, extraction, cache, online) in rows.items():
        click.echo(
            f"| {precision} | {teacher:.3g} | {extraction:.3g} | {cache:.3g} | {online:.3g} "
            f"| {online / cache:.2f} |"
        )
    click.echo("\n(samples/s; the last column is kd cache's epoch time over kd online's)")


if __name__ == "__main__":
    main()
