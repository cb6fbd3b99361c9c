"""`kdmtl prepare`: the prepared store, its manifest, reproducibility, and the torch Dataset."""

import multiprocessing
from pathlib import Path

import dask.array
import numpy as np
import pytest
import torch
import zarr
from conftest import files_under, kdmtl, write_params

from pipeline.data.scenes import render_sample
from pipeline.errors import DataError
from pipeline.store.prepared import PreparedSplit, open_prepared


@pytest.fixture
def prepared(project: Path) -> Path:
    result = kdmtl("prepare")
    assert result.exit_code == 0, result.output
    return project / "data" / "prepared.zarr"


def test_prepare_writes_the_layout_and_manifest(prepared: Path):
    store = open_prepared(prepared)
    manifest = store.manifest
    assert manifest.source == "scenes"
    assert manifest.tasks == ["semseg", "depth", "normal"]
    assert manifest.num_classes == 7 and manifest.class_names[:3] == ["floor", "wall", "ceiling"]
    assert (manifest.height, manifest.width, manifest.chunk_size) == (16, 24, 4)
    expected = {
        "image": ((3, 16, 24), np.uint8),
        "semseg": ((16, 24), np.int16),
        "depth": ((1, 16, 24), np.float32),
        "normal": ((3, 16, 24), np.float32),
    }
    for split, count in (("train", 12), ("test", 6)):
        assert manifest.splits[split].num_samples == count
        for name, (shape, dtype) in expected.items():
            array = store.array(split, name)
            assert array.shape == (count, *shape)
            assert array.dtype == dtype
            assert array.chunks == (4, *shape)
            assert manifest.splits[split].arrays[name].shape == [count, *shape]
    assert len(manifest.fingerprint) == 64


def test_prepared_values_are_the_rendered_samples(prepared: Path):
    store = open_prepared(prepared)
    for split, index in (("train", 0), ("train", 11), ("test", 5)):
        sample = render_sample(0, split, index, 16, 24)
        for name in ("image", "semseg", "depth", "normal"):
            np.testing.assert_array_equal(store.array(split, name)[index], getattr(sample, name))


def test_prepare_is_byte_for_byte_reproducible(prepared: Path, project: Path):
    first = {p.relative_to(prepared): p.read_bytes() for p in files_under(prepared)}
    assert kdmtl("prepare").exit_code == 0
    second = {p.relative_to(prepared): p.read_bytes() for p in files_under(prepared)}
    assert first == second
    assert not list(project.glob("data/*.partial")) and not list(project.glob("data/*.old"))


def test_the_fingerprint_follows_the_content(prepared: Path, project: Path):
    fingerprint = open_prepared(prepared).manifest.fingerprint
    write_params(
        project,
        {
            "data": {
                "num_train": 12,
                "num_test": 6,
                "height": 16,
                "width": 24,
                "chunk_size": 4,
                "seed": 1,
            }
        },
    )
    assert kdmtl("prepare").exit_code == 0
    assert open_prepared(prepared).manifest.fingerprint != fingerprint


def test_dask_reads_a_lazy_array_of_the_right_shape(prepared: Path):
    images = dask.array.from_zarr(str(prepared), component="train/image")
    assert images.shape == (12, 3, 16, 24)
    assert images.dtype == np.uint8
    assert images.chunks[0] == (4, 4, 4)
    np.testing.assert_array_equal(images[5].compute(), zarr.open_array(prepared / "train/image")[5])


def test_a_corrupted_chunk_fails_at_read(prepared: Path):
    chunk = prepared / "train" / "depth" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    array = open_prepared(prepared).array("train", "depth")
    np.asarray(array[:4])  # other chunks still read
    with pytest.raises(ValueError, match="checksum"):
        np.asarray(array[4:8])


def test_dataset_yields_image_and_targets(prepared: Path):
    dataset = PreparedSplit(open_prepared(prepared), "train", ["semseg", "depth", "normal"])
    assert len(dataset) == 12
    item = dataset[6]
    assert item["index"] == 6
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 24)
    assert item["image"].min() >= 0 and item["image"].max() <= 1
    assert item["semseg"].dtype == torch.int64 and item["semseg"].shape == (16, 24)
    assert item["depth"].shape == (1, 16, 24) and item["normal"].shape == (3, 16, 24)
    sample = render_sample(0, "train", 6, 16, 24)
    np.testing.assert_array_equal(item["image"].numpy(), sample.image / np.float32(255))
    np.testing.assert_array_equal(item["semseg"].numpy(), sample.semseg)
    with pytest.raises(IndexError):
        dataset[12]


def test_dataset_reads_only_the_tasks_asked_and_refuses_missing_ones(prepared: Path):
    store = open_prepared(prepared)
    assert set(PreparedSplit(store, "test", ["depth"])[0]) == {"index", "image", "depth"}
    with pytest.raises(DataError, match="no 'edges' targets"):
        PreparedSplit(store, "test", ["edges"])


def test_dataset_works_in_spawned_workers(prepared: Path):
    dataset = PreparedSplit(open_prepared(prepared), "test", ["semseg", "depth"])
    dataset[0]  # opened here; workers must reopen lazily
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=3,
        num_workers=2,
        multiprocessing_context=multiprocessing.get_context("spawn"),
    )
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]
    assert batches[1]["depth"].shape == (3, 1, 16, 24)


def test_missing_prepared_store_says_to_run_prepare(tmp_path: Path):
    with pytest.raises(DataError, match="run `kdmtl prepare` first"):
        open_prepared(tmp_path / "data" / "prepared.zarr")


def test_a_store_without_manifest_is_incomplete(tmp_path: Path):
    zarr.open_group(tmp_path / "half.zarr", mode="w")
    with pytest.raises(DataError, match="no kdmtl manifest"):
        open_prepared(tmp_path / "half.zarr")
