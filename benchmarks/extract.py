"""Feature store benchmarks: the cost of writing, the size on disk, the speed of reading.

    python benchmarks/extract.py [--repeats 5] [--task depth] [--device cpu]
    python benchmarks/extract.py --paper [--samples 8] [--device cuda]
    python benchmarks/extract.py --zarrs   # the same reads and writes through zarrs, if installed

Without `--paper`, run after `dvc repro` (it uses data/prepared.zarr and the trained teacher).
Prints Markdown tables; each figure is the median of `--repeats` runs, the runs of compared
settings interleaved.
"""

import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
import zarr
from setups import ENCODINGS, FAKE_SHA, PAPER_FILTERS, PAPER_HEIGHT, PAPER_WIDTH, scenes

from pipeline.checkpoints import load_teacher
from pipeline.models import Architecture, build_model
from pipeline.store.checks import bytes_on_disk
from pipeline.store.extract import extract, feature_shapes, shard_inputs, teacher_features
from pipeline.store.features import SPLIT, FeatureChunks, FeatureStore, plan_manifest
from pipeline.store.prepared import PreparedStore, open_prepared
from pipeline.store.stream import ChunkStream, make_loader
from pipeline.training import resolve_device
from schemas.params import FeatureParams, Params

ZARRS = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}


