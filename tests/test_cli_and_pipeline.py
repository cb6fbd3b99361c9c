"""The command line as installed, the DVC pipeline, and the direction of imports between layers."""

import ast
import json
import re
import sys
from pathlib import Path

import click
import pytest
from conftest import (
    BIN,
    REPO,
    TINY_PARAMS,
    copy_project,
    dvc,
    kdmtl,
    killed,
    run,
)
from own_data import write_image_folder, write_teacher
from PIL import Image

from pipeline.report import flatten_params
from pipeline.store.features import FeatureStore
from pipeline.store.prepared import open_prepared
from stages.cli import main


def test_help_lists_every_command_with_a_description():
    result = kdmtl("--help")
    assert result.exit_code == 0
    for name, command in main.commands.items():
        assert name in result.output
        assert command.get_short_help_str(), f"{name} has no description"
        help_text = kdmtl(name, "--help").output
        for option in command.params:
            if isinstance(option, click.Option):
                assert option.help, f"{name} {option.name} has no help"
                assert option.opts[0] in help_text
    reading_params = {
        n for n, c in main.commands.items() if any(p.name == "params" for p in c.params)
    }
    # inspect, predict and export read a store or a checkpoint, anywhere.
    assert reading_params == set(main.commands) - {"inspect", "predict", "export"}


