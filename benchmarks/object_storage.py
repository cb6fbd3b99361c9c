"""What reading a feature store from object storage costs, against the same store on local disk.

    python benchmarks/object_storage.py [--task depth] [--repeats 5]

Run after `dvc repro`. Copies `features/TASK.zarr` into a bucket of a local S3 server (moto's, on
127.0.0.1, started and stopped here) and reads both copies in one process, interleaved: opening
the store (the manifest and a size check of every shard file), fetching every file's bytes
without decoding (what the storage itself gives), and the student's two readers: streamed
(`loader.resident: off`: shuffled chunks, batches of 16, the next group read ahead) and the
resident load (`ram`: every chunk decoded once by a pool of threads). Prints one Markdown table of
medians; MB/s counts the decoded features, sample ids and views (for the fetch, the compressed
bytes).
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import fsspec

from pipeline.store.features import FeatureChunks, FeatureStore
from pipeline.store.location import store_path
from pipeline.store.resident import ResidentChunks, chunk_nbytes
from pipeline.store.stream import ChunkStream, make_loader
from schemas.params import Params

BUCKET = "kdmtl-benchmark"


@contextmanager
def s3_server(port: int = 5931) -> Iterator[None]:
    """moto's S3 server on the loopback address, with the AWS environment pointing at it."""
    folder = tempfile.mkdtemp()
    log = open(Path(folder) / "server.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="benchmark",
        AWS_SECRET_ACCESS_KEY="benchmark",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise click.ClickException(f"the S3 server did not start: see {log.name}")
        yield
    finally:
        server.terminate()
        server.wait()
        log.close()


def opening(path: str) -> Callable[[], int]:
    def run() -> int:
        FeatureStore.open(store_path(path)).check_intact()
        return 0

    return run


def raw_files(path: str) -> Callable[[], int]:
    """Every file of the store fetched as bytes, nothing decoded: what the storage gives."""

    def run() -> int:
        folder = store_path(path)
        root = folder.path.rstrip("/")
        return sum(len(body) for body in folder.fs.cat(folder.fs.find(root)).values())

    return run


def streamed(path: str) -> Callable[[], int]:
    def run() -> int:
        store = FeatureStore.open(store_path(path))
        stream = ChunkStream(FeatureChunks(store), batch_size=16, shuffle=True, buffer_chunks=4)
        return sum(v.nbytes for batch in make_loader(stream, 0) for v in batch.values())

    return run


def resident(path: str) -> Callable[[], int]:
    def run() -> int:
        store = FeatureStore.open(store_path(path))
        chunks = ResidentChunks(FeatureChunks(store), "resident", progress=False)
        return sum(chunk_nbytes(block) for block in chunks.chunks)

    return run


@click.command()
@click.option("--task", default="depth", show_default=True, help="Whose feature store to read.")
@click.option("--repeats", default=5, show_default=True, help="Interleaved runs of each reading.")
def main(task: str, repeats: int) -> None:
    local = f"{Params().paths.features}/{task}.zarr"
    FeatureStore.open(store_path(local)).check_intact()
    with s3_server():
        fs = fsspec.filesystem("s3")
        fs.mkdir(BUCKET)
        remote = f"s3://{BUCKET}/features/{task}.zarr"
        fs.put(local, remote.removeprefix("s3://"), recursive=True)
        readings = {
            "open (manifest, sizes of the shard files)": opening,
            "every file as bytes, compressed (no decoding)": raw_files,
            "streamed (`resident: off`)": streamed,
            "resident load (`ram`, 8 threads)": resident,
        }
        times = {(name, where): [] for name in readings for where in ("local", "s3")}
        sizes = {}
        for _ in range(repeats):
            for name, reading in readings.items():
                for where, path in (("local", local), ("s3", remote)):
                    started = time.perf_counter()
                    sizes[name] = reading(path)()
                    times[name, where].append(time.perf_counter() - started)
    store = FeatureStore.open(store_path(local))
    click.echo(
        f"`features/{task}.zarr`: {store.manifest.num_samples} samples, "
        f"{store.manifest.num_shards} shards; medians of {repeats}, interleaved\n"
    )
    click.echo("| reading | local disk | S3 (moto on 127.0.0.1) | S3 / local |")
    click.echo("|---|---|---|---|")
    for name in readings:
        here = statistics.median(times[name, "local"])
        there = statistics.median(times[name, "s3"])
        if sizes[name]:
            cells = [f"{sizes[name] / t / 1e6:.0f} MB/s ({t:.2f} s)" for t in (here, there)]
        else:
            cells = [f"{t * 1e3:.0f} ms" for t in (here, there)]
        click.echo(f"| {name} | {cells[0]} | {cells[1]} | {there / here:.2f} |")


if __name__ == "__main__":
    main()