def manifest_for(teacher: Architecture, prepared: PreparedStore, config: FeatureParams):
    shapes = feature_shapes(teacher, prepared.manifest.height, prepared.manifest.width)
    return plan_manifest("bench", FAKE_SHA, prepared, shapes, config, augment=False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(
    teacher: Architecture, prepared: PreparedStore, config: FeatureParams, device: torch.device
) -> tuple[float, int]:
    """Seconds to read the prepared images and run the teacher over them as extraction does,
    keeping its float32 features in host memory (encoding and writing nothing), and the bytes of
    those features."""
    store = FeatureStore(Path("unused"), manifest_for(teacher, prepared, config))
    synchronize(device)
    started = time.perf_counter()
    shards = list(range(store.manifest.num_shards))
    nbytes = 0
    for _shard, images, views in shard_inputs(store, prepared, shards):
        features = teacher_features(teacher, images, views, config.batch_size, device)
        nbytes += sum(f.nbytes for f in features.values())
    return time.perf_counter() - started, nbytes


def time_extract(
    teacher: Architecture,
    prepared: PreparedStore,
    config: FeatureParams,
    folder: Path,
    device: torch.device,
) -> tuple[float, FeatureStore]:
    path = folder / "features.zarr"
    store = FeatureStore.create(path, manifest_for(teacher, prepared, config), config)
    synchronize(device)
    started = time.perf_counter()
    shards = list(range(store.manifest.num_shards))
    extract(teacher, prepared, store, shards, config.batch_size, device, False)
    return time.perf_counter() - started, store


def writer_seconds(
    teacher: Architecture,
    prepared: PreparedStore,
    config: FeatureParams,
    folder: Path,
    device: torch.device,
) -> float:
    """Seconds the writer alone takes for a store: every shard's encoded features are computed
    first, then written and recorded in this thread as the writer thread does, the clock running
    only then."""
    store = FeatureStore.create(
        folder / "written.zarr", manifest_for(teacher, prepared, config), config
    )
    shards = []
    for shard, images, views in shard_inputs(store, prepared, range(store.manifest.num_shards)):
        features = teacher_features(
            teacher, images, views, config.batch_size, device, store.encoding
        )
        start, stop = store.shard_range(shard)
        values = {name: feature.numpy() for name, feature in features.items()}
        values |= {"sample_id": np.arange(start, stop, dtype=np.int64), "views": views}
        shards.append((shard, start, stop, values))
    arrays = {name: store.array(name) for name in shards[0][3]}
    started = time.perf_counter()
    for shard, start, stop, values in shards:
        for name, block in values.items():
            arrays[name][start:stop] = block
        store.mark_done(shard)
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_cost(
    teacher: Architecture, prepared: PreparedStore, repeats: int, device: torch.device
) -> dict[str, float]:
    """Medians of interleaved runs: forward alone, extraction, the writer alone; and the bytes
    of the teacher's float32 features."""
    config = FeatureParams()
    times = {"forward": [], "extraction": [], "writer": []}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(repeats):
            seconds, nbytes = time_forward(teacher, prepared, config, device)
            times["forward"].append(seconds)
            run = Path(folder) / str(repeat)
            run.mkdir()
            times["extraction"].append(time_extract(teacher, prepared, config, run, device)[0])
            times["writer"].append(writer_seconds(teacher, prepared, config, run, device))
    return {name: median(values) for name, values in times.items()} | {"bytes": nbytes}


def write_cost_row(label: str, samples: int, cost: dict[str, float]) -> str:
    return (
        f"| {label} | {samples} | {cost['forward']:.2f} s | {cost['extraction']:.2f} s | "
        f"**{cost['extraction'] / cost['forward']:.2f}** | "
        f"{cost['bytes'] / cost['forward'] / 1e6:.0f} MB/s | "
        f"{cost['bytes'] / cost['writer'] / 1e6:.0f} MB/s |"
    )


def scenes_of(folder: Path, num_train: int, height: int = 48, width: int = 64) -> PreparedStore:
    update = {"num_train": num_train, "num_test": 1, "height": height, "width": width}
    return scenes(folder, Params().data.model_copy(update=update))


def codec_table(
    teacher: Architecture, prepared: PreparedStore, repeats: int, device: torch.device
) -> list[str]:
    """Per encoding: bytes on disk, and the largest error of the decoded decoder feature against
    what it encodes (the float32 feature, or its per-pixel normalisation for normalized-int8),
    relative to the largest such value."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        reference = None
        for label, changes in ENCODINGS:
            config = FeatureParams(**changes)
            times = []
            for r in range(repeats):
                run = Path(folder) / f"{label}{r}"
                run.mkdir()
                seconds, store = time_extract(teacher, prepared, config, run, device)
                times.append(seconds)
            manifest = store.manifest
            raw = sum(int(np.prod(f.shape)) * 4 for f in manifest.features.values())
            disk = sum(bytes_on_disk(store.path / SPLIT / name) for name in manifest.features)
            decoded = store.encoding.decode_array(store.array("decoder")[:])
            if reference is None:
                reference = decoded  # float32
            expected = store.encoding.expected(reference)
            error = np.abs(decoded - expected).max() / np.abs(expected).max()
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


def codec_pipelines(teacher: Architecture, prepared: PreparedStore, repeats: int) -> list[str]:
    """Writer alone and reading in the training process, through zarr's own codec pipeline and
    through zarrs, interleaved."""
    import zarrs  # noqa: F401  (fails loudly when it is not installed)

    times = {"zarr": ([], []), "zarrs": ([], [])}
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        _, store = time_extract(teacher, prepared, FeatureParams(), Path(folder), cpu)
        for repeat in range(repeats):
            for name, config in (("zarr", {}), ("zarrs", ZARRS)):
                with zarr.config.set(config) if config else contextlib.nullcontext():
                    run = Path(folder) / f"{name}{repeat}"
                    run.mkdir()
                    seconds = writer_seconds(teacher, prepared, FeatureParams(), run, cpu)
                    times[name][0].append(seconds)
                    times[name][1].append(read_throughput(FeatureStore.open(store.path), 0, 1)[0])
    _, nbytes = time_forward(teacher, prepared, FeatureParams(), cpu)
    return [
        f"| {name} | {nbytes / median(write) / 1e6:.0f} MB/s | {median(read):.0f} MB/s |"
        for name, (write, read) in times.items()
    ]


@click.command()
@click.option("--repeats", default=5, show_default=True)
@click.option("--task", default="depth", show_default=True)
@click.option("--device", "device_name", default="cpu", show_default=True, help="cpu, cuda, auto")
@click.option("--paper", is_flag=True, help="Only the write cost at the paper's width and size.")
@click.option("--samples", default=32, show_default=True, help="Training samples with --paper.")
@click.option("--zarrs", "with_zarrs", is_flag=True, help="Only zarr's codec pipeline vs zarrs.")
def main(
    repeats: int, task: str, device_name: str, paper: bool, samples: int, with_zarrs: bool
) -> None:
    device = resolve_device(device_name)
    torch.set_grad_enabled(False)
    header = (
        "| teacher | samples | forward alone | extraction | ratio | teacher output "
        "(raw float32) | writer alone (raw float32) |\n|---|---|---|---|---|---|---|"
    )
    if paper:
        click.echo(f"## Write cost at the paper's width, {PAPER_HEIGHT}x{PAPER_WIDTH}, {device}\n")
        click.echo(header)
        with tempfile.TemporaryDirectory() as folder:
            prepared = scenes_of(Path(folder), samples, PAPER_HEIGHT, PAPER_WIDTH)
            torch.manual_seed(0)
            wide = build_model("segnet", PAPER_FILTERS, {task: 1}).eval().to(device)
            cost = write_cost(wide, prepared, repeats, device)
            click.echo(write_cost_row(f"untrained, filters {PAPER_FILTERS}", samples, cost))
        return

    params = Params()
    prepared = open_prepared(Path(params.paths.prepared))
    teacher, _ = load_teacher(Path(params.paths.teachers) / f"{task}.pt")
    teacher = teacher.to(device)
    if with_zarrs:
        click.echo(f"## Codec pipelines ({task} store, writer alone and reading)\n")
        click.echo("| codec pipeline | writer alone (raw float32) | read, decompressed |")
        click.echo("|---|---|---|")
        for row in codec_pipelines(teacher, prepared, repeats):
            click.echo(row)
        return

    click.echo(f"## Write cost ({task} teacher, {torch.get_num_threads()} threads, {device})\n")
    click.echo(header)
    count = prepared.manifest.splits[SPLIT].num_samples
    cost = write_cost(teacher, prepared, repeats, device)
    click.echo(write_cost_row(f"trained, filters {teacher.filters}", count, cost))
    with tempfile.TemporaryDirectory() as folder:
        small = scenes_of(Path(folder), 256)
        for filters in ([32, 64, 128, 256], PAPER_FILTERS):
            torch.manual_seed(0)
            wide = build_model("segnet", filters, {task: 1}).eval().to(device)
            cost = write_cost(wide, small, repeats, device)
            click.echo(write_cost_row(f"untrained, filters {filters}", 256, cost))

    click.echo("\n## Size on disk (whole store, against raw float32)\n")
    click.echo("| encoding | on disk | ratio | max error (rel. to max) | extraction |")
    click.echo("|---|---|---|---|---|")
    for row in codec_table(teacher, prepared, max(1, repeats // 2), device):
        click.echo(row)

    click.echo("\n## Read throughput (default store, shuffled chunks, batches of 16)\n")
    click.echo("| readers | decompressed | samples |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        _, store = time_extract(teacher, prepared, FeatureParams(), Path(folder), device)
        for workers in (0, 2):
            mbps, samples_per_s = read_throughput(store, workers, repeats)
            label = "in the training process" if workers == 0 else f"{workers} spawned workers"
            click.echo(f"| {label} | {mbps:.0f} MB/s | {samples_per_s:.0f} samples/s |")


if __name__ == "__main__":
    main()
