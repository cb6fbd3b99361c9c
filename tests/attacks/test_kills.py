"""SIGKILL at the worst moments of each stage: nothing half-written is trusted, nothing is left
behind after the next run, and no report describes another checkpoint than the one in place.

Each case runs the command in a child process that kills itself (SIGKILL: no cleanup runs) right
before one function's n-th call (`conftest.killed`).
"""

import shutil
from pathlib import Path

import pytest
from conftest import kdmtl, killed

from pipeline.store.features import FeatureStore
from pipeline.store.prepared import open_prepared


def leftovers(folder: Path) -> list[Path]:
    return [
        p
        for p in folder.rglob("*")
        if any(tag in p.name for tag in (".partial", ".old-", ".creating-"))
    ]


def test_kill_while_preparing_keeps_the_old_store_and_the_rerun_cleans_up(outputs: Path):
    before = open_prepared(outputs / "data/prepared.zarr").manifest
    killed(outputs, "pipeline.data.scenes:ScenesSource.read", "prepare", nth=2)
    assert open_prepared(outputs / "data/prepared.zarr").manifest == before
    assert leftovers(outputs / "data")
    assert kdmtl("prepare").exit_code == 0
    assert leftovers(outputs / "data") == []
    assert open_prepared(outputs / "data/prepared.zarr").manifest.fingerprint == before.fingerprint


def test_kill_between_the_two_renames_of_a_replace(outputs: Path):
    # The old store is set aside; the new one is not yet in place.
    killed(outputs, "pathlib:Path.rename", "prepare", nth=2)
    assert not (outputs / "data/prepared.zarr").exists()
    assert any(".old-" in p.name for p in leftovers(outputs / "data"))
    refused = kdmtl("train-teacher", "--teacher", "depth")
    assert refused.exit_code == 2 and "run `kdmtl prepare` first" in refused.output
    assert kdmtl("prepare").exit_code == 0
    assert leftovers(outputs / "data") == []
    assert open_prepared(outputs / "data/prepared.zarr").problems(full=True) == []


def test_kill_while_creating_a_feature_store(outputs: Path):
    store = outputs / "features/depth.zarr"
    shutil.rmtree(store)
    killed(outputs, "pathlib:Path.rename", "extract-features", "--teacher", "depth")
    assert not store.exists()
    assert any(".creating-" in p.name for p in leftovers(outputs / "features"))
    assert kdmtl("extract-features", "--teacher", "depth").exit_code == 0
    assert leftovers(outputs / "features") == []
    assert kdmtl("verify", "features/depth.zarr").exit_code == 0


def test_kill_inside_a_chunk_write_leaves_a_temporary_file_that_the_rerun_removes(
    outputs: Path,
):
    # zarr writes each file to NAME.<uuid>.partial, then renames it into place.
    shutil.rmtree(outputs / "features/depth.zarr")
    killed(
        outputs,
        "pathlib:Path.replace",
        "extract-features",
        "--teacher",
        "depth",
        when="'/c/' in str(args[1]) and 'decoder' in str(args[1])",
    )
    store = FeatureStore.open(outputs / "features/depth.zarr")
    assert store.done_shards() == set()
    assert any(p.name.endswith(".partial") for p in leftovers(store.path))
    assert kdmtl("extract-features", "--teacher", "depth").exit_code == 0
    assert leftovers(store.path) == []
    assert kdmtl("verify", "features/depth.zarr").exit_code == 0


@pytest.mark.parametrize(
    ("command", "target", "reports"),
    [
        (
            ("train-teacher", "--teacher", "depth"),
            "stages.train_teacher:write_json",
            ["metrics/teachers/depth.json", "plots/teachers/depth/loss.json"],
        ),
        (
            ("train-student",),
            "stages.train_student:write_curves",
            ["plots/student/loss_depth.json"],
        ),
    ],
    ids=["teacher", "student"],
)
def test_kill_between_a_checkpoint_and_its_reports_leaves_no_stale_report(
    outputs: Path, command: tuple[str, ...], target: str, reports: list[str]
):
    for report in reports:
        assert (outputs / report).is_file()
    killed(outputs, target, *command)
    for report in reports:
        assert not (outputs / report).exists(), report
    assert kdmtl(*command).exit_code == 0
    for report in reports:
        assert (outputs / report).is_file(), report
