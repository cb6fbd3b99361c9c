"""Feature store benchmarks: the cost of writing, the size on disk, the speed of reading.

    python benchmarks/extract.py [--repeats 5] [--task depth]

Run after `dvc repro` (it uses data/prepared.zarr and the trained teacher). Prints Markdown tables;
each figure is the median of `--repeats` runs, the runs of compared settings interleaved.
"""

import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from pipeline.checkpoints import load_teacher
from pipeline.data.sources import make_source
from pipeline.models import Architecture, build_model
from pipeline.store.checks import bytes_on_disk
from pipeline.store.extract import extract, feature_shapes, shard_inputs, teacher_features
from pipeline.store.features import SPLIT, FeatureChunks, FeatureStore, plan_manifest
from pipeline.store.prepared import PreparedStore, open_prepared, write_prepared
from pipeline.store.stream import ChunkStream, make_loader
from schemas.params import FeatureParams, Params

CPU = torch.device("cpu")
FAKE_SHA = "0" * 64


def manifest_for(teacher: Architecture, prepared: PreparedStore, config: FeatureParams):
    shapes = feature_shapes(teacher, prepared.manifest.height, prepared.manifest.width)
    return plan_manifest("bench", FAKE_SHA, prepared, shapes, config, augment=False)


def time_forward(teacher: Architecture, prepared: PreparedStore, config: FeatureParams) -> float:
    """Read the prepared images and run the teacher over them as extraction does, keeping its
    float32 features; encode and write nothing."""
    store = FeatureStore(Path("unused"), manifest_for(teacher, prepared, config))
    started = time.perf_counter()
    shards = list(range(store.manifest.num_shards))
    for _shard, images, views in shard_inputs(store, prepared, shards):
        teacher_features(teacher, images, views, config.batch_size, CPU)
    return time.perf_counter() - started


def time_extract(
    teacher: Architecture, prepared: PreparedStore, config: FeatureParams, folder: Path
) -> tuple[float, FeatureStore]:
    path = folder / "features.zarr"
    store = FeatureStore.create(path, manifest_for(teacher, prepared, config), config)
    started = time.perf_counter()
    extract(
        teacher,
        prepared,
        store,
        list(range(store.manifest.num_shards)),
        config.batch_size,
        CPU,
        False,
    )
    return time.perf_counter() - started, store


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_cost(teacher: Architecture, prepared: PreparedStore, repeats: int) -> tuple[float, float]:
    config = FeatureParams()
    forward, extraction = [], []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats):
            forward.append(time_forward(teacher, prepared, config))
            seconds, store = time_extract(teacher, prepared, config, Path(folder))
            extraction.append(seconds)
            store.path.rename(Path(folder) / f"old-{time.monotonic_ns()}")
    return median(forward), median(extraction)


def small_prepared(folder: Path, num_train: int) -> PreparedStore:
    data = Params().data.model_copy(update={"num_train": num_train, "num_test": 1})
    write_prepared(make_source(data), folder / "prepared.zarr", data.chunk_size, progress=False)
    return open_prepared(folder / "prepared.zarr")


def codec_table(teacher: Architecture, prepared: PreparedStore, repeats: int) -> list[str]:
    settings = [
        ("float32", FeatureParams(encoding="float32")),
        ("float16 (default)", FeatureParams()),
        *[(f"float16, BitRound {k} bits", FeatureParams(keep_bits=k)) for k in (7, 5, 3)],
    ]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        reference = None
        for label, config in settings:
            times = []
            for r in range(repeats):
                seconds, store = time_extract(
                    teacher, prepared, config, Path(folder) / f"{label}{r}"
                )
                times.append(seconds)
            manifest = store.manifest
            raw = sum(int(np.prod(f.shape)) * 4 for f in manifest.features.values())
            disk = sum(bytes_on_disk(store.path / SPLIT / name) for name in manifest.features)
            decoder = store.array("decoder")[:].astype(np.float32)
            if reference is None:
                reference = decoder
            error = np.abs(decoder - reference).max() / np.abs(reference).max()
            rows.append(
                f"| {label} | {disk / 1e6:.1f} MB | {disk / raw:.3f} | {error:.1e} | "
                f"{median(times):.2f} s |"
            )
    return rows


def read_throughput(store: FeatureStore, workers: int, repeats: int) -> tuple[float, float]:
    stream = ChunkStream(FeatureChunks(store), batch_size=16, shuffle=True, buffer_chunks=4)
    loader = make_loader(stream, workers)
    next(iter(loader))  # start the workers before timing
    times, nbytes = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        nbytes = sum(v.nbytes for batch in loader for v in batch.values())
        times.append(time.perf_counter() - started)
    seconds = median(times)
    return nbytes / seconds / 1e6, store.manifest.num_samples / seconds


@click.command()
@click.option("--repeats", default=5, show_default=True)
@click.option("--task", default="depth", show_default=True)
def main(repeats: int, task: str) -> None:
    params = Params()
    prepared = open_prepared(Path(params.paths.prepared))
    teacher, _ = load_teacher(Path(params.paths.teachers) / f"{task}.pt")
    torch.set_grad_enabled(False)

    click.echo(f"## Write cost ({task} teacher, {torch.get_num_threads()} threads)\n")
    click.echo("| teacher | samples | forward alone | extraction | ratio |\n|---|---|---|---|---|")
    forward, extraction = write_cost(teacher, prepared, repeats)
    click.echo(
        f"| trained, filters {teacher.filters} | {prepared.manifest.splits[SPLIT].num_samples} | "
        f"{forward:.2f} s | {extraction:.2f} s | {extraction / forward:.2f} |"
    )
    with tempfile.TemporaryDirectory() as folder:
        small = small_prepared(Path(folder), 256)
        for filters in ([32, 64, 128, 256], [64, 128, 256, 512, 512]):
            torch.manual_seed(0)
            wide = build_model("segnet", filters, {task: 1}).eval()
            forward, extraction = write_cost(wide, small, repeats)
            click.echo(
                f"| untrained, filters {filters} | 256 | {forward:.2f} s | {extraction:.2f} s | "
                f"{extraction / forward:.2f} |"
            )

    click.echo("\n## Size on disk (whole store, against raw float32)\n")
    click.echo("| dtype, rounding | on disk | ratio | max error (rel. to max) | extraction |")
    click.echo("|---|---|---|---|---|")
    for row in codec_table(teacher, prepared, max(1, repeats // 2)):
        click.echo(row)

    click.echo("\n## Read throughput (default store, shuffled chunks, batches of 16)\n")
    click.echo("| readers | decompressed | samples |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        _, store = time_extract(teacher, prepared, FeatureParams(), Path(folder))
        for workers in (0, 2):
            mbps, samples = read_throughput(store, workers, repeats)
            label = "in the training process" if workers == 0 else f"{workers} spawned workers"
            click.echo(f"| {label} | {mbps:.0f} MB/s | {samples:.0f} samples/s |")


if __name__ == "__main__":
    main()
