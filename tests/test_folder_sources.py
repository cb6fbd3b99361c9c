"""Real datasets in the MTAN/LibMTL layout: values imported exactly, clear errors naming files."""

from pathlib import Path

import numpy as np
import pytest
from conftest import files_under, kdmtl, write_params

from pipeline.store.prepared import open_prepared

FOLDERS = {
    "nyuv2": ("image", "label", "depth", "normal"),
    "cityscapes": ("image", "label", "depth"),
}
CLASSES = {"nyuv2": 13, "cityscapes": 7}


def make_dataset(root: Path, source: str, counts=(5, 3), size=(12, 16), seed=0) -> dict:
    """Random samples in the layout; returns them as {split: {folder: [arrays]}}."""
    rng = np.random.default_rng(seed)
    height, width = size
    written = {}
    for split, count in zip(("train", "val"), counts, strict=True):
        written[split] = {folder: [] for folder in FOLDERS[source]}
        for i in range(count):
            normal = rng.normal(size=(height, width, 3))
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            depth = rng.uniform(0.5, 10, (height, width, 1))
            depth[0, :3] = 0
            arrays = {
                "image": rng.uniform(0, 1, (height, width, 3)),
                "label": rng.integers(-1, CLASSES[source], (height, width)).astype(np.float32),
                "depth": depth.astype(np.float32),
                "normal": normal.astype(np.float32),
            }
            for folder in FOLDERS[source]:
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / split / folder / f"{i}.npy", arrays[folder])
                written[split][folder].append(arrays[folder])
    return written


def folder_params(project: Path, source: str, root: Path, **data) -> None:
    tasks = ["semseg", "depth", "normal"] if source == "nyuv2" else ["semseg", "depth"]
    config = {"source": source, "root": str(root), "num_train": None, "num_test": None}
    config |= {"height": 12, "width": 16, "chunk_size": 2} | data
    teacher = {"trained": tasks}
    write_params(
        project, {"tasks": tasks, "teacher": teacher, "data": config, "model": {"filters": [4, 8]}}
    )


@pytest.mark.parametrize("source", ["nyuv2", "cityscapes"])
def test_import_keeps_the_values(project: Path, source: str):
    written = make_dataset(project / "raw", source)
    folder_params(project, source, project / "raw")
    result = kdmtl("prepare")
    assert result.exit_code == 0, result.output
    store = open_prepared(project / "data" / "prepared.zarr")
    assert store.manifest.source == source
    assert store.manifest.num_classes == CLASSES[source]
    assert store.manifest.splits["train"].num_samples == 5
    assert store.manifest.splits["test"].num_samples == 3  # val becomes test
    for split, folder_split in (("train", "train"), ("test", "val")):
        raw = written[folder_split]
        images = np.stack(raw["image"]).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(store.array(split, "image")[:], np.round(images * 255))
        np.testing.assert_array_equal(store.array(split, "semseg")[:], np.stack(raw["label"]))
        np.testing.assert_array_equal(
            store.array(split, "depth")[:], np.stack(raw["depth"]).transpose(0, 3, 1, 2)
        )
        if source == "nyuv2":
            np.testing.assert_array_equal(
                store.array(split, "normal")[:], np.stack(raw["normal"]).transpose(0, 3, 1, 2)
            )
    assert ("normal" in store.manifest.tasks) == (source == "nyuv2")


def test_num_train_takes_the_first_samples(project: Path):
    written = make_dataset(project / "raw", "nyuv2")
    folder_params(project, "nyuv2", project / "raw", num_train=2)
    assert kdmtl("prepare").exit_code == 0
    depth = open_prepared(project / "data" / "prepared.zarr").array("train", "depth")[:]
    assert depth.shape[0] == 2
    np.testing.assert_array_equal(depth[1, 0], written["train"]["depth"][1][..., 0])


def test_other_sizes_are_resized_keeping_labels_and_invalid_depth_exact(project: Path):
    make_dataset(project / "raw", "nyuv2", size=(24, 32))
    folder_params(project, "nyuv2", project / "raw", height=12, width=16)
    assert kdmtl("prepare").exit_code == 0
    store = open_prepared(project / "data" / "prepared.zarr")
    raw_label = np.load(project / "raw" / "train" / "label" / "0.npy")
    # Nearest-exact halving keeps the second pixel of each pair.
    np.testing.assert_array_equal(store.array("train", "semseg")[0], raw_label[1::2, 1::2])
    normal = store.array("train", "normal")[:]
    np.testing.assert_allclose(np.linalg.norm(normal, axis=1), 1, atol=1e-5)
    assert store.array("train", "image").shape == (5, 3, 12, 16)


def assert_fails_cleanly(project: Path, expected: str) -> None:
    before = files_under(project)
    result = kdmtl("prepare")
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert files_under(project) == before
    assert not (project / "data").exists() or not any((project / "data").iterdir())


def test_missing_root_folder(project: Path):
    folder_params(project, "nyuv2", project / "nowhere")
    assert_fails_cleanly(project, f"missing folder {project / 'nowhere' / 'train' / 'image'}")


def test_root_is_required(project: Path):
    write_params(project, {"data": {"source": "nyuv2"}})
    assert_fails_cleanly(project, "data.root must name the nyuv2 folder")


def test_missing_file(project: Path):
    make_dataset(project / "raw", "nyuv2")
    (project / "raw" / "val" / "depth" / "2.npy").unlink()
    folder_params(project, "nyuv2", project / "raw")
    assert_fails_cleanly(project, f"missing file {project / 'raw' / 'val' / 'depth' / '2.npy'}")


def test_unreadable_file(project: Path):
    make_dataset(project / "raw", "nyuv2")
    bad = project / "raw" / "val" / "normal" / "1.npy"
    bad.write_bytes(b"not a numpy file")
    folder_params(project, "nyuv2", project / "raw")
    assert_fails_cleanly(project, f"cannot read {bad}")


def test_shape_disagreeing_with_siblings(project: Path):
    make_dataset(project / "raw", "nyuv2")
    bad = project / "raw" / "train" / "label" / "3.npy"
    np.save(bad, np.zeros((12, 15), np.float32))
    folder_params(project, "nyuv2", project / "raw")
    assert_fails_cleanly(project, f"{bad} has shape (12, 15), expected (12, 16)")


def test_labels_out_of_range(project: Path):
    make_dataset(project / "raw", "cityscapes")
    bad = project / "raw" / "train" / "label" / "0.npy"
    np.save(bad, np.full((12, 16), 7, np.float32))
    folder_params(project, "cityscapes", project / "raw")
    assert_fails_cleanly(
        project, f"{bad} holds label 7.0; expected integers from -1 (ignored) to 6"
    )


def test_image_values_outside_unit_range(project: Path):
    make_dataset(project / "raw", "nyuv2")
    bad = project / "raw" / "train" / "image" / "4.npy"
    np.save(bad, np.full((12, 16, 3), 255.0))
    folder_params(project, "nyuv2", project / "raw")
    assert_fails_cleanly(project, f"{bad} has values outside [0, 1]")


def test_more_samples_asked_than_the_folder_holds(project: Path):
    make_dataset(project / "raw", "nyuv2")
    folder_params(project, "nyuv2", project / "raw", num_train=9)
    assert_fails_cleanly(project, "data.num_train is 9 but")


def test_cityscapes_has_no_normals(project: Path):
    make_dataset(project / "raw", "cityscapes")
    write_params(project, {"data": {"source": "cityscapes", "root": str(project / "raw")}})
    assert_fails_cleanly(project, "data source 'cityscapes' has no 'normal' targets")
