"""Damage to every kind of file of both stores: deleted, emptied, truncated or one byte flipped.

The command that reads the store must stop with one message naming the store and the remedy (never
read a missing chunk as zeros, never a traceback), and `kdmtl verify` must name the damage.
"""

import json
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from conftest import kdmtl, write_params


def delete(path: Path) -> None:
    path.unlink()


def empty(path: Path) -> None:
    path.write_bytes(b"")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGES = {"delete": delete, "empty": empty, "truncate": truncate, "flip": flip}

PREPARED = "data/prepared.zarr"
PREPARED_FILES = {
    "manifest": "zarr.json",
    "split group": "train/zarr.json",
    "array metadata": "train/depth/zarr.json",
    "train chunk": "train/depth/c/1/0/0/0",
    "test chunk": "test/depth/c/0/0/0/0",
}
FEATURES = "features/depth.zarr"
FEATURE_FILES = {
    "manifest": "zarr.json",
    "split group": "train/zarr.json",
    "array metadata": "train/decoder/zarr.json",
    "bottleneck shard": "train/bottleneck/c/0/0/0/0/0",
    "decoder shard": "train/decoder/c/0/0/0/0/0",
    "sample ids shard": "train/sample_id/c/0",
    "views shard": "train/views/c/0/0/0",
    "shard record": "train/written/c/0/0/0",
    "shard record metadata": "train/written/zarr.json",
}
CASES = [
    pytest.param(store, file, damage, id=f"{store.split('/')[0]}-{kind}-{name}")
    for store, files, reader in ((PREPARED, PREPARED_FILES, 0), (FEATURES, FEATURE_FILES, 1))
    for kind, file in files.items()
    for name, damage in DAMAGES.items()
]
READERS = {PREPARED: ("train-teacher", "--teacher", "depth"), FEATURES: ("train-student",)}
REMEDIES = {PREPARED: "`kdmtl prepare`", FEATURES: "`kdmtl extract-features --teacher depth`"}
# A shard file of its recorded size: a resume that checks sizes would keep it.
SHARD_FILES = {
    FEATURE_FILES[f"{kind} shard"] for kind in ("bottleneck", "decoder", "sample ids", "views")
}
IN_PLACE_REMEDY = "`kdmtl extract-features --teacher depth --check`"


def remedy(store: str, file: str, damage: Callable) -> str:
    return IN_PLACE_REMEDY if damage is flip and file in SHARD_FILES else REMEDIES[store]


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize(("store", "file", "damage"), CASES)
def test_corrupt_store_file_is_caught_by_its_reader_and_by_verify(
    outputs: Path, store: str, file: str, damage: Callable
):
    damage(outputs / store / file)
    expected = remedy(store, file, damage)

    read = kdmtl(*READERS[store])
    assert read.exit_code == 2, read.output
    refusal = one_error_line(read.output)
    assert store in refusal and expected in refusal

    verified = kdmtl("verify", store)
    assert verified.exit_code in (1, 2), verified.output
    assert "verified" not in verified.output
    if verified.exit_code == 1:
        assert "PROBLEM: " in verified.output
        assert store in verified.output
        last = verified.output.rstrip().splitlines()[-1]
        assert last.startswith("  to mend it: ") and expected in last
    else:
        line = one_error_line(verified.output)
        assert store in line and ("`kdmtl prepare" in line or "`kdmtl extract-features" in line)

    # The remedy named mends it.
    if "if it is a damaged kdmtl store, delete it, then" in refusal:
        shutil.rmtree(outputs / store)
    mended = kdmtl(*shlex.split(expected.strip("`"))[1:])
    assert mended.exit_code == 0, mended.output
    verified = kdmtl("verify", store)
    assert verified.exit_code == 0, verified.output


@pytest.mark.guard
def test_verify_passes_on_intact_stores(outputs: Path):
    for store in (PREPARED, FEATURES):
        result = kdmtl("verify", store)
        assert result.exit_code == 0, result.output
        assert result.output.rstrip().endswith("verified")
    assert "chunk files as written" in kdmtl("verify", PREPARED).output


def test_an_edited_manifest_is_refused_even_when_it_stays_valid(outputs: Path):
    manifest = outputs / FEATURES / "zarr.json"
    text = manifest.read_text()
    assert '"num_samples": 12' in text
    manifest.write_text(text.replace('"num_samples": 12', '"num_samples": 8'))
    result = kdmtl("verify", FEATURES)
    assert result.exit_code == 2
    assert "the manifest of features/depth.zarr was edited or damaged" in one_error_line(
        result.output
    )


