"""Feature stores: layout, exactness, resume after SIGKILL, shared extraction, checks, bad input."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import BIN, TINY_PARAMS, kdmtl, write_params

from pipeline.augment import apply_view, draw_views
from pipeline.checkpoints import load_checkpoint, load_teacher, save_checkpoint
from pipeline.files import sha256_file
from pipeline.store.checks import bytes_on_disk, lazy_feature
from pipeline.store.features import FeatureStore
from pipeline.store.manifest import seal_of, write_manifest
from pipeline.store.prepared import open_prepared
from schemas.checkpoint import TeacherMetadata
from stages.extract_features import parse_shard_of

# 12 training samples in chunks of 4, one chunk per shard: three shards.
FEATURE_PARAMS = TINY_PARAMS | {"features": {"shard_chunks": 1, "batch_size": 5}}
STORE = Path("features/depth.zarr")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Prepared data and depth and semseg teachers, made once for the module."""
    folder = tmp_path_factory.mktemp("trained")
    write_params(folder, FEATURE_PARAMS)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert kdmtl("prepare").exit_code == 0
        for task in ("depth", "semseg"):
            assert kdmtl("train-teacher", "--teacher", task).exit_code == 0
    finally:
        os.chdir(cwd)
    return folder


@pytest.fixture
def project(trained_copy: Path) -> Path:
    return trained_copy


def extract(*args: str) -> None:
    result = kdmtl("extract-features", "--teacher", "depth", *args)
    assert result.exit_code == 0, result.output


def arrays_of(path: Path) -> dict[str, np.ndarray]:
    return {
        name: zarr.open_array(path / "train" / name, mode="r")[:]
        for name in ("bottleneck", "decoder", "sample_id", "views", "written")
    }


def assert_same_arrays(a: Path, b: Path) -> None:
    first, second = arrays_of(a), arrays_of(b)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def recomputed(project: Path, index: int, view: np.ndarray) -> dict[str, np.ndarray]:
    teacher, _ = load_teacher(project / "models/teachers/depth.pt")
    image = open_prepared(project / "data/prepared.zarr").array("train", "image")[index]
    image, _ = apply_view(view, torch.from_numpy(image / np.float32(255)), {})
    with torch.inference_mode():
        features = teacher(image[None]).features
    return {name: f[0].numpy() for name, f in features.items()}


def test_extraction_writes_the_layout_and_manifest(project: Path):
    result = kdmtl("extract-features", "--teacher", "depth")
    assert result.exit_code == 0, result.output
    assert "wrote 3 shards (12 samples x 1 views" in result.output
    assert "the store is complete" in result.output
    assert "MB/s" in result.output and "samples/s" in result.output

    store = FeatureStore.open(project / STORE)
    manifest = store.manifest
    assert manifest.task == "depth" and manifest.complete
    assert manifest.teacher_fingerprint == sha256_file(project / "models/teachers/depth.pt")
    prepared = open_prepared(project / "data/prepared.zarr")
    assert manifest.prepared_fingerprint == prepared.manifest.fingerprint
    assert (manifest.num_shards, manifest.shard_size, manifest.chunk_size) == (3, 4, 4)
    bottleneck, decoder = store.array("bottleneck"), store.array("decoder")
    assert bottleneck.shape == (12, 1, 8, 4, 6)  # filters [4, 8]: two pools of 16 x 24
    assert decoder.shape == (12, 1, 4, 16, 24)
    assert decoder.dtype == np.float16
    assert decoder.chunks == (4, 1, 4, 16, 24) and decoder.shards == (4, 1, 4, 16, 24)
    prediction = store.array("prediction")  # the depth teacher's output, at the image's size
    assert prediction.shape == (12, 1, 1, 16, 24) and prediction.dtype == np.float16
    codecs = [c["name"] for c in manifest.features["decoder"].codecs]
    assert codecs == ["bytes", "blosc", "crc32c"]
    blosc = manifest.features["decoder"].codecs[1]["configuration"]
    assert (blosc["cname"], blosc["shuffle"]) == ("zstd", "shuffle")
    np.testing.assert_array_equal(store.array("sample_id")[:], np.arange(12))
    np.testing.assert_array_equal(store.array("views")[:, 0], np.tile([1, 0, 0, 0], (12, 1)))
    assert store.done_shards() == {0, 1, 2}
    # One file per shard and array: tens of files, however many samples.
    files = [p for p in (project / STORE).rglob("*") if p.is_file()]
    assert len(files) <= 3 * 5 + 3 + 9

    for index in (0, 7, 11):
        fresh = recomputed(project, index, np.array([1, 0, 0, 0], np.float32))
        for name in ("bottleneck", "decoder"):
            stored = store.array(name)[index, 0].astype(np.float32)
            np.testing.assert_allclose(stored, fresh[name], rtol=2**-10, atol=1e-4)


