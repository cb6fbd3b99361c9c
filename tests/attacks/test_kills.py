"""SIGKILL at the worst moments of each stage: nothing half-written is trusted, nothing is left
behind after the next run, and no finished report describes another checkpoint than the one in
place (a training run's curves show it while it runs: killed, they show the epochs it finished).

Each case runs the command in a child process that kills itself (SIGKILL: no cleanup runs) right
before one function's n-th call (`conftest.killed`).
"""

import json
import shutil
from pathlib import Path

import pytest
from conftest import OUTPUT_PARAMS, curve, kdmtl, killed, write_params

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
    ("command", "checkpoint", "log", "curve_name"),
    [
        (
            ("train-teacher", "--teacher", "depth"),
            "models/teachers/depth.pt",
            "metrics/teachers/depth",
            "train/loss",
        ),
        (("train-student",), "models/student.pt", "metrics/student", "train/loss_depth"),
    ],
    ids=["teacher", "student"],
)
def test_kill_while_training_keeps_the_checkpoint_and_the_rerun_starts_the_curves_anew(
    outputs: Path,
    command: tuple[str, ...],
    checkpoint: str,
    log: str,
    curve_name: str,
):
    two_epochs = {"epochs": 2, "batch_size": 4}
    write_params(outputs, OUTPUT_PARAMS | {"teacher": two_epochs, "student": two_epochs})
    before = (outputs / checkpoint).read_bytes()
    killed(outputs, "stages.common:TrainingLog.epoch", *command, nth=2)
    assert (outputs / checkpoint).read_bytes() == before
    # The old checkpoint's curves went when the run started; the killed run's show its epoch 1.
    assert list(curve(outputs / log, curve_name)) == [1]
    assert kdmtl(*command).exit_code == 0
    assert list(curve(outputs / log, curve_name)) == [1, 2]
    assert json.loads((outputs / log / "metrics.json").read_text())["step"] == 2


def test_kill_between_a_checkpoint_and_its_final_metrics_leaves_no_stale_summary(outputs: Path):
    killed(outputs, "stages.common:TrainingLog.final", "train-teacher", "--teacher", "depth")
    summary = json.loads((outputs / "metrics/teachers/depth/metrics.json").read_text())
    assert "baseline" not in summary  # the new run's, unfinished: not the old checkpoint's
    assert kdmtl("train-teacher", "--teacher", "depth").exit_code == 0
    summary = json.loads((outputs / "metrics/teachers/depth/metrics.json").read_text())
    assert set(summary["baseline"]) == {"abs_err", "rel_err"}
