"""Real datasets in the preprocessed layout used by MTAN and LibMTL.

`ROOT/{train,val}/{image,label,depth,normal}/{i}.npy`: image H x W x 3 float in [0, 1], label H x W
(-1 ignored), depth H x W x 1 (0 invalid), normal H x W x 3. The `val` split becomes `test`.
Samples whose size differs from `data.height` x `data.width` are resized: the image bilinearly with
antialiasing, the targets by nearest neighbour so that labels, invalid depth and unit normals stay
exact.
"""

import math
from pathlib import Path
from typing import BinaryIO, ClassVar

import numpy as np
import torch

from pipeline.data.sources import SOURCES, DataSource, to_prepared
from pipeline.errors import DataError, reading

SPLIT_FOLDERS = {"train": "train", "test": "val"}
# Prepared array name -> folder name and the shape of one file, H and W standing for the size.
FILES = {
    "image": ("image", ("H", "W", 3)),
    "semseg": ("label", ("H", "W")),
    "depth": ("depth", ("H", "W", 1)),
    "normal": ("normal", ("H", "W", 3)),
}
# Largest height and width of a file, checked from its header before anything is allocated so
# that a damaged or hostile header cannot claim terabytes. Far above these datasets' frames
# (NYU-v2 480 x 640, Cityscapes 1024 x 2048, less once preprocessed), yet it still bounds one
# file to 16384 x 16384 x 3 values.
MAX_SIDE = 16384
# bool, signed and unsigned integers, floats: complex (imaginary part dropped), datetimes,
# strings, objects (pickles) and structured records are not pixel values.
REAL_KINDS = "biuf"
ZIP_MAGIC = b"PK"  # .npz archives are zip files


class NpyFolderSource(DataSource):
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
        """The array in `path`, checked from its header before its data is read; every array
        but the labels comes back as float32, the dtype it is stored in."""
        with reading(path, "write it again with numpy.save"), path.open("rb") as file:
            shape, dtype = self._check_header(file, path, name)
            file.seek(0)
            array = np.lib.format.read_array(file, allow_pickle=False)
        if (array.shape, array.dtype) != (shape, dtype):  # rewritten since its header was read
            raise DataError(f"cannot read {path}: it changed while being read")
        if name == "depth" and array.ndim == 2:
            array = array[..., None]
        if not np.isfinite(array).all():
            raise DataError(f"{path} holds NaN or infinite values")
        if name != "semseg":
            # Finite float64 values beyond 3.4e38 become infinite in float32: refused just below.
            with np.errstate(over="ignore"):
                converted = array.astype(np.float32, copy=False)
            if converted is not array and not np.isfinite(converted).all():
                raise DataError(
                    f"{path} holds values too large for float32 (largest magnitude "
                    f"{np.abs(array).max():.3g}, float32 stops at {np.finfo(np.float32).max:.3g})"
                )
            array = converted
        return array

    def _check_header(
        self, file: BinaryIO, path: Path, name: str
    ) -> tuple[tuple[int, ...], np.dtype]:
        """Refuse from the header alone, before anything is allocated, a file that is not one
        sample's `name` array: its dtype, its shape, whether the file holds all the data the
        header announces. Returns the shape and dtype."""
        magic = file.read(len(np.lib.format.MAGIC_PREFIX))
        if not magic:
            raise DataError(f"{path} is empty (0 bytes): write the array again with numpy.save")
        if magic.startswith(ZIP_MAGIC):
            raise DataError(
                f"{path} is a .npz archive, not a .npy array: save each array on its own with "
                "numpy.save"
            )
        file.seek(0)
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(file)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(file)
        else:  # 3.0 only differs for structured dtypes with non-ASCII field names
            raise DataError(f"{path} is a .npy file of version {version}, expected 1.0 or 2.0")
        data_start = file.tell()
        if dtype.kind not in REAL_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise DataError(
                f"{path} holds {dtype} values, expected real numbers "
                "(bool, integers or floats): convert the array before saving it"
            )
        expected = FILES[name][1]
        ndims = {len(expected), 2} if name == "depth" else {len(expected)}
        # Channels must match now; height and width when the size of the first file is known.
        if len(shape) not in ndims or any(
            isinstance(want, int) and got != want
            for want, got in zip(expected[2:], shape[2:], strict=False)
        ):
            wanted = " x ".join(str(d) for d in expected)
            if name == "depth":
                wanted += " or H x W"
            raise DataError(
                f"{path} has shape {shape}, expected {wanted} (H and W the height and width)"
            )
        if not all(1 <= side <= MAX_SIDE for side in shape[:2]):
            raise DataError(
                f"{path} has shape {shape}: height and width must be at least 1 and at most "
                f"{MAX_SIDE} pixels"
            )
        if self._size is None:
            self._size, self._first_file = shape[:2], path
        elif shape[:2] != self._size:
            full = tuple(dict(zip("HW", self._size, strict=True)).get(d, d) for d in expected)
            if name == "depth" and len(shape) == 2:
                full = full[:2]
            raise DataError(
                f"{path} has shape {shape}, expected {full} "
                f"(size {self._size[0]}x{self._size[1]} as in {self._first_file})"
            )
        size = path.stat().st_size
        needed = data_start + math.prod(shape) * dtype.itemsize
        if size < needed:
            raise DataError(
                f"{path} is truncated: its header announces {shape} {dtype} values, "
                f"{needed} bytes, but the file holds {size}; write it again with numpy.save"
            )
        return shape, dtype

    def _read_sample(self, split: str, i: int) -> dict[str, np.ndarray]:
        files = {name: self._folder(split, name) / f"{i}.npy" for name in self.arrays}
        raw = {name: self._load(path, name) for name, path in files.items()}
        image = raw["image"]
        if image.min() < 0 or image.max() > 1:
            raise DataError(f"{files['image']} has values outside [0, 1]")
        sample = {"image": torch.from_numpy(image).permute(2, 0, 1)}
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
                sample[name] = torch.from_numpy(raw[name]).permute(2, 0, 1)
        return to_prepared(sample, self.config.height, self.config.width)


@SOURCES.register
class NYUv2Source(NpyFolderSource):
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
class CityscapesSource(NpyFolderSource):
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
