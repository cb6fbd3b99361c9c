"""The params file: defaults, partial files, and one clear message with exit 2 for bad input."""

from pathlib import Path

import pytest
import yaml
from conftest import REPO, files_under, kdmtl, write_params

from schemas.params import Params
from stages.common import load_params, validation_context


def test_every_key_has_a_default_and_the_repo_params_are_the_defaults():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    repo = Params.model_validate(raw, context=validation_context())
    # The repository lists an empty override per task, for DVC to track each one.
    assert all(not changes for changes in repo.teacher.overrides.values())
    no_overrides = repo.teacher.model_copy(update={"overrides": {}})
    assert repo.model_copy(update={"teacher": no_overrides}) == Params()


def test_a_params_file_may_list_only_the_keys_it_changes(tmp_path: Path):
    params = load_params(write_params(tmp_path, {"data": {"num_train": 40}}))
    assert params.data.num_train == 40
    assert params.data.num_test == Params().data.num_test
    assert params.tasks == ["semseg", "depth", "normal"]
    assert params.paths.prepared == "data/prepared.zarr"


def test_an_empty_params_file_means_all_defaults(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("")
    assert load_params(tmp_path / "params.yaml") == Params()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"data": {"num_train": -5}}, "data.num_train: Input should be greater than or equal to 1"),
        ({"data": {"height": "tall"}}, "data.height: Input should be a valid integer"),
        ({"data": {"colour": 1}}, "data.colour: unknown key; allowed: source, root, seed"),
        (
            {"epochz": 3},
            "epochz: unknown key; allowed: seed, device, tasks, data, loader, model, teacher",
        ),
        ({"tasks": ["semseg", "edges"]}, "'edges' is not a task; allowed: semseg, depth, normal"),
        ({"tasks": ["depth", "depth"]}, "tasks repeat a name"),
        ({"tasks": []}, "tasks: List should have at least 1 item"),
        ({"device": "gpu"}, "'gpu' is not a device; allowed: auto, cpu, cuda, cuda:N"),
        (
            {"loader": {"resident": "gpu"}},
            "loader.resident: Input should be 'auto', 'ram', 'device' or 'off'",
        ),
        ({"loader": {"memory_budget_gb": True}}, "loader.memory_budget_gb: "),
        (
            {"features": {"dtype": "float32"}},
            "features: features.dtype is now features.encoding: write encoding: float32",
        ),
        (
            {"features": {"encoding": "int8"}},
            "'int8' is not a feature encoding; allowed: float32, float16, normalized-int8",
        ),
        (
            {"features": {"encoding": "normalized-int8", "keep_bits": 4}},
            "keep_bits rounds float mantissas, and normalized-int8 stores integers: use null",
        ),
        (
            {"features": {"keep_bits": 10}},
            "keep_bits must be below the 10 mantissa bits of float16 (got 10)",
        ),
        ({"loader": {"memory_budget_gb": 0}}, "loader.memory_budget_gb: Input should be greater"),
        (
            {"data": {"source": "kitti"}},
            "'kitti' is not a data source; allowed: scenes, nyuv2, cityscapes",
        ),
        (
            {"data": {"source": "cityscapes", "root": "x"}},
            "data source 'cityscapes' has no 'normal' targets; it provides semseg, depth",
        ),
    ],
)
def test_invalid_params_exit_2_with_one_message_and_write_nothing(project, params, expected):
    write_params(project, params)
    before = files_under(project)
    result = kdmtl("prepare")
    assert result.exit_code == 2
    assert expected in result.output
    assert "Traceback" not in result.output
    assert files_under(project) == before


def test_the_message_shows_the_offending_value(project):
    write_params(project, {"data": {"num_train": -5}})
    assert "(got -5)" in kdmtl("prepare").output


def test_yaml_syntax_errors_and_non_mappings_are_reported(project):
    (project / "params.yaml").write_text("data: [unclosed\n")
    result = kdmtl("prepare")
    assert result.exit_code == 2 and "is not valid YAML" in result.output
    (project / "params.yaml").write_text("- a\n- b\n")
    result = kdmtl("prepare")
    assert result.exit_code == 2 and "must hold a mapping of keys, not list" in result.output


def test_a_missing_params_file_is_reported(project):
    (project / "params.yaml").unlink()
    result = kdmtl("prepare")
    assert result.exit_code == 2
    assert (
        "params.yaml not found: run kdmtl in the project folder or pass --params" in result.output
    )


def test_params_option_reads_another_file(project):
    data = {"num_train": 4, "num_test": 4, "height": 8, "width": 8}
    other = write_params(project, {"data": data, "model": {"filters": [4, 8]}}, "other.yaml")
    write_params(project, {"data": {"num_train": -1}})  # ./params.yaml is invalid and not read
    result = kdmtl("prepare", "--params", str(other))
    assert result.exit_code == 0, result.output
    assert "train 4, test 4 samples of 8x8" in result.output