def test_float32_and_bit_rounding(project: Path):
    write_params(project, FEATURE_PARAMS | {"features": {"shard_chunks": 1, "encoding": "float32"}})
    extract()
    exact = FeatureStore.open(project / STORE)
    assert exact.array("decoder").dtype == np.float32
    full = exact.array("decoder")[:]
    write_params(project, FEATURE_PARAMS | {"features": {"shard_chunks": 1, "keep_bits": 3}})
    extract()
    rounded = FeatureStore.open(project / STORE)
    codecs = [c["name"] for c in rounded.manifest.features["decoder"].codecs]
    assert codecs == ["numcodecs.bitround", "bytes", "blosc", "crc32c"]
    values = rounded.array("decoder")[:]
    assert (values.view(np.uint16) & 0b1111111).max() == 0  # the 7 dropped mantissa bits
    np.testing.assert_allclose(values, full, rtol=2**-3, atol=1e-4)


def test_normalized_int8_stores_each_pixel_as_a_unit_vector_within_a_step(project: Path):
    extract()
    float16_disk = bytes_on_disk(project / STORE / "train")
    features = FEATURE_PARAMS["features"] | {"encoding": "normalized-int8"}
    write_params(project, FEATURE_PARAMS | {"features": features})
    extract()
    store = FeatureStore.open(project / STORE)
    assert store.manifest.encoding == "normalized-int8"
    assert store.array("decoder").dtype == np.int8
    assert bytes_on_disk(project / STORE / "train") < float16_disk
    for index in (0, 7, 11):
        fresh = recomputed(project, index, np.array([1, 0, 0, 0], np.float32))
        for name in ("bottleneck", "decoder"):
            stored = store.array(name)[index, 0]
            unit = fresh[name] / np.sqrt((fresh[name] ** 2).sum(axis=0) + 1e-6)
            # Rounding to the nearest step of 1/127, from the same teacher's features.
            np.testing.assert_allclose(stored / 127, unit, rtol=0, atol=0.5 / 127 + 1e-5)
            norms = np.sqrt(((stored / 127) ** 2).sum(axis=0))
            live = (fresh[name] ** 2).sum(axis=0) > 1e-3
            np.testing.assert_allclose(norms[live], 1, atol=0.02)
    lazy = lazy_feature(store, "decoder")
    assert lazy.dtype == np.float32
    np.testing.assert_allclose(lazy[3].compute(), store.array("decoder")[3] / 127, rtol=1e-6)

    text = kdmtl("inspect", str(STORE)).output
    assert "decoder: [12, 1, 4, 16, 24] stored as int8 (normalized-int8 encoding)" in text
    result = kdmtl("verify", str(STORE), "--checks", "3")
    assert result.exit_code == 0, result.output
    line = "ok: recomputed 3 sample views with the teacher (normalized-int8, fp32): max absolute"
    assert line in result.output
    assert "(tolerance 7.9e-03)" in result.output


def test_verify_catches_int8_values_off_by_more_than_a_step(project: Path):
    features = FEATURE_PARAMS["features"] | {"encoding": "normalized-int8"}
    write_params(project, FEATURE_PARAMS | {"features": features})
    extract()
    store = FeatureStore.open(project / STORE)
    decoder = store.array("decoder")
    for shard in range(3):  # rewritten through zarr and recorded: every checksum holds
        start, stop = store.shard_range(shard)
        decoder[start:stop] = np.clip(decoder[start:stop].astype(np.int16) + 2, -127, 127)
        store.mark_done(shard)
    result = kdmtl("verify", str(STORE), "--checks", "3")
    assert result.exit_code == 1
    assert "checksums ok" in result.output
    assert "PROBLEM: decoder differs from the teacher's recomputed features: absolute error" in (
        result.output
    )
    # Its files are as recorded: no resume would write it again.
    assert result.output.rstrip().endswith(
        "to mend it: delete features/depth.zarr, then extract the features again "
        "(`kdmtl extract-features --teacher depth`)"
    )


