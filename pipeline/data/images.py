"""A plain folder of image files: the `folder` data source.

```
ROOT/classes.txt                      optional: one class name per line, class 0 first
ROOT/{train,test}/images/NAME.png     or .jpg/.jpeg: 8-bit RGB (grey, palette, alpha converted)
ROOT/{train,test}/semseg/NAME.png     8-bit class indices (grey or palette PNG), 255 ignored
ROOT/{train,test}/depth/NAME.png      16-bit grey: metres times data.depth_scale, 0 invalid
ROOT/{train,test}/normal/NAME.png     8-bit RGB: (x, y, z) = 2 * value / 255 - 1, black invalid
```

The tasks are the target folders present (every split must have the same ones), each image
needs a target of every task under the same stem, and samples are taken in the order of their
names. Every file is checked when the source opens, from its header (format, mode, size), before
any pixel is decoded; labels, depth and normals are checked as they are read. A sample of another
size than `data.height` x `data.width` is resized like the .npy sources' (`to_prepared`).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data.sources import SOURCES, DataSource, to_prepared
from pipeline.errors import DataError, reading
from schemas.params import DataParams

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IGNORE_LABEL = 255  # semseg pixels of this value are left out of the loss and the metrics
MAX_SIDE = 16384  # as for .npy files: bounds what one file may claim before it is decoded
# PIL modes each file may have; anything else is named in the error.
IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK")
IMAGE_FORMATS = ("PNG", "JPEG", "MPO")  # MPO: the JPEG of some cameras
MODES = {
    "semseg": ("L", "P"),
    "depth": ("I;16", "I;16B", "I;16L", "I"),
    "normal": ("RGB",),
}
REQUIREMENT = {
    "semseg": "an 8-bit grey or palette PNG of class indices",
    "depth": "a 16-bit grey PNG",
    "normal": "an 8-bit RGB PNG",
}
TARGET_TASKS = tuple(MODES)


@contextmanager
def opened_image(path: Path, remedy: str) -> Iterator[Image.Image]:
    """The image file at `path`, opened lazily; what PIL cannot or will not open (an image so
    large it may be a decompression bomb) is a DataError naming the file."""
    with reading(path, remedy):
        try:
            with Image.open(path) as image:
                yield image
        except UnidentifiedImageError:
            raise DataError(f"{path} is not an image file PIL can read") from None
        except Image.DecompressionBombError as error:
            raise DataError(f"{path} is refused: {error}") from None


def check_image_header(
    path: Path, modes: tuple[str, ...], formats: tuple[str, ...], requirement: str
) -> tuple[int, int]:
    """(width, height) from the file's header, refused unless its format is one of `formats`
    and its mode one of `modes`."""
    with opened_image(path, "write it again as " + requirement) as image:
        mode, size, kind = image.mode, image.size, image.format
    if kind not in formats or mode not in modes:
        raise DataError(f"{path} is a {kind} image of mode {mode}; expected {requirement}")
    if not all(1 <= side <= MAX_SIDE for side in size):
        raise DataError(f"{path} is {size[0]}x{size[1]} pixels: sides must be from 1 to {MAX_SIDE}")
    return size


def check_input_image(path: Path) -> tuple[int, int]:
    """(width, height) of an input image: 8-bit, PNG or JPEG."""
    return check_image_header(path, IMAGE_MODES, IMAGE_FORMATS, "an 8-bit RGB or grey PNG or JPEG")


@SOURCES.register
class ImageFolderSource(DataSource):
    """Images and per-task target PNGs in one folder per split (see the module docstring)."""

    name: ClassVar[str] = "folder"
    tasks: tuple[str, ...] = TARGET_TASKS  # per instance: the target folders present
    class_names: tuple[str, ...] = ()

    def __init__(self, config: DataParams) -> None:
        super().__init__(config)
        if config.root is None:
            raise DataError("data.root must name the image folder (data.source: folder)")
        self.root = Path(config.root)
        if not self.root.is_dir():
            raise DataError(f"data.root {self.root} is not a folder ({self._layout()})")
        self.tasks = self._present_tasks()
        self._images: dict[tuple[str, str], Path] = {}  # (split, stem) -> image file
        self.stems = {split: self._stems(split) for split in ("train", "test")}
        self.class_names = self._class_names() if "semseg" in self.tasks else ()

    def _layout(self) -> str:
        return "expected ROOT/{train,test}/images/NAME.png and ROOT/{train,test}/TASK/NAME.png"

    def _present_tasks(self) -> tuple[str, ...]:
        found = {}
        for split in ("train", "test"):
            images = self.root / split / "images"
            if not images.is_dir():
                raise DataError(f"missing folder {images} ({self._layout()})")
            found[split] = tuple(t for t in TARGET_TASKS if (self.root / split / t).is_dir())
        if found["train"] != found["test"]:
            raise DataError(
                f"{self.root}/train has targets {', '.join(found['train']) or 'none'} but "
                f"{self.root}/test has {', '.join(found['test']) or 'none'}: give both splits "
                "the same task folders"
            )
        if not found["train"]:
            raise DataError(
                f"{self.root}/train has no target folder: add one of {', '.join(TARGET_TASKS)}"
            )
        return found["train"]

    def _stems(self, split: str) -> list[str]:
        """The split's sample names, in order, after checking every file's header."""
        folder = self.root / split / "images"
        images = {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue  # hidden files: .DS_Store and the like
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                raise DataError(f"{path} is not a .png or .jpg image: keep only images in {folder}")
            if path.stem in images:
                raise DataError(f"{images[path.stem]} and {path} have the same name: rename one")
            images[path.stem] = path
        if not images:
            raise DataError(f"no images in {folder}")
        for task in self.tasks:
            targets = self.root / split / task
            for path in sorted(targets.iterdir()):
                if path.name.startswith("."):
                    continue
                if path.suffix.lower() != ".png" or path.stem not in images:
                    raise DataError(
                        f"{path} has no image of the same name in {folder}: every target is "
                        "NAME.png beside an image NAME.png or NAME.jpg"
                    )
        stems = list(images)
        wanted = self.config.num_train if split == "train" else self.config.num_test
        if wanted is not None:
            if wanted > len(stems):
                key = "data.num_train" if split == "train" else "data.num_test"
                raise DataError(
                    f"{key} is {wanted} but {folder} holds {len(stems)} images; set {key} to at "
                    f"most {len(stems)}, or to null for all"
                )
            stems = stems[:wanted]
        for stem in stems:
            size = check_input_image(images[stem])
            for task in self.tasks:
                path = self.root / split / task / f"{stem}.png"
                if not path.is_file():
                    raise DataError(f"missing {path}: the {task} target of {images[stem]}")
                found = check_image_header(path, MODES[task], ("PNG",), REQUIREMENT[task])
                if found != size:
                    raise DataError(
                        f"{path} is {found[1]}x{found[0]} pixels but its image {images[stem]} is "
                        f"{size[1]}x{size[0]}: a target must have its image's size"
                    )
        self._images |= {(split, stem): images[stem] for stem in stems}
        return stems

    def _class_names(self) -> tuple[str, ...]:
        listed = self.root / "classes.txt"
        if listed.is_file():
            with reading(listed, "write it as UTF-8 text, one class name per line"):
                names = [line.strip() for line in listed.read_text("utf-8").splitlines()]
            names = [name for name in names if name]
            if not 1 <= len(names) <= IGNORE_LABEL:
                raise DataError(
                    f"{listed} lists {len(names)} class names; expected 1 to {IGNORE_LABEL}"
                )
            return tuple(names)
        # No list: as many classes as the largest label found, named by number.
        largest = -1
        for (split, stem), _ in self._images.items():
            labels = self._decode(self.root / split / "semseg" / f"{stem}.png").astype(np.int16)
            labels = labels[labels != IGNORE_LABEL]
            largest = max(largest, int(labels.max(initial=-1)))
        if largest < 0:
            raise DataError(
                f"every semseg pixel under {self.root} is {IGNORE_LABEL} (ignored): no classes"
            )
        return tuple(f"class {i}" for i in range(largest + 1))

    @staticmethod
    def _decode(path: Path) -> np.ndarray:
        with opened_image(path, "write it again") as image:
            return np.asarray(image)

    def num_samples(self, split: str) -> int:
        return len(self.stems[split])

    def read(self, split: str, start: int, stop: int) -> dict[str, np.ndarray]:
        samples = [self._read_sample(split, stem) for stem in self.stems[split][start:stop]]
        return {name: np.stack([s[name] for s in samples]) for name in self.arrays}

    def _read_sample(self, split: str, stem: str) -> dict[str, np.ndarray]:
        path = self._images[(split, stem)]
        with opened_image(path, "write it again") as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        sample = {"image": torch.from_numpy(rgb).permute(2, 0, 1)}
        for task in self.tasks:
            target = self.root / split / task / f"{stem}.png"
            sample[task] = getattr(self, f"_{task}")(self._decode(target), target)
        return to_prepared(sample, self.config.height, self.config.width)

    def _semseg(self, values: np.ndarray, path: Path) -> torch.Tensor:
        labels = values.astype(np.int16)
        bad = (labels >= len(self.class_names)) & (labels != IGNORE_LABEL)
        if bad.any():
            raise DataError(
                f"{path} holds label {labels[bad].flat[0]}; {self.root / 'classes.txt'} names "
                f"{len(self.class_names)} classes (labels 0 to {len(self.class_names) - 1}, "
                f"{IGNORE_LABEL} ignored)"
            )
        labels[labels == IGNORE_LABEL] = -1
        return torch.from_numpy(labels)[None]

    def _depth(self, values: np.ndarray, path: Path) -> torch.Tensor:
        if values.min() < 0 or values.max() > 65535:
            raise DataError(f"{path} holds values outside 0 to 65535: write a 16-bit PNG")
        metres = values.astype(np.float32) / self.config.depth_scale
        return torch.from_numpy(metres)[None]

    def _normal(self, values: np.ndarray, path: Path) -> torch.Tensor:
        valid = values.any(axis=-1, keepdims=True)
        vectors = values.astype(np.float32) * (2 / 255) - 1
        length = np.linalg.norm(vectors, axis=-1, keepdims=True)
        if (valid & (length < 0.5)).any():
            raise DataError(
                f"{path} holds colours that are no direction (length below 0.5 once mapped to "
                "[-1, 1]): write normals as 255 * (n + 1) / 2, black for invalid pixels"
            )
        unit = np.where(valid, vectors / np.maximum(length, 1e-6), 0)
        return torch.from_numpy(unit).permute(2, 0, 1).contiguous()
