"""`kdmtl train-teacher`: outputs, determinism, errors, and teachers that really learn."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_PARAMS, curve, curve_names, kdmtl, write_params

from pipeline.checkpoints import load_teacher
from schemas.checkpoint import TeacherMetadata


@pytest.fixture
def prepared(project: Path) -> Path:
    assert kdmtl("prepare").exit_code == 0
    return project


def test_writes_checkpoint_metrics_and_curves(prepared: Path):
    result = kdmtl("train-teacher", "--teacher", "depth")
    assert result.exit_code == 0, result.output
    assert "wrote models/teachers/depth.pt: test abs_err" in result.output
    assert "teacher depth epoch 2/2: loss" in result.output

    state = torch.load(prepared / "models/teachers/depth.pt", weights_only=True)
    metadata = TeacherMetadata.model_validate(state["metadata"])
    assert metadata.task == "depth"
    assert metadata.model.heads == {"depth": 1} and metadata.model.filters == [4, 8]
    assert metadata.train.epochs == 2
    model, _ = load_teacher(prepared / "models/teachers/depth.pt")
    assert not model.training

    log = prepared / "metrics/teachers/depth"
    summary = json.loads((log / "metrics.json").read_text())
    assert set(summary) == {"step", "train", "test", "baseline"} and summary["step"] == 2
    assert set(summary["test"]) == {"abs_err", "rel_err"} == set(summary["baseline"])
    assert summary["test"] == metadata.test_metrics
    assert curve_names(log) == {"train/loss", "test/abs_err"}
    loss = curve(log, "train/loss")
    assert list(loss) == [1, 2] and loss[1] > 0 and summary["train"]["loss"] == loss[2]
    assert curve(log, "test/abs_err")[2] == pytest.approx(summary["test"]["abs_err"])


def test_training_is_deterministic_on_cpu(prepared: Path):
    states = []
    for _ in range(2):
        assert kdmtl("train-teacher", "--teacher", "semseg").exit_code == 0
        states.append(torch.load(prepared / "models/teachers/semseg.pt", weights_only=True))
    first, second = (s["state_dict"] for s in states)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert states[0]["metadata"] == states[1]["metadata"]


def test_overrides_change_one_teacher_only(prepared: Path):
    write_params(
        prepared,
        TINY_PARAMS
        | {"teacher": {"epochs": 2, "batch_size": 4, "overrides": {"normal": {"epochs": 1}}}},
    )
    for task in ("normal", "depth"):
        assert kdmtl("train-teacher", "--teacher", task).exit_code == 0
    assert list(curve(prepared / "metrics/teachers/normal", "train/loss")) == [1]
    assert list(curve(prepared / "metrics/teachers/depth", "train/loss")) == [1, 2]


def test_unknown_teacher_lists_the_tasks(prepared: Path):
    result = kdmtl("train-teacher", "--teacher", "edges")
    assert result.exit_code == 2
    assert "'edges' is not one of the tasks in the params: semseg, depth, normal" in result.output
    assert not (prepared / "models").exists()


def test_missing_prepared_data_says_to_run_prepare(project: Path):
    result = kdmtl("train-teacher", "--teacher", "depth")
    assert result.exit_code == 2
    assert "no prepared dataset at data/prepared.zarr: run `kdmtl prepare` first" in result.output


def test_prepared_data_from_other_params_is_refused(prepared: Path):
    write_params(prepared, TINY_PARAMS | {"data": TINY_PARAMS["data"] | {"num_train": 8}})
    result = kdmtl("train-teacher", "--teacher", "depth")
    assert result.exit_code == 2
    assert "was prepared with other data params: num_train 12 (params: 8)" in result.output


def test_invalid_override_names_the_key(project: Path):
    write_params(project, {"teacher": {"overrides": {"depth": {"lr": -1}}}})
    result = kdmtl("train-teacher", "--teacher", "depth")
    assert result.exit_code == 2
    assert "overrides.depth.lr: Input should be greater than 0" in result.output


LEARNING = {
    "data": {"num_train": 128, "num_test": 32, "height": 24, "width": 32, "chunk_size": 16},
    "model": {"filters": [8, 16, 32]},
    "teacher": {"epochs": 10, "batch_size": 8, "lr": 0.003},
}


def test_teachers_beat_the_trivial_baseline(project: Path):
    """A small configuration; the default one must do better still (see BENCHMARKS.md)."""
    write_params(project, LEARNING)
    assert kdmtl("prepare").exit_code == 0
    reports = {}
    for task in ("semseg", "depth", "normal"):
        assert kdmtl("train-teacher", "--teacher", task).exit_code == 0
        path = project / "metrics" / "teachers" / task / "metrics.json"
        reports[task] = json.loads(path.read_text())
    semseg, depth, normal = reports["semseg"], reports["depth"], reports["normal"]
    assert semseg["test"]["mIoU"] > 2 * semseg["baseline"]["mIoU"]
    assert depth["test"]["abs_err"] < 0.7 * depth["baseline"]["abs_err"]
    assert normal["test"]["mean_angle"] < 0.75 * normal["baseline"]["mean_angle"]


def test_logging_outside_a_dvc_project_leaves_the_git_repository_alone(prepared: Path):
    """DVCLive, left to itself, would run `dvc init` in an enclosing git repository."""
    subprocess.run(["git", "init", "-q"], cwd=prepared, check=True)
    assert kdmtl("train-teacher", "--teacher", "depth").exit_code == 0
    assert not (prepared / ".dvc").exists()
    assert list(curve(prepared / "metrics/teachers/depth", "train/loss")) == [1, 2]
