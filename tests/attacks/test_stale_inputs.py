"""Inputs made with other params or other teachers: every later step notices and says what to run.

A changed params key must never let a step quietly use outputs made before the change.
"""

from pathlib import Path

import pytest
import yaml
from conftest import kdmtl, refused, write_params


def change(project: Path, section: str, **values) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section] = params.get(section, {}) | values
    write_params(project, params)


@pytest.mark.parametrize(
    "command",
    [
        ("train-teacher", "--teacher", "depth"),
        ("extract-features", "--teacher", "depth"),
        ("train-student",),
    ],
)
def test_stale_data_seed_is_noticed_by_every_step(outputs: Path, command: tuple[str, ...]):
    change(outputs, "data", seed=7)
    refused(command, "was prepared with other data params: seed 0 (params: 7)", "kdmtl prepare")


def test_stale_prepared_data_changes_the_fingerprint(outputs: Path):
    before = (outputs / "data/prepared.zarr/zarr.json").read_text()
    change(outputs, "data", seed=7)
    assert kdmtl("prepare").exit_code == 0
    assert (outputs / "data/prepared.zarr/zarr.json").read_text() != before
    refused(("extract-features", "--teacher", "depth"), "trained on other prepared data")


@pytest.mark.parametrize(
    ("features", "fragment"),
    [
        ({"encoding": "float32"}, "stored as float16 with keep_bits None (params: float32"),
        (
            {"encoding": "normalized-int8"},
            "stored as float16 with keep_bits None (params: normalized-int8",
        ),
        ({"keep_bits": 5}, "(params: float16, keep_bits 5)"),
    ],
    ids=["float32", "normalized-int8", "keep_bits"],
)
def test_stale_feature_params_are_noticed_by_the_student(
    outputs: Path, features: dict, fragment: str
):
    change(outputs, "features", **features)
    refused(("train-student",), "feature store features/", fragment, "kdmtl extract-features")


@pytest.mark.guard
@pytest.mark.parametrize(
    "features", [{"clevel": 5}, {"compressor": "lz4"}, {"shard_chunks": 2}, {"seed": 3}]
)
def test_feature_params_that_leave_the_values_alone_are_accepted(outputs: Path, features: dict):
    """Compression and sharding change only the bytes on disk; without augmentation every view
    is the image itself, whatever the views' seed."""
    change(outputs, "features", **features)
    result = kdmtl("train-student")
    assert result.exit_code == 0, result.output


def test_stale_views_from_augmentation_are_noticed_by_the_student(outputs: Path):
    change(outputs, "data", augment=True)
    refused(("train-student",), "augment=True")


def test_evaluate_refuses_teachers_other_than_those_distilled_from(outputs: Path):
    change(outputs, "teacher", lr=0.002)
    assert kdmtl("train-teacher", "--teacher", "depth").exit_code == 0
    refused(
        ("evaluate",),
        "models/student.pt was distilled from another depth teacher than models/teachers/depth.pt",
        "kdmtl train-student",
    )


@pytest.mark.guard
def test_evaluate_accepts_the_teachers_distilled_from(outputs: Path):
    result = kdmtl("evaluate")
    assert result.exit_code == 0, result.output
    assert "Delta_MTL" in result.output