def test_a_resealed_manifest_that_disagrees_with_the_arrays_is_refused(outputs: Path):
    """An edit made with kdmtl's own writer: the arrays' metadata still tell the truth."""
    from pipeline.store.features import FeatureStore
    from pipeline.store.manifest import write_manifest

    store = FeatureStore.open(outputs / FEATURES)
    info = store.manifest.features["decoder"]
    wider = info.model_copy(update={"shape": [*info.shape[:2], info.shape[2] + 1, *info.shape[3:]]})
    features = store.manifest.features | {"decoder": wider}
    write_manifest(store.path, store.manifest.model_copy(update={"features": features}))
    result = kdmtl("verify", FEATURES)
    assert result.exit_code == 1
    assert "PROBLEM: features/depth.zarr/train/decoder is float16" in result.output
    assert "the manifest says float16" in result.output
    refused = kdmtl("train-student")
    assert refused.exit_code == 2
    assert "feature store features/depth.zarr is damaged" in one_error_line(refused.output)


def test_extraction_rewrites_a_damaged_shard_of_a_complete_store(outputs: Path):
    delete(outputs / FEATURES / FEATURE_FILES["decoder shard"])
    result = kdmtl("extract-features", "--teacher", "depth")
    assert result.exit_code == 0, result.output
    assert "wrote 1 shards, 1 of them damaged before (12 samples" in result.output
    assert kdmtl("verify", FEATURES).exit_code == 0


def test_a_shard_damaged_in_place_is_written_again_with_check_as_it_was(outputs: Path):
    decoder = outputs / FEATURES / "train/decoder"
    before = zarr.open_array(decoder, mode="r")[:]
    flip(outputs / FEATURES / FEATURE_FILES["decoder shard"])
    # Its size is as recorded: a plain resume keeps it, and the store stays damaged.
    result = kdmtl("extract-features", "--teacher", "depth")
    assert result.exit_code == 0 and "wrote 0 shards" in result.output, result.output
    verified = kdmtl("verify", FEATURES)
    assert verified.exit_code == 1
    assert "decoder/c/0/0/0/0/0 differs from what was written (sha256)" in verified.output
    assert f"to mend it: write its damaged shards again ({IN_PLACE_REMEDY})" in verified.output
    result = kdmtl("extract-features", "--teacher", "depth", "--check")
    assert result.exit_code == 0, result.output
    assert "wrote 1 shards, 1 of them damaged before (12 samples" in result.output
    assert kdmtl("verify", FEATURES).exit_code == 0
    np.testing.assert_array_equal(zarr.open_array(decoder, mode="r")[:], before)
    # On an intact store, --check reads every shard and writes none.
    result = kdmtl("extract-features", "--teacher", "depth", "--check")
    assert result.exit_code == 0 and "wrote 0 shards (0 samples" in result.output, result.output


def test_corrupt_test_chunk_is_caught_by_evaluate(outputs: Path):
    flip(outputs / PREPARED / "test/semseg/c/0/0/0")
    result = kdmtl("evaluate")
    assert result.exit_code == 2, result.output
    line = one_error_line(result.output)
    assert "cannot read data/prepared.zarr/test/semseg: Stored and computed checksum" in line
    assert "run `kdmtl prepare` again" in line


def test_corrupt_chunk_met_in_a_reader_process_is_one_line(outputs: Path):
    """A DataLoader worker sends its error back with its traceback in the message."""
    params = yaml.safe_load((outputs / "params.yaml").read_text())
    params["loader"] = {"num_workers": 1}
    write_params(outputs, params)
    flip(outputs / PREPARED / PREPARED_FILES["train chunk"])
    result = kdmtl("train-teacher", "--teacher", "depth")
    assert result.exit_code == 2, result.output
    line = one_error_line(result.output)
    assert line.startswith("Error: cannot read data/prepared.zarr/train/depth: Stored and")
    assert "Original Traceback" not in result.output


@pytest.mark.parametrize("file", ["train/decoder/zarr.json", "train/written/zarr.json"])
def test_extraction_remakes_a_store_whose_metadata_is_damaged(outputs: Path, file: str):
    empty(outputs / FEATURES / file)
    result = kdmtl("extract-features", "--teacher", "depth")
    assert result.exit_code == 0, result.output
    assert "wrote 1 shards" in result.output
    assert kdmtl("verify", FEATURES).exit_code == 0


def test_a_store_made_by_an_older_kdmtl_says_so(outputs: Path):
    manifest = outputs / FEATURES / "zarr.json"
    metadata = json.loads(manifest.read_text())
    del metadata["attributes"]["kdmtl_seal"]
    manifest.write_text(json.dumps(metadata))
    result = kdmtl("train-student")
    assert result.exit_code == 2
    assert "was made by an older kdmtl (its manifest has no seal)" in one_error_line(result.output)
    assert kdmtl("extract-features", "--teacher", "depth").exit_code == 0
    assert kdmtl("train-student").exit_code == 0


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("nowhere.zarr", "no store at nowhere.zarr"),
        ("models", "models is not a kdmtl store, or its zarr.json is missing or damaged"),
    ],
)
def test_bad_input_verify_of_something_else_than_a_store(outputs: Path, path: str, message: str):
    result = kdmtl("verify", path)
    assert result.exit_code == 2
    assert message in one_error_line(result.output)
