"""Time `kdmtl prepare` on the default params: median wall time over repeats.

python benchmarks/prepare.py [--repeats 3]
"""

import statistics
import tempfile
import time
from pathlib import Path

import click

from pipeline.data.sources import make_source
from pipeline.store.prepared import write_prepared
from schemas.params import Params


@click.command()
@click.option("--repeats", default=3, show_default=True)
def main(repeats: int) -> None:
    params = Params()
    source = make_source(params.data)
    samples = params.data.num_train + params.data.num_test
    times = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats):
            start = time.perf_counter()
            write_prepared(source, Path(folder) / "prepared.zarr", params.data.chunk_size, False)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    click.echo(
        f"prepare, default params ({samples} samples of {params.data.height}x{params.data.width}): "
        f"median {median:.2f} s over {repeats} runs ({samples / median:.0f} samples/s); "
        f"runs: {', '.join(f'{t:.2f}' for t in times)}"
    )


if __name__ == "__main__":
    main()
