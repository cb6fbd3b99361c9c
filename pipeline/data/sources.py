"""Data sources: where the samples of `kdmtl prepare` come from. One class per source."""

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

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
