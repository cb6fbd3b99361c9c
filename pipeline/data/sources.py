"""Data sources: where the samples of `kdmtl prepare` come from. One class per source."""

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.registry import Registry
from schemas.params import DataParams

SPLITS = ("train", "test")

# Layout of the prepared arrays: name -> (channels, dtype); channels None means [N, H, W].
ARRAY_LAYOUT: dict[str, tuple[int | None, np.dtype]] = {
    "image": (3, np.dtype(np.uint8)),
    "semseg": (None, np.dtype(np.int16)),
    "depth": (1, np.dtype(np.float32)),
    "normal": (3, np.dtype(np.float32)),
}


def array_shape(name: str, num_samples: int, height: int, width: int) -> tuple[int, ...]:
    channels, _ = ARRAY_LAYOUT[name]
    if channels is None:
        return (num_samples, height, width)
    return (num_samples, channels, height, width)


def to_prepared(sample: dict[str, torch.Tensor], height: int, width: int) -> dict[str, np.ndarray]:
    """One sample ([C, h, w] tensors: the image as float in [0, 1], the targets as read) in
    prepared layout at `height` x `width`: the image resized bilinearly with antialiasing, the
    targets by nearest neighbour so that labels, invalid depth and unit normals stay exact."""
    size = (height, width)
    out = {}
    for name, tensor in sample.items():
        if tensor.shape[-2:] != size:
            if name == "image":
                tensor = F.interpolate(
                    tensor[None], size, mode="bilinear", antialias=True, align_corners=False
                )[0]
            else:
                tensor = F.interpolate(tensor[None].float(), size, mode="nearest-exact")[0]
        out[name] = tensor.numpy()
    out["image"] = np.round(np.clip(out["image"], 0, 1) * 255).astype(np.uint8)
    if "semseg" in out:
        out["semseg"] = out["semseg"][0].astype(np.int16)
    return out


class DataSource(ABC):
    """A dataset with a train and a test split, read in prepared layout (see ARRAY_LAYOUT).

    Subclasses declare `name`, the `tasks` whose targets they provide (each task's target array
    has the task's name) and the semantic `class_names`.
    """

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]
    class_names: ClassVar[tuple[str, ...]]

    def __init__(self, config: DataParams) -> None:
        self.config = config

    @property
    def arrays(self) -> tuple[str, ...]:
        return ("image", *self.tasks)

    @abstractmethod
    def num_samples(self, split: str) -> int:
        """How many samples `split` holds."""

    @abstractmethod
    def read(self, split: str, start: int, stop: int) -> dict[str, np.ndarray]:
        """Samples [start, stop) of `split`, one array per name in `arrays`, in prepared layout."""


SOURCES: Registry[DataSource] = Registry("data source")


def make_source(config: DataParams) -> DataSource:
    return SOURCES[config.source](config)
