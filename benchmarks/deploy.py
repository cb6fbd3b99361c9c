"""The trained student in use: `kdmtl predict` throughput, and PyTorch against ONNX Runtime.

    python benchmarks/deploy.py [--model models/student.pt] [--images 200] [--repeats 5]

Writes `--images` test images of the prepared data as PNGs (and, at twice their size, as photos
of another size would be) in a temporary folder, then times:

- `kdmtl predict` on them, end to end (reading, resizing, the network, resizing back, writing
  the .npy and .png of every task), as images per second of the whole command (the process's
  start, about 5 s of imports, included and reported apart);
- one forward pass of the network at the trained size, batch 1 and batch 16, in PyTorch and in
  ONNX Runtime (the `kdmtl export` of the same checkpoint), interleaved, median of `--repeats`.
"""

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import onnxruntime
import torch
from PIL import Image

from pipeline.checkpoints import load_student
from pipeline.store.prepared import open_prepared

BIN = Path(sys.executable).parent


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - started


def forward_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@click.command()
@click.option("--model", default="models/student.pt", type=click.Path(path_type=Path))
@click.option("--prepared", default="data/prepared.zarr", type=click.Path(path_type=Path))
@click.option("--images", default=200, show_default=True)
@click.option("--repeats", default=5, show_default=True)
def main(model: Path, prepared: Path, images: int, repeats: int) -> None:
    model, prepared = model.resolve(), prepared.resolve()
    student, metadata = load_student(model)
    height, width = metadata.image_size
    test = open_prepared(prepared).array("test", "image")[:images]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for scale, name in ((1, "trained_size"), (2, "twice_the_size")):
            (folder / name).mkdir()
            for i, image in enumerate(test):
                picture = Image.fromarray(image.transpose(1, 2, 0))
                picture.resize((width * scale, height * scale)).save(folder / name / f"{i}.png")
        kdmtl = str(BIN / "kdmtl")
        start = timed([kdmtl, "--help"], folder)
        for name in ("trained_size", "twice_the_size"):
            seconds = timed(
                [kdmtl, "predict", name, "--out", f"out_{name}", "--model", str(model)], folder
            )
            print(
                f"predict, {len(test)} images at {name.replace('_', ' ')}: {seconds:.1f} s, "
                f"{len(test) / (seconds - start):.0f} images/s after the {start:.1f} s start"
            )
        onnx = folder / "student.onnx"
        timed([kdmtl, "export", "--model", str(model), "--out", str(onnx)], folder)
        session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        student.eval()
        for batch in (1, 16):
            inputs = torch.rand(batch, 3, height, width)
            array = inputs.numpy()

            def torch_pass(inputs=inputs):
                with torch.inference_mode():
                    student(inputs)

            def onnx_pass(array=array):
                session.run(None, {"image": array})

            rows = {"PyTorch": [], "ONNX Runtime": []}
            for _ in range(repeats):  # interleaved
                rows["PyTorch"].append(forward_seconds(torch_pass, 3))
                rows["ONNX Runtime"].append(forward_seconds(onnx_pass, 3))
            for runtime, values in rows.items():
                median = statistics.median(values)
                print(
                    f"forward, batch {batch} at {height}x{width}, {runtime}: "
                    f"{median * 1e3:.2f} ms, {batch / median:.0f} images/s"
                )
    print(f"torch threads {torch.get_num_threads()}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