def test_a_store_without_an_encoding_in_its_manifest_is_refused(project: Path):
    """Stores written before encodings existed: their manifest is sealed, but lacks the key."""
    extract()
    group = zarr.open_group(project / STORE, mode="r+")
    record = dict(group.attrs["kdmtl"])
    del record["encoding"]
    group.attrs.update({"kdmtl": record, "kdmtl_seal": seal_of(record)})
    result = kdmtl("inspect", str(STORE))
    assert result.exit_code == 2
    assert (
        "features/depth.zarr has an invalid manifest (encoding: Field required; made by another "
        "kdmtl version?): run `kdmtl extract-features --teacher depth`" in result.output
    )
    extract()  # extraction replaces it: it is a kdmtl feature store
    assert FeatureStore.open(project / STORE).manifest.encoding == "float16"


def test_an_int8_store_of_a_teacher_that_gives_nan_names_the_teacher(project: Path):
    teacher, metadata = load_teacher(project / "models/teachers/depth.pt")
    with torch.no_grad():
        teacher.decoder[0][-1][1].weight[0] = float("nan")
    save_checkpoint(project / "models/teachers/depth.pt", teacher, metadata)
    features = FEATURE_PARAMS["features"] | {"encoding": "normalized-int8"}
    write_params(project, FEATURE_PARAMS | {"features": features})
    result = kdmtl("extract-features", "--teacher", "depth")
    assert result.exit_code == 2
    assert (
        "teacher depth's decoder feature is not finite in normalized-int8: the teacher itself "
        "gives NaN or Inf; check its checkpoint" in result.output
    )


def test_views_replay_exactly_what_the_teacher_saw(project: Path):
    data = FEATURE_PARAMS["data"] | {"augment": True}
    features = FEATURE_PARAMS["features"] | {"views": 3, "seed": 5}
    write_params(project, FEATURE_PARAMS | {"data": data, "features": features})
    extract()
    store = FeatureStore.open(project / STORE)
    assert store.manifest.views.views == 3 and store.manifest.views.augment
    views = store.array("views")[:]
    assert views.shape == (12, 3, 4)
    for index in (2, 9):
        np.testing.assert_array_equal(views[index], draw_views(5, index, 3, 16, 24, True))
        for view in range(3):
            fresh = recomputed(project, index, views[index, view])
            stored = store.array("decoder")[index, view].astype(np.float32)
            np.testing.assert_allclose(stored, fresh["decoder"], rtol=2**-10, atol=1e-4)
    assert not np.array_equal(views[:, 0], views[:, 1])


KILL = """
import os, signal, sys
import zarr
{patch}
from stages.cli import main
sys.argv = ["kdmtl", "extract-features", "--teacher", "depth"] + sys.argv[1:]
main()
"""

KILL_MID_SHARD = """
original = zarr.Array.__setitem__
writes = []
def write_then_die(self, key, value):
    original(self, key, value)
    writes.append(self.path)
    # Die inside the third shard: after its features, before its ids, views and flag.
    if len(writes) == 2 * 5 + 2:
        os.kill(os.getpid(), signal.SIGKILL)
zarr.Array.__setitem__ = write_then_die
"""