def test_the_console_script_is_installed(tmp_path: Path):
    result = run(str(BIN / "kdmtl"), "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "prepare" in result.stdout


def git(*args: str, cwd: Path) -> None:
    result = run("git", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr


FRESH_CLONE_PARAMS = TINY_PARAMS | {
    "data": {"source": "folder", "root": "own", "height": 16, "width": 24, "chunk_size": 4},
    "features": {"shard_chunks": 1},
}


def fresh_clone(folder: Path) -> None:
    """The pipeline as a fresh clone holds it (a git repository with DVC, and no outputs), on a
    folder of the user's images, with the user's own depth teacher beside two that kdmtl
    trains."""
    write_image_folder(folder / "own", {"train": 12, "test": 6})
    depth = write_teacher(folder)
    teacher = TINY_PARAMS["teacher"] | {
        "trained": ["semseg", "normal"],
        "imported": {"depth": depth},
    }
    copy_project(folder, FRESH_CLONE_PARAMS | {"teacher": teacher})
    (folder / ".gitignore").write_text((REPO / ".gitignore").read_text())
    git("init", "-q", cwd=folder)
    git("config", "user.email", "tests@kdmtl.invalid", cwd=folder)
    git("config", "user.name", "kdmtl tests", cwd=folder)
    dvc("init", "-q", cwd=folder)
    git("add", "-A", cwd=folder)
    git("commit", "-qm", "fresh clone", cwd=folder)


def test_dvc_pipeline_and_experiments_from_a_fresh_clone(tmp_path: Path):
    """The README's way, on a user's own data and teacher: an extraction killed midway, then
    `dvc repro` (which resumes it), commit, experiments, `kdmtl report`; then a params mistake
    under `dvc repro`."""
    fresh_clone(tmp_path)
    assert "Running stage 'prepare'" in dvc("repro", "prepare", cwd=tmp_path)
    target = "pipeline.store.features:FeatureStore.mark_done"
    killed(tmp_path, target, "extract-features", "--teacher", "depth", nth=2)

    first = dvc("repro", cwd=tmp_path)
    for task in ("semseg", "normal"):
        for stage in ("train_teacher", "extract_features"):
            assert f"Running stage '{stage}@{task}'" in first
    assert "train_teacher@depth" not in first and "extract_features@depth" not in first
    assert "Running stage 'extract_imported@depth'" in first
    assert "features/depth.zarr: wrote 2 shards (8 samples" in first  # resumed after 1 of 3
    assert "features/semseg.zarr: wrote 3 shards (12 samples" in first
    assert FeatureStore.open(tmp_path / "features" / "depth.zarr").manifest.complete
    assert "Running stage 'train_student'" in first and "Running stage 'evaluate'" in first
    store = open_prepared(tmp_path / "data" / "prepared.zarr")
    assert store.manifest.source == "folder"
    assert store.manifest.splits["train"].num_samples == 12
    teachers = {p.name for p in (tmp_path / "models" / "teachers").iterdir()}
    assert teachers == {"semseg.pt", "normal.pt"}
    verified = run(str(BIN / "kdmtl"), "verify", "features/depth.zarr", cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "didn't change, skipping" in dvc("repro", cwd=tmp_path)

    # The headline only: Delta_MTL, and per task the main metrics of student and teacher.
    metrics = dvc("metrics", "show", "--json", cwd=tmp_path)
    (shown,) = json.loads(metrics).values()
    assert list(shown["data"]) == ["metrics/eval.json"]
    assert set(flatten_params(shown["data"]["metrics/eval.json"]["data"])) == {
        "delta_mtl",
        "semseg.delta",
        "depth.delta",
        "normal.delta",
        "semseg.mIoU",
        "semseg.teacher_mIoU",
        "depth.abs_err",
        "depth.teacher_abs_err",
        "normal.mean_angle",
        "normal.teacher_mean_angle",
    }
    dvc("plots", "show", cwd=tmp_path)
    html = (tmp_path / "dvc_plots" / "index.html").read_text()
    assert "metrics/teachers/normal/plots/metrics/test/mean_angle.tsv" in html
    assert "metrics/student/plots/metrics/train/dist_depth.decoder.tsv" in html
    assert "predictions.png" in html

    git("add", "-A", cwd=tmp_path)
    git("commit", "-qm", "pipeline outputs", cwd=tmp_path)
    # As the README says: beside the workspace, which stays at the commit. "+" adds a key.
    dvc("exp", "run", "--temp", "-n", "plain-ew", "-S", "student.method=ew", cwd=tmp_path)
    semseg_lr = ("-n", "semseg-lr", "-S", "+teacher.overrides.semseg.lr=0.01")
    other = dvc("exp", "run", "--temp", *semseg_lr, cwd=tmp_path)
    assert "Running stage 'train_teacher@semseg'" in other
    assert "Running stage 'extract_features@semseg'" in other
    assert "Running stage 'train_teacher@normal'" not in other
    assert "Running stage 'extract_imported@depth'" not in other

    report = run(str(BIN / "kdmtl"), "report", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "reports" / "methods.md").read_text()
    assert table in report.stdout and "note:" not in report.stdout
    # Rows never mix teachers: the commit's (also the workspace's) and plain-ew's share theirs,
    # semseg-lr has its own; each row names its runs.
    kd_rows = [line for line in table.splitlines() if line.startswith("| kd | 0 |")]
    assert len(kd_rows) == 2, table
    first, second = table.split("## Teachers ")[1:]
    commit = next(line for line in first.splitlines() if line.startswith("| kd | 0 |"))
    assert re.search(r"\| \w+ \([0-9a-f]{7}\), workspace \|$", commit), table  # branch (commit)
    assert "| ew | 0 |" in first and first.count("plain-ew") == 1
    assert second.startswith("B") and "semseg-lr |" in second and "| ew |" not in second
    assert "3 runs, 2 sets of teachers" in report.stdout
    for name in ("delta_mtl.png", "curves.png"):
        picture = Image.open(tmp_path / "reports" / name)
        assert picture.size[0] > 300 and picture.size[1] > 60

    # A workspace whose params changed since its outputs were made is not a run.
    params = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(params.replace("kd_source: cache", "kd_source: online"))
    report = run(str(BIN / "kdmtl"), "report", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "note: the workspace is left out: its outputs are not those of its params" in (
        report.stdout
    )
    assert "workspace |" not in (tmp_path / "reports" / "methods.md").read_text()
    (tmp_path / "params.yaml").write_text(params)

    # A typo: DVC reruns the student's stage, kdmtl refuses the params, nothing is deleted.
    before = outputs_of(tmp_path)
    (tmp_path / "params.yaml").write_text(params.replace("kd_source:", "kd_sorce:"))
    failed = run(sys.executable, "-m", "dvc", "repro", cwd=tmp_path)
    assert failed.returncode != 0
    assert "student.kd_sorce: unknown key" in failed.stdout + failed.stderr
    assert outputs_of(tmp_path) == before


def outputs_of(folder: Path) -> dict[str, bytes]:
    kept = ("data", "models", "features", "metrics", "plots", "reports")
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for name in kept
        for p in (folder / name).rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize("preset", sorted((REPO / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_every_params_preset_resolves_the_pipeline(tmp_path: Path, preset: Path):
    """`cp params/PRESET.yaml params.yaml && dvc repro` must at least build the stages: dvc.yaml
    reads keys (tasks, teacher.trained, teacher.imported, paths) that the preset must list."""
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (tmp_path / "params.yaml").write_text(preset.read_text())
    git("init", "-q", cwd=tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    stages = dvc("stage", "list", cwd=tmp_path)
    assert "train_teacher@semseg" in stages and "evaluate" in stages


LAYERS = {"schemas": set(), "pipeline": {"schemas"}, "stages": {"pipeline", "schemas"}}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_imports_point_one_way(layer: str):
    ours = set(LAYERS)
    for path in (REPO / layer).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in ours and top != layer:
                    assert top in LAYERS[layer], f"{path} imports {name}"
