"""A trained network on new images of any size: predictions at the image's own size, and
pictures of them.

Each image is resized to the size the network was trained on (bilinearly, with antialiasing, as
`prepare` resizes), run in batches, and each raw head output is resized back bilinearly before
it becomes a prediction: class scores then their argmax, depth, normals then unit length.
"""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.images import IMAGE_SUFFIXES, check_input_image, opened_image
from pipeline.errors import KdmtlError
from pipeline.models import Architecture
from pipeline.tasks import Task
from pipeline.visualize import (
    PALETTE,
    colour_classes,
    colour_depth,
    colour_normals,
    with_colour_bar,
    with_legend,
)


def image_files(paths: list[Path]) -> list[Path]:
    """The images named: files, and the image files of folders (not their subfolders), in
    order, each checked from its header (8-bit PNG or JPEG, as the folder source's). Two images
    with the same name would write the same outputs, and are refused."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not inside:
                raise KdmtlError(f"{path} holds no .png or .jpg image")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise KdmtlError(f"no image or folder at {path}")
    seen: dict[str, Path] = {}
    for path in found:
        if path.stem in seen:
            raise KdmtlError(
                f"{seen[path.stem]} and {path} have the same name, so their predictions would "
                "overwrite each other: predict them into two folders"
            )
        seen[path.stem] = path
        check_input_image(path)
    return found


def read_image(path: Path) -> torch.Tensor:
    """[3, h, w] float RGB in [0, 1]."""
    with opened_image(path, "give PNG or JPEG images") as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(rgb).permute(2, 0, 1)


@torch.inference_mode()
def predict(
    model: Architecture,
    tasks: dict[str, Task],
    images: list[Path],
    size: tuple[int, int],
    device: torch.device,
    batch_size: int,
) -> Iterator[tuple[Path, dict[str, np.ndarray]]]:
    """Per image, per task: class indices [h, w] (int16), depth [h, w] or unit normals
    [3, h, w] (float32), at the image's own size h x w."""
    model = model.to(device).eval()
    for first in range(0, len(images), batch_size):
        paths = images[first : first + batch_size]
        originals = [read_image(path) for path in paths]
        batch = torch.stack(
            [
                F.interpolate(
                    image[None], size, mode="bilinear", antialias=True, align_corners=False
                )[0]
                for image in originals
            ]
        ).to(device)
        outputs = model(batch).predictions
        for i, (path, image) in enumerate(zip(paths, originals, strict=True)):
            predictions = {}
            for name, task in tasks.items():
                raw = F.interpolate(
                    outputs[name][i : i + 1].float(),
                    image.shape[-2:],
                    mode="bilinear",
                    align_corners=False,
                )
                value = task.predict(raw)[0].cpu().numpy()
                if name == "semseg":
                    value = value.astype(np.int16)
                elif name == "depth":
                    value = value[0]
                predictions[name] = value
            yield path, predictions


def picture(task: str, prediction: np.ndarray, class_names: list[str]) -> Image.Image:
    """Class colours with a legend of the classes present, depth on a colour bar in metres, or
    normals as RGB ((n + 1) / 2)."""
    if task == "semseg":
        present = [int(c) for c in np.unique(prediction) if c >= 0]
        entries = [(PALETTE[c % len(PALETTE)], class_names[c]) for c in present]
        return with_legend(colour_classes(prediction), entries)
    if task == "depth":
        low, high = float(prediction.min()), float(prediction.max())
        return with_colour_bar(colour_depth(prediction, low, high), low, high, "m")
    return Image.fromarray(colour_normals(prediction))
