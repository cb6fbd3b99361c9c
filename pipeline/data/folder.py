"""Real datasets in the preprocessed layout used by MTAN and LibMTL.

`ROOT/{train,val}/{image,label,depth,normal}/{i}.npy`: image H x W x 3 float in [0, 1], label H x W
(-1 ignored), depth H x W x 1 (0 invalid), normal H x W x 3. The `val` split becomes `test`.
Samples whose size differs from `data.height` x `data.width` are resized: the image bilinearly with
antialiasing, the targets by nearest neighbour so that labels, invalid depth and unit normals stay
exact.
"""

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.sources import SOURCES, DataSource
from pipeline.errors import DataError

SPLIT_FOLDERS = {"train": "train", "test": "val"}
# Prepared array name -> folder name and the shape of one file, H and W standing for the size.
FILES = {
    "image": ("image", ("H", "W", 3)),
    "semseg": ("label", ("H", "W")),
    "depth": ("depth", ("H", "W", 1)),
    "normal": ("normal", ("H", "W", 3)),
}


class FolderSource(DataSource):
    """A dataset of one `.npy` file per sample and per array."""

    def __init__(self, config) -> None:
        super().__init__(config)
        if config.root is None:
            raise DataError(
                f"data.root must name the {self.name} folder (data.source: {self.name})"
            )
        self.root = Path(config.root)
        self._counts = {split: self._count(split) for split in SPLIT_FOLDERS}
        self._size: tuple[int, int] | None = None  # (H, W) of the files, from the first one read
        self._first_file: Path | None = None

    def _folder(self, split: str, name: str) -> Path:
        return self.root / SPLIT_FOLDERS[split] / FILES[name][0]

    def _count(self, split: str) -> int:
        """Samples available in `split`, after checking every array has the same files 0..n-1."""
        folders = [self._folder(split, name) for name in self.arrays]
        for folder in folders:
            if not folder.is_dir():
                raise DataError(f"missing folder {folder} ({self.name} layout: {self._layout()})")
        available = len(list(folders[0].glob("*.npy")))
        if available == 0:
            raise DataError(f"no .npy files in {folders[0]}")
        for folder in folders:
            for i in range(available):
                if not (folder / f"{i}.npy").is_file():
                    raise DataError(f"missing file {folder / f'{i}.npy'}")
        wanted = self.config.num_train if split == "train" else self.config.num_test
        if wanted is None:
            return available
        if wanted > available:
            key = "data.num_train" if split == "train" else "data.num_test"
            raise DataError(
                f"{key} is {wanted} but {folders[0]} holds {available} samples; "
                f"set {key} to at most {available}, or to null for all"
            )
        return wanted

    def _layout(self) -> str:
        folders = ",".join(FILES[name][0] for name in self.arrays)
        return f"ROOT/{{train,val}}/{{{folders}}}/{{i}}.npy"

    def num_samples(self, split: str) -> int:
        return self._counts[split]

    def read(self, split: str, start: int, stop: int) -> dict[str, np.ndarray]:
        samples = [self._read_sample(split, i) for i in range(start, stop)]
        return {name: np.stack([s[name] for s in samples]) for name in self.arrays}

    def _load(self, path: Path, name: str) -> np.ndarray:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read {path}: {error}") from None
        expected = FILES[name][1]
        if self._size is None:
            self._size, self._first_file = array.shape[:2], path
        size = dict(zip("HW", self._size, strict=True))
        shape = tuple(size.get(d, d) for d in expected)
        if name == "depth" and array.ndim == 2:
            array = array[..., None]
        if array.shape != shape:
            raise DataError(
                f"{path} has shape {array.shape}, expected {shape} "
                f"(size {self._size[0]}x{self._size[1]} as in {self._first_file})"
            )
        if not np.issubdtype(array.dtype, np.number):
            raise DataError(f"{path} holds {array.dtype} values, expected numbers")
        if not np.isfinite(array).all():
            raise DataError(f"{path} holds NaN or infinite values")
        return array

    def _read_sample(self, split: str, i: int) -> dict[str, np.ndarray]:
        files = {name: self._folder(split, name) / f"{i}.npy" for name in self.arrays}
        raw = {name: self._load(path, name) for name, path in files.items()}
        image = raw["image"]
        if image.min() < 0 or image.max() > 1:
            raise DataError(f"{files['image']} has values outside [0, 1]")
        sample = {"image": torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)}
        if "semseg" in raw:
            labels = raw["semseg"]
            bad = (labels != np.round(labels)) | (labels < -1) | (labels >= len(self.class_names))
            if bad.any():
                raise DataError(
                    f"{files['semseg']} holds label {labels[bad].flat[0]}; expected integers "
                    f"from -1 (ignored) to {len(self.class_names) - 1}"
                )
            sample["semseg"] = torch.from_numpy(labels.astype(np.int16))[None]
        for name in ("depth", "normal"):
            if name in raw:
                sample[name] = torch.from_numpy(raw[name].astype(np.float32)).permute(2, 0, 1)
        return self._to_prepared(sample)

    def _to_prepared(self, sample: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        size = (self.config.height, self.config.width)
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


@SOURCES.register
class NYUv2Source(FolderSource):
    """NYU-v2 with 13 classes, depth and surface normals (795 train, 654 val samples)."""

    name: ClassVar[str] = "nyuv2"
    tasks: ClassVar[tuple[str, ...]] = ("semseg", "depth", "normal")
    class_names: ClassVar[tuple[str, ...]] = (
        "bed",
        "books",
        "ceiling",
        "chair",
        "floor",
        "furniture",
        "objects",
        "picture",
        "sofa",
        "table",
        "tv",
        "wall",
        "window",
    )


@SOURCES.register
class CityscapesSource(FolderSource):
    """Cityscapes with 7 classes and depth (no surface normals)."""

    name: ClassVar[str] = "cityscapes"
    tasks: ClassVar[tuple[str, ...]] = ("semseg", "depth")
    class_names: ClassVar[tuple[str, ...]] = (
        "flat",
        "construction",
        "object",
        "nature",
        "sky",
        "human",
        "vehicle",
    )