def run_python(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_run_killed_mid_shard_resumes_to_the_same_arrays(project: Path, tmp_path: Path):
    killed = run_python(KILL.format(patch=KILL_MID_SHARD), project)
    assert killed.returncode == -9, killed.stderr
    store = FeatureStore.open(project / STORE)
    assert store.done_shards() == {0, 1} and not store.manifest.complete

    result = kdmtl("extract-features", "--teacher", "depth")
    assert result.exit_code == 0, result.output
    assert "wrote 1 shards (4 samples" in result.output  # only the unfinished shard
    assert FeatureStore.open(project / STORE).manifest.complete

    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(project, uninterrupted, ignore=shutil.ignore_patterns("features"))
    os.chdir(uninterrupted)
    extract()
    assert_same_arrays(project / STORE, uninterrupted / STORE)


def test_two_processes_share_one_store(project: Path, tmp_path: Path):
    single = tmp_path / "single"
    shutil.copytree(project, single)
    os.chdir(single)
    extract()
    os.chdir(project)
    processes = [
        subprocess.Popen(
            [str(BIN / "kdmtl"), "extract-features", "--teacher", "depth", "--shard-of", part],
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for part in ("0/2", "1/2")
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert sum("the store is complete" in out for out, _ in outputs) >= 1
    assert FeatureStore.open(project / STORE).manifest.complete
    assert_same_arrays(project / STORE, single / STORE)
    assert not list(project.glob("features/*.creating-*"))


def test_one_of_two_parts_leaves_the_store_incomplete(project: Path):
    result = kdmtl("extract-features", "--teacher", "depth", "--shard-of", "1/2")
    assert result.exit_code == 0, result.output
    assert "1 of 3 shards are written so far" in result.output
    store = FeatureStore.open(project / STORE)
    assert store.done_shards() == {2} and not store.manifest.complete
    assert "1/3 shards written, INCOMPLETE" in kdmtl("inspect", str(STORE)).output
    check = kdmtl("verify", str(STORE))
    assert check.exit_code == 1
    assert "incomplete: 1 of 3 shards written" in check.output


def test_shard_of_comes_from_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert parse_shard_of(None) == (3, 4)
    assert parse_shard_of("0/2") == (0, 2)


@pytest.mark.parametrize("value", ["2/2", "a/b", "1", "-1/3"])
def test_bad_shard_of_is_a_usage_error(project: Path, value: str):
    result = kdmtl("extract-features", "--teacher", "depth", "--shard-of", value)
    assert result.exit_code == 2
    assert "is not I/N with 0 <= I < N" in result.output


def test_inspect_prints_sizes_and_statistics(project: Path):
    extract()
    text = kdmtl("inspect", str(STORE))
    assert text.exit_code == 0, text.output
    assert "teacher depth, 12 samples x 1 views (augment off), 3/3 shards written, complete" in (
        text.output
    )
    assert (
        "decoder: [12, 1, 4, 16, 24] stored as float16 (float16 encoding), codecs bytes + blosc "
        "+ crc32c" in text.output
    )
    summary = json.loads(kdmtl("inspect", str(STORE), "--json").output)
    decoder = summary["features"]["decoder"]
    assert decoder["bytes_raw_float32"] == 12 * 4 * 16 * 24 * 4
    assert 0 < decoder["ratio"] < 0.6
    values = FeatureStore.open(project / STORE).array("decoder")[:].astype(np.float64)
    assert decoder["zero_share"] == pytest.approx((values == 0).mean())
    channel_means = values.mean(axis=(0, 1, 3, 4))
    assert decoder["channel_mean"]["max"] == pytest.approx(channel_means.max(), rel=1e-9)
    assert decoder["nan"] == 0 and decoder["inf"] == 0
    # dask sees one block per shard, not per inner chunk.
    assert lazy_feature(FeatureStore.open(project / STORE), "decoder").chunks[0] == (4, 4, 4)


def test_verify_passes_on_a_good_store(project: Path):
    extract()
    result = kdmtl("verify", str(STORE), "--checks", "3")
    assert result.exit_code == 0, result.output
    assert "ok: manifest matches models/teachers/depth.pt (sha256)" in result.output
    assert "ok: read every chunk of 5 arrays (15 shard files): checksums ok" in result.output
    assert "ok: recomputed 3 sample views with the teacher" in result.output
    assert result.output.strip().endswith("verified")


def corrupt(shard_file: Path) -> None:
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard_file.write_bytes(bytes(data))


def test_a_corrupted_chunk_fails_verify_and_inspect(project: Path):
    extract()
    corrupt(project / STORE / "train" / "decoder" / "c" / "1" / "0" / "0" / "0" / "0")
    result = kdmtl("verify", str(STORE))
    assert result.exit_code == 1
    shard = "features/depth.zarr/train/decoder/c/1/0/0/0/0"
    assert f"PROBLEM: {shard} differs from what was written (sha256)" in result.output
    inspected = kdmtl("inspect", str(STORE))
    assert inspected.exit_code == 2
    assert "cannot read features/depth.zarr/train/decoder" in inspected.output
    assert "(`kdmtl extract-features --teacher depth --check`)" in inspected.output


def test_shards_damaged_in_place_and_missing_are_mended_by_one_checked_extraction(project: Path):
    extract()
    decoder = zarr.open_array(project / STORE / "train" / "decoder", mode="r")[:]
    corrupt(project / STORE / "train" / "decoder" / "c" / "1" / "0" / "0" / "0" / "0")
    (project / STORE / "train" / "bottleneck" / "c" / "2" / "0" / "0" / "0" / "0").unlink()
    result = kdmtl("verify", str(STORE))
    assert result.exit_code == 1
    assert "features/depth.zarr/train/bottleneck/c/2/0/0/0/0 is missing" in result.output
    assert "features/depth.zarr/train/decoder/c/1/0/0/0/0 differs from what" in result.output
    assert result.output.rstrip().endswith(
        "to mend it: write its damaged shards again "
        "(`kdmtl extract-features --teacher depth --check`)"
    )
    result = kdmtl("extract-features", "--teacher", "depth", "--check")
    assert result.exit_code == 0, result.output
    assert "wrote 2 shards, 2 of them damaged before (8 samples" in result.output
    assert kdmtl("verify", str(STORE)).exit_code == 0
    np.testing.assert_array_equal(
        zarr.open_array(project / STORE / "train" / "decoder", mode="r")[:], decoder
    )


def test_verify_names_a_stale_teacher_and_stale_data(project: Path):
    extract()
    _, metadata = load_checkpoint(project / "models/teachers/depth.pt", TeacherMetadata)
    teacher, _ = load_teacher(project / "models/teachers/depth.pt")
    with torch.no_grad():
        next(teacher.parameters()).add_(0.1)
    save_checkpoint(project / "models/teachers/depth.pt", teacher, metadata)
    result = kdmtl("verify", str(STORE))
    assert result.exit_code == 1
    assert "stale: teacher differs" in result.output

    write_params(project, FEATURE_PARAMS | {"data": FEATURE_PARAMS["data"] | {"seed": 9}})
    assert kdmtl("prepare").exit_code == 0
    result = kdmtl("verify", str(STORE))
    assert "stale: prepared data differs" in result.output


def test_extraction_replaces_a_store_of_another_teacher(project: Path):
    extract()
    other = FeatureStore.open(project / STORE)
    write_manifest(project / STORE, other.manifest.model_copy(update={"task": "semseg"}))
    refused = kdmtl("extract-features", "--teacher", "depth", "--shard-of", "0/2")
    assert refused.exit_code == 2
    assert "holds other features (task: 'semseg' (wanted 'depth'))" in refused.output
    extract()
    assert FeatureStore.open(project / STORE).manifest.task == "depth"


def test_a_process_of_several_refuses_a_damaged_store_and_one_process_remakes_it(
    project: Path,
):
    extract()
    (project / STORE / "train" / "decoder" / "zarr.json").write_bytes(b"")
    started = time.monotonic()
    refused = kdmtl("extract-features", "--teacher", "depth", "--shard-of", "0/2")
    assert time.monotonic() - started < 30  # a local store is never waited for
    assert refused.exit_code == 2
    assert "feature store features/depth.zarr is damaged: " in refused.output
    assert "decoder/zarr.json" in refused.output and "after waiting" not in refused.output
    assert "extract with one process, without --shard-of, which makes it anew" in refused.output
    assert (project / STORE / "train" / "decoder" / "zarr.json").read_bytes() == b""
    extract()
    assert kdmtl("verify", str(STORE)).exit_code == 0


def test_unknown_teacher_missing_checkpoint_and_missing_data(project: Path):
    unknown = kdmtl("extract-features", "--teacher", "edges")
    assert unknown.exit_code == 2 and "'edges' is not one of the tasks" in unknown.output
    missing = kdmtl("extract-features", "--teacher", "normal")
    assert missing.exit_code == 2
    assert "no teacher checkpoint at models/teachers/normal.pt: run `kdmtl train-teacher" in (
        missing.output
    )
    shutil.rmtree(project / "data")
    no_data = kdmtl("extract-features", "--teacher", "depth")
    assert no_data.exit_code == 2 and "run `kdmtl prepare` first" in no_data.output
    assert not (project / "features").exists()
    assert kdmtl("inspect", "features/none.zarr").exit_code == 2


def test_a_full_disk_stops_cleanly_and_the_run_resumes(project: Path, monkeypatch):
    original = zarr.Array.__setitem__
    writes = []

    def fill_up(self, key, value):
        writes.append(self.path)
        if len(writes) > 6:  # the second shard's first write (5 arrays, then its record)
            raise OSError(errno.ENOSPC, "No space left on device", "features/depth.zarr")
        original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", fill_up)
    result = kdmtl("extract-features", "--teacher", "depth")
    assert result.exit_code == 1
    assert "no space left on the device while writing features/depth.zarr" in result.output
    store = FeatureStore.open(project / STORE)
    assert not store.manifest.complete and store.done_shards() == {0}
    monkeypatch.setattr(zarr.Array, "__setitem__", original)
    extract()
    assert FeatureStore.open(project / STORE).manifest.complete


def test_float16_overflow_asks_for_float32(project: Path):
    teacher, metadata = load_teacher(project / "models/teachers/depth.pt")
    with torch.no_grad():
        teacher.decoder[0][-1][1].weight.mul_(1e6)  # the last decoder BatchNorm's scale
    save_checkpoint(project / "models/teachers/depth.pt", teacher, metadata)
    result = kdmtl("extract-features", "--teacher", "depth")
    assert result.exit_code == 2
    assert "decoder feature is not finite in float16" in result.output
    assert (
        "values beyond float16's range (65504): for the range, set features.encoding: float32"
        in (result.output)
    )
    assert not FeatureStore.open(project / STORE).manifest.complete
