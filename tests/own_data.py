"""A user's own data and teacher, as the README's "Your own teachers and data" lays them out: a
folder of PNG images and targets, and a small depth network that is not a kdmtl architecture,
defined in the project's own Python file with its weights in safetensors."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

CLASSES = ("wall", "floor", "chair")
# Sizes differ between samples, as photos do; prepare resizes them to data.height x data.width.
SIZES = ((24, 32), (30, 40))

TEACHER_CODE = '''
import torch
from torch import nn


class TinyDepthNet(nn.Module):
    """An encoder that halves the image, a decoder that restores it, and a depth head."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, images):
        return self.head(self.decoder(self.encoder(images))).abs() + 0.5


def build(width: int = 8) -> nn.Module:
    return TinyDepthNet(width)
'''


def write_image_folder(
    root: Path,
    counts: dict[str, int],
    tasks: tuple[str, ...] = ("semseg", "depth", "normal"),
    seed: int = 0,
) -> None:
    """`root/{train,test}/{images,TASK}/sNN.png` of random content, `root/classes.txt`."""
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        for folder in ("images", *tasks):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            height, width = SIZES[i % len(SIZES)]
            name = f"s{i:02d}.png"
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / split / "images" / name)
            if "semseg" in tasks:
                labels = rng.integers(0, len(CLASSES), (height, width), dtype=np.uint8)
                labels[:2] = 255  # ignored
                Image.fromarray(labels).save(root / split / "semseg" / name)
            if "depth" in tasks:
                millimetres = rng.integers(500, 5000, (height, width), dtype=np.uint16)
                millimetres[:, :2] = 0  # invalid
                Image.fromarray(millimetres).save(root / split / "depth" / name)
            if "normal" in tasks:
                normals = rng.normal(size=(height, width, 3))
                normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
                colours = np.round((normals + 1) * 127.5).astype(np.uint8)
                colours[-1] = 0  # invalid
                Image.fromarray(colours).save(root / split / "normal" / name)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")


def write_teacher(project: Path, width: int = 6, seed: int = 0) -> dict:
    """The teacher's code and safetensors weights in `project/teachers/`; returns its params
    (`teacher.imported.depth`), paths relative to the project."""
    folder = project / "teachers"
    folder.mkdir(exist_ok=True)
    (folder / "depth_net.py").write_text(TEACHER_CODE)
    save_file(build_teacher(project, width, seed).state_dict(), folder / "depth_net.safetensors")
    return {
        "file": "teachers/depth_net.py",
        "factory": "build",
        "kwargs": {"width": width},
        "weights": "teachers/depth_net.safetensors",
        "taps": {"bottleneck": "encoder", "decoder": "decoder"},
        "output": "forward",
    }


def build_teacher(project: Path, width: int, seed: int = 0) -> torch.nn.Module:
    """The teacher's module as the test builds it itself, by running the user's file."""
    namespace: dict = {}
    exec(
        compile((project / "teachers/depth_net.py").read_text(), "depth_net.py", "exec"), namespace
    )
    torch.manual_seed(seed)
    return namespace["build"](width).eval()
