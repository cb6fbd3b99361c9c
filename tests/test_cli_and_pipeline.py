"""The command line as installed, the DVC pipeline, and the direction of imports between layers."""

import ast
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
    write_repo_params,
)

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
    assert reading_params == set(main.commands) - {"inspect"}


def test_the_console_script_is_installed(tmp_path: Path):
    result = run(str(BIN / "kdmtl"), "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "prepare" in result.stdout


def test_dvc_repro_reruns_only_what_changed_and_loses_nothing(tmp_path: Path):
    copy_project(tmp_path, TINY_PARAMS)
    dvc("init", "--no-scm", "-q", cwd=tmp_path)
    first = dvc("repro", cwd=tmp_path)
    for task in ("semseg", "depth", "normal"):
        for stage in ("train_teacher", "extract_features"):
            assert f"Running stage '{stage}@{task}'" in first
    assert FeatureStore.open(tmp_path / "features" / "normal.zarr").manifest.complete
    assert "Running stage 'train_student'" in first and "Running stage 'evaluate'" in first
    assert (tmp_path / "metrics" / "eval.json").is_file()
    store = open_prepared(tmp_path / "data" / "prepared.zarr")
    assert store.manifest.splits["train"].num_samples == 12
    assert {p.name for p in (tmp_path / "models" / "teachers").iterdir()} == {
        "semseg.pt",
        "depth.pt",
        "normal.pt",
    }

    assert "didn't change, skipping" in dvc("repro", cwd=tmp_path)
    metrics = dvc("metrics", "show", cwd=tmp_path)
    assert "metrics/teachers/depth.json" in metrics and "test.mIoU" in metrics
    dvc("plots", "show", cwd=tmp_path)
    html = (tmp_path / "dvc_plots" / "index.html").read_text()
    assert "plots/teachers/normal/test_mean_angle.json" in html
    assert "plots/student/dist_depth.decoder.json" in html
    assert "predictions.png" in html
    assert "delta_mtl" in metrics

    teacher = TINY_PARAMS["teacher"] | {
        "overrides": {"semseg": {}, "depth": {"lr": 0.01}, "normal": {}}
    }
    write_repo_params(tmp_path, TINY_PARAMS | {"teacher": teacher})
    again = dvc("repro", cwd=tmp_path)
    assert "Running stage 'train_teacher@depth'" in again
    assert "Running stage 'extract_features@depth'" in again
    assert "Running stage 'train_student'" in again
    assert "Running stage 'train_teacher@semseg'" not in again
    assert "Running stage 'train_teacher@normal'" not in again

    loses_nothing_to_a_params_mistake_and_resumes_an_extraction(tmp_path)


def outputs_of(folder: Path) -> dict[str, bytes]:
    kept = ("data", "models", "features", "metrics", "plots")
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for name in kept
        for p in (folder / name).rglob("*")
        if p.is_file()
    }


def loses_nothing_to_a_params_mistake_and_resumes_an_extraction(tmp_path: Path) -> None:
    """Under `dvc repro`, on a project whose pipeline has run."""
    before = outputs_of(tmp_path)

    # A typo: DVC reruns the student's stage, kdmtl refuses the params, nothing is deleted.
    params = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(params.replace("kd_source:", "kd_sorce:"))
    failed = run(sys.executable, "-m", "dvc", "repro", cwd=tmp_path)
    assert failed.returncode != 0
    assert "student.kd_sorce: unknown key" in failed.stdout + failed.stderr
    assert outputs_of(tmp_path) == before

    # An extraction killed after its first shard resumes under `dvc repro`.
    (tmp_path / "params.yaml").write_text(params.replace("shard_chunks: 4", "shard_chunks: 1"))
    target = "pipeline.store.features:FeatureStore.mark_done"
    killed(tmp_path, target, "extract-features", "--teacher", "depth", nth=2)
    resumed = dvc("repro", cwd=tmp_path)
    assert "features/depth.zarr: wrote 2 shards (8 samples" in resumed
    assert "features/semseg.zarr: wrote 3 shards (12 samples" in resumed
    verified = run(str(BIN / "kdmtl"), "verify", "features/depth.zarr", cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


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
