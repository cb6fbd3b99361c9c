"""The `folder` data source: images and target PNGs, values as documented, every bad file named."""

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_PARAMS, kdmtl, refused, write_params
from own_data import CLASSES, write_image_folder
from PIL import Image

from pipeline.errors import DataError
from pipeline.store.prepared import PreparedStore, open_prepared
from schemas.params import DataParams

FOLDER = {"source": "folder", "root": "own", "height": 12, "width": 16, "chunk_size": 2}
SAME_SIZE = {"height": 24, "width": 32}  # the first sample's size: nothing is resized


def folder_params(project: Path, **data) -> None:
    params = TINY_PARAMS | {"data": FOLDER | {"num_train": None, "num_test": None} | data}
    write_params(project, params)


def test_prepare_reads_the_documented_values(project: Path):
    write_image_folder(project / "own", {"train": 3, "test": 2})
    folder_params(project, **SAME_SIZE, num_train=1)
    result = kdmtl("prepare")
    assert result.exit_code == 0, result.output
    store = open_prepared(project / "data/prepared.zarr")
    manifest = store.manifest
    assert manifest.class_names == list(CLASSES)
    assert manifest.tasks == ["semseg", "depth", "normal"]
    assert {s: info.num_samples for s, info in manifest.splits.items()} == {"train": 1, "test": 2}

    name = "own/train/{}/s00.png"
    image = np.asarray(Image.open(project / name.format("images")))
    labels = np.asarray(Image.open(project / name.format("semseg"))).astype(np.int16)
    millimetres = np.asarray(Image.open(project / name.format("depth"))).astype(np.float32)
    colours = np.asarray(Image.open(project / name.format("normal"))).astype(np.float32)
    np.testing.assert_array_equal(store.array("train", "image")[0], image.transpose(2, 0, 1))
    labels[labels == 255] = -1
    np.testing.assert_array_equal(store.array("train", "semseg")[0], labels)
    np.testing.assert_allclose(store.array("train", "depth")[0, 0], millimetres / 1000, rtol=1e-6)
    normals = store.array("train", "normal")[0].transpose(1, 2, 0)
    vectors = colours * 2 / 255 - 1
    expected = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    expected[colours.sum(-1) == 0] = 0
    np.testing.assert_allclose(normals, expected, atol=1e-6)
    assert (normals[-1] == 0).all() and (store.array("train", "depth")[0, 0, :, :2] == 0).all()


def test_tasks_are_the_folders_present_and_classes_default_to_numbers(project: Path):
    write_image_folder(project / "own", {"train": 2, "test": 1}, tasks=("semseg", "depth"))
    (project / "own/classes.txt").unlink()
    folder_params(project)
    refused(("prepare",), "tasks: own has no normal targets (it has semseg, depth): add them")
    two = {"tasks": ["semseg", "depth"], "teacher": {"trained": ["semseg", "depth"]}}
    write_params(project, TINY_PARAMS | two | {"data": FOLDER})
    assert kdmtl("prepare").exit_code == 0
    manifest = open_prepared(project / "data/prepared.zarr").manifest
    assert manifest.tasks == ["semseg", "depth"]
    assert manifest.class_names == ["class 0", "class 1", "class 2"]
    assert open_prepared(project / "data/prepared.zarr").array("train", "image").shape == (
        2,
        3,
        12,
        16,
    )


def _grey(path: Path, value: int, size=(32, 24), mode="L") -> None:
    Image.new(mode, size, value).save(path)


BAD = {
    "not an image": (
        lambda r: (r / "train/images/s00.png").write_text("hello"),
        "own/train/images/s00.png is not an image file",
    ),
    "missing target": (
        lambda r: (r / "train/depth/s01.png").unlink(),
        "missing own/train/depth/s01.png: the depth target of own/train/images/s01.png",
    ),
    "target of another size": (
        lambda r: _grey(r / "train/semseg/s00.png", 1, size=(10, 10)),
        "own/train/semseg/s00.png is 10x10 pixels but its image",
    ),
    "8-bit depth": (
        lambda r: _grey(r / "test/depth/s00.png", 7),
        "own/test/depth/s00.png is a PNG image of mode L; expected a 16-bit grey PNG",
    ),
    "label beyond the classes": (
        lambda r: _grey(r / "train/semseg/s00.png", 7),
        "own/train/semseg/s00.png holds label 7; own/classes.txt names 3 classes",
    ),
    "a grey colour is no normal": (
        lambda r: _grey(r / "train/normal/s00.png", (128, 128, 128), mode="RGB"),
        "own/train/normal/s00.png holds colours that are no direction",
    ),
    "a target without its image": (
        lambda r: _grey(r / "train/semseg/extra.png", 1),
        "own/train/semseg/extra.png has no image of the same name",
    ),
    "splits with other tasks": (
        lambda r: (
            [p.unlink() for p in (r / "test/normal").iterdir()] and (r / "test/normal").rmdir()
        ),
        "own/train has targets semseg, depth, normal but own/test has semseg, depth",
    ),
    "a JPEG target named .png": (
        lambda r: Image.open(r / "train/semseg/s00.png").save(r / "train/semseg/s00.png", "JPEG"),
        "own/train/semseg/s00.png is a JPEG image of mode L; expected an 8-bit grey or palette PNG",
    ),
    "a text file among the images": (
        lambda r: (r / "train/images/notes.txt").write_text("x"),
        "own/train/images/notes.txt is not a .png or .jpg image",
    ),
}


@pytest.mark.parametrize("damage", list(BAD))
def test_a_bad_file_is_named_and_nothing_is_written(project: Path, damage: str):
    write_image_folder(project / "own", {"train": 2, "test": 1})
    change, message = BAD[damage]
    change(project / "own")
    folder_params(project)
    refused(("prepare",), message)
    assert not (project / "data").exists()


def test_an_image_too_large_to_decode_safely_is_named(project: Path, monkeypatch):
    """PIL refuses images beyond twice its pixel limit as possible decompression bombs; that
    limit is lowered here so that the test's images reach it."""
    write_image_folder(project / "own", {"train": 2, "test": 1})
    folder_params(project)
    monkeypatch.setattr("PIL.Image.MAX_IMAGE_PIXELS", 100)
    refused(("prepare",), "own/train/images/s00.png is refused: Image size (768 pixels)")
    assert not (project / "data").exists()


def test_a_store_prepared_before_depth_scale_existed_still_matches(project: Path):
    """Its record has no `depth_scale`: it holds what the default gives."""
    write_image_folder(project / "own", {"train": 2, "test": 1})
    folder_params(project)
    assert kdmtl("prepare").exit_code == 0
    store = open_prepared(project / "data/prepared.zarr")
    record = {k: v for k, v in store.manifest.data_params.items() if k != "depth_scale"}
    older = PreparedStore(store.path, store.manifest.model_copy(update={"data_params": record}))
    config = DataParams(**FOLDER)
    older.check_matches(config)
    with pytest.raises(DataError, match=r"depth_scale 1000.0 \(params: 256.0\)"):
        older.check_matches(config.model_copy(update={"depth_scale": 256.0}))
