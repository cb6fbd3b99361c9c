"""`kdmtl predict IMAGES... --out DIR`: a trained student (or teacher) on new images."""

from pathlib import Path

import click
import numpy as np
import torch

from pipeline.checkpoints import load_trained_network
from pipeline.errors import KdmtlError
from pipeline.files import write_atomically
from pipeline.predict import image_files, picture, predict
from pipeline.progress import progress_bar
from pipeline.tasks import make_tasks
from stages.common import (
    model_option,
    network_input_size,
    parse_device,
    size_option,
    user_errors,
)


def save_array(path: Path, value: np.ndarray) -> None:
    with path.open("wb") as file:  # np.save would add .npy to the temporary file's name
        np.save(file, value)


def check_output_folder(folder: Path, tasks: list[str]) -> None:
    """Refuse a folder holding files that predict does not write (NAME.TASK.npy or .png)."""
    if folder.exists() and not folder.is_dir():
        raise KdmtlError(f"{folder} is a file, not a folder: choose another --out")
    if not folder.exists():
        return
    ours = tuple(f".{task}{suffix}" for task in tasks for suffix in (".npy", ".png"))
    for leftover in folder.glob("*.partial"):  # of a killed run: never moved into place
        if leftover.name.removesuffix(".partial").endswith(ours):
            leftover.unlink()
    foreign = sorted(p.name for p in folder.iterdir() if not p.name.endswith(ours))
    if foreign:
        raise KdmtlError(
            f"{folder} holds files that kdmtl predict does not write ({', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}), and kdmtl replaces only its own files: "
            "choose another --out"
        )


@click.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for NAME.TASK.npy (the prediction) and NAME.TASK.png (a picture of it).",
)
@model_option
@size_option("Size the network sees, e.g. 288x384; default: the size it was trained on.")
@click.option(
    "--batch-size",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per forward pass.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=lambda _ctx, _param, value: parse_device(value),
    help="auto (CUDA when present), cpu, cuda or cuda:N.",
)
@user_errors
def command(
    images: tuple[Path, ...],
    out: Path,
    model: Path,
    size: str | None,
    batch_size: int,
    device: torch.device,
) -> None:
    """Predict every task of a trained network on IMAGES (PNG or JPEG files, or folders of
    them), of any size: each is resized to the trained size, and each prediction back to the
    image's. Writes per image and task NAME.TASK.npy (semseg: class indices, int16 [H, W];
    depth: metres, float32 [H, W]; normal: unit vectors, float32 [3, H, W]) and NAME.TASK.png
    (classes with a legend, depth with a colour bar, normals as RGB)."""
    network, metadata = load_trained_network(model)
    shape = network_input_size(network, size, model, metadata)
    tasks = make_tasks(list(network.heads), len(metadata.class_names))
    files = image_files(list(images))
    check_output_folder(out, list(tasks))
    out.mkdir(parents=True, exist_ok=True)
    with progress_bar(total=len(files), desc="predict", unit="image") as bar:
        for path, predictions in predict(network, tasks, files, shape, device, batch_size):
            for task, value in predictions.items():
                stem = out / f"{path.stem}.{task}"
                write_atomically(
                    stem.with_name(stem.name + ".npy"),
                    lambda partial, value=value: save_array(partial, value),
                )
                drawn = picture(task, value, metadata.class_names)
                write_atomically(
                    stem.with_name(stem.name + ".png"),
                    lambda partial, drawn=drawn: drawn.save(partial, format="PNG"),
                )
            bar.update(1)
    click.echo(
        f"wrote {out}: {len(files)} images x {len(tasks)} tasks ({', '.join(tasks)}) with "
        f"{model} at {shape[0]}x{shape[1]}"
    )
