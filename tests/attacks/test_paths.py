"""Paths that point at someone's files: kdmtl replaces or deletes only what it made itself.

Each refusal is one message naming the path and the params key to change, exit status 2, and the
person's files are left byte for byte as they were.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import kdmtl, refused, tmpfs, write_params
from test_folder_sources import folder_params, make_dataset


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def someones_folder(path: Path) -> dict[str, bytes]:
    (path / "notes").mkdir(parents=True)
    (path / "thesis.tex").write_text("\\documentclass{article}\n")
    (path / "notes" / "todo.txt").write_text("back up the thesis\n")
    return snapshot(path)


def set_paths(project: Path, **paths: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["paths"] = params.get("paths", {}) | paths
    write_params(project, params)


def test_path_prepared_naming_someones_folder_is_refused(project: Path):
    mine = someones_folder(project / "mydata")
    set_paths(project, prepared="mydata")
    refused(("prepare",), "mydata exists and is not a readable kdmtl store", "paths.prepared")
    assert snapshot(project / "mydata") == mine


def test_path_prepared_naming_someones_file_is_refused(project: Path):
    (project / "results.csv").write_text("a,b\n1,2\n")
    set_paths(project, prepared="results.csv")
    refused(("prepare",), "results.csv exists and is not a readable kdmtl store")
    assert (project / "results.csv").read_text() == "a,b\n1,2\n"
    assert not list(project.glob("results.csv.*"))


def test_path_prepared_naming_a_feature_store_is_refused(outputs: Path):
    store = snapshot(outputs / "features/depth.zarr")
    set_paths(outputs, prepared="features/depth.zarr")
    refused(("prepare",), "features/depth.zarr exists and is a kdmtl.features store")
    assert snapshot(outputs / "features/depth.zarr") == store


def test_path_features_naming_someones_folder_is_refused(outputs: Path):
    mine = someones_folder(outputs / "mine" / "depth.zarr")
    set_paths(outputs, features="mine")
    refused(
        ("extract-features", "--teacher", "depth"),
        "mine/depth.zarr exists and is not a readable kdmtl store",
        "paths.features",
    )
    assert snapshot(outputs / "mine" / "depth.zarr") == mine


def test_path_features_equal_to_the_prepared_data_is_refused(project: Path):
    """Extraction would delete the data it reads."""
    set_paths(project, prepared="features/depth.zarr")
    assert kdmtl("prepare").exit_code == 0
    assert kdmtl("train-teacher", "--teacher", "depth").exit_code == 0
    prepared = snapshot(project / "features/depth.zarr")
    refused(
        ("extract-features", "--teacher", "depth"),
        "would replace features/depth.zarr (paths.prepared), which this command reads",
    )
    assert snapshot(project / "features/depth.zarr") == prepared


def test_path_features_inside_the_prepared_data_is_refused(outputs: Path):
    prepared = snapshot(outputs / "data/prepared.zarr")
    set_paths(outputs, features="data/prepared.zarr")
    refused(
        ("extract-features", "--teacher", "depth"),
        "lies inside the Zarr store data/prepared.zarr",
    )
    assert snapshot(outputs / "data/prepared.zarr") == prepared


@pytest.mark.parametrize(
    ("key", "command"),
    [("student", ("train-student",)), ("teachers", ("train-teacher", "--teacher", "depth"))],
)
def test_path_checkpoint_naming_someones_file_is_refused_before_training(
    outputs: Path, key: str, command: tuple[str, ...]
):
    if key == "student":
        mine = outputs / "README.md"
        set_paths(outputs, student="README.md")
    else:
        (outputs / "mine").mkdir()
        mine = outputs / "mine" / "depth.pt"
        set_paths(outputs, teachers="mine")
    mine.write_text("not a checkpoint\n")
    output = refused(command, f"{mine.relative_to(outputs)} exists and is not a kdmtl.", "move it")
    assert "epoch" not in output  # refused before training, not after
    assert mine.read_text() == "not a checkpoint\n"


def test_path_student_naming_a_teacher_checkpoint_is_refused(outputs: Path):
    teacher = (outputs / "models/teachers/depth.pt").read_bytes()
    set_paths(outputs, student="models/teachers/depth.pt")
    refused(("train-student",), "is not a kdmtl.student checkpoint kdmtl made")
    assert (outputs / "models/teachers/depth.pt").read_bytes() == teacher


def test_path_checkpoint_inside_a_store_is_refused(outputs: Path):
    """Extraction replaces a store whole: a checkpoint inside it would go with it."""
    store = snapshot(outputs / "features/depth.zarr")
    set_paths(outputs, teachers="features/depth.zarr")
    refused(
        ("train-teacher", "--teacher", "depth"),
        "features/depth.zarr/depth.pt lies inside the Zarr store features/depth.zarr",
    )
    assert snapshot(outputs / "features/depth.zarr") == store


def test_path_store_holding_someones_files_is_not_replaced(outputs: Path):
    """A store of other features is replaced whole; not when someone put files in it."""
    (outputs / "features/depth.zarr/train/notes.txt").write_text("mine\n")
    params = yaml.safe_load((outputs / "params.yaml").read_text())
    params["features"] = {"encoding": "float32"}
    write_params(outputs, params)
    refused(
        ("extract-features", "--teacher", "depth"),
        "features/depth.zarr holds files kdmtl did not write (features/depth.zarr/train/notes.txt)",
    )
    assert (outputs / "features/depth.zarr/train/notes.txt").read_text() == "mine\n"


@pytest.mark.parametrize("store", ["data/prepared.zarr", "features/depth.zarr"])
def test_path_store_that_is_a_symbolic_link_is_refused(outputs: Path, store: str):
    real = outputs / "elsewhere.zarr"
    (outputs / store).rename(real)
    (outputs / store).symlink_to(real)
    command = (
        ("prepare",) if store.startswith("data") else ("extract-features", "--teacher", "depth")
    )
    if store.startswith("features"):
        params = yaml.safe_load((outputs / "params.yaml").read_text())
        params["features"] = {"encoding": "float32"}
        write_params(outputs, params)
    before = snapshot(real)
    refused(command, f"{store} is a symbolic link")
    assert snapshot(real) == before and (outputs / store).is_symlink()


def test_path_training_log_folder_keeps_someones_files(outputs: Path):
    log = outputs / "metrics/student"
    (log / "notes.txt").write_text("keep me\n")
    (log / "plots/settings.json").write_text('{"theme": "dark"}\n')
    assert kdmtl("train-student").exit_code == 0
    assert (log / "notes.txt").read_text() == "keep me\n"
    assert (log / "plots/settings.json").read_text() == '{"theme": "dark"}\n'
    assert (log / "plots/metrics/train/loss_depth.tsv").is_file()


@pytest.mark.parametrize("name", ["params.yaml", "plots/metrics/notes.txt", "plots/images/a.png"])
def test_path_training_log_folder_with_a_file_dvclive_would_delete_is_refused(
    outputs: Path, name: str
):
    log = outputs / "metrics/teachers/depth"
    (log / name).parent.mkdir(parents=True, exist_ok=True)
    (log / name).write_text("keep me\n")
    before = snapshot(outputs)
    refused(("train-teacher", "--teacher", "depth"), "metrics/teachers/depth holds files that")
    assert snapshot(outputs) == before


def test_path_training_log_folder_that_is_a_file_is_refused(outputs: Path):
    shutil.rmtree(outputs / "metrics/student")
    (outputs / "metrics/student").write_text("mine\n")
    before = snapshot(outputs)
    refused(("train-student",), "metrics/student is a file, not a folder of training curves")
    assert snapshot(outputs) == before


def test_a_refused_prepare_leaves_no_empty_folder(project: Path):
    """The refusal comes while writing: a bad file among the test samples."""
    make_dataset(project / "raw", "nyuv2")
    np.save(project / "raw/val/depth/2.npy", np.full((12, 16, 1), np.nan, np.float32))
    folder_params(project, "nyuv2", project / "raw")
    refused(("prepare",), "raw/val/depth/2.npy holds NaN or infinite values")
    assert not (project / "data").exists()


def test_a_full_disk_while_preparing_leaves_nothing_half_written(project: Path):
    with tmpfs(project / "disk", "64k") as disk:
        set_paths(project, prepared="disk/prepared.zarr")
        result = kdmtl("prepare")
        assert result.exit_code == 1, result.output
        assert "no space left on the device" in result.output
        assert "Traceback" not in result.output
        assert list(disk.iterdir()) == []


def test_a_full_disk_while_extracting_stops_cleanly_and_resumes_elsewhere(outputs: Path):
    with tmpfs(outputs / "disk", "64k") as disk:
        set_paths(outputs, features="disk")
        result = kdmtl("extract-features", "--teacher", "depth")
        assert result.exit_code == 1, result.output
        assert "no space left on the device" in result.output
        assert "Traceback" not in result.output
        assert not [p for p in disk.rglob("*") if p.name.endswith(".partial")]


def test_path_training_log_folder_that_is_a_symbolic_link_is_refused(outputs: Path):
    (outputs / "metrics/student").rename(outputs / "elsewhere")
    (outputs / "metrics/student").symlink_to(outputs / "elsewhere")
    before = snapshot(outputs / "elsewhere")
    refused(("train-student",), "metrics/student is a symbolic link, not a folder of training")
    assert snapshot(outputs / "elsewhere") == before


def test_bad_input_dvclive_resume_is_refused_before_anything_is_touched(outputs: Path, monkeypatch):
    monkeypatch.setenv("DVCLIVE_RESUME", "true")
    before = snapshot(outputs)
    refused(("train-teacher", "--teacher", "depth"), "DVCLIVE_RESUME is set: DVCLive would add")
    assert snapshot(outputs) == before
