"""`kdmtl report`: the methods table over DVC experiments, from a saved JSON and from real ones."""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, TINY_PARAMS, copy_project, dvc, kdmtl, run
from PIL import Image

from pipeline.report import markdown_table, method_label, runs_from_experiments

TEACHERS = {"depth": {"abs_err": 0.5}, "semseg": {"mIoU": 0.5}}


def record(name: str, method: str, seed: int, miou: float, abs_err: float, **student) -> dict:
    report = {
        "delta_mtl": 100 * ((miou - 0.5) / 0.5 + (0.5 - abs_err) / 0.5) / 2,
        "delta_per_task": {"semseg": 0.0, "depth": 0.0},
        "student": {"semseg": {"mIoU": miou}, "depth": {"abs_err": abs_err}},
        "teachers": TEACHERS,
    }
    params = {"seed": 0, "student": {"method": method, "seed": seed, **student}}
    return {
        "rev": f"{name}-rev",
        "name": name,
        "data": {
            "params": {"params.yaml": {"data": params}},
            "metrics": {"metrics/eval.json": {"data": report}},
        },
    }


EXPERIMENTS = [
    {"rev": "workspace", "data": record("w", "kd", 1, 0.6, 0.4)["data"], "experiments": None},
    {
        **record("main", "kd", 0, 0.6, 0.5),
        "experiments": [
            {"revs": [record("a", "kd", 1, 0.4, 0.5)]},
            {"revs": [record("b", "ew", 0, 0.5, 0.6)]},
            {"revs": [record("c", "ew", 1, 0.5, 0.4)]},
            {"revs": [record("d", "kd", 1, 0.4, 0.5)]},  # a repeated: counts once
            {"revs": [record("e", "kd", 2, 0.5, 0.5, weighting="uw")]},
            {"revs": [{"rev": "f-rev", "name": "f", "data": {"metrics": {}}}]},  # failed run
            # Still running: it shows its baseline's metrics, which must not count as its own.
            {"executor": {"state": "running"}, "revs": [record("g", "uw", 0, 0.6, 0.5)]},
            {"executor": {"state": "success"}, "revs": [record("h", "dwa", 0, 0.5, 0.5)]},
        ],
    },
]


def test_method_labels():
    assert method_label({"student": {"method": "dwa"}}) == "dwa"
    assert method_label({"student": {"method": "kd", "weighting": "uw"}}) == "kd + uw"
    assert method_label({"student": {"method": "kd", "model": {"arch": "mtan"}}}) == "mtan: kd"
    assert method_label({"model": {"arch": "mtan"}, "student": {"method": "ew"}}) == "mtan: ew"


def test_runs_group_by_method_and_seed():
    runs = runs_from_experiments(EXPERIMENTS, "metrics/eval.json")
    assert sorted((r.method, r.seed) for r in runs) == [
        ("dwa", 0),
        ("ew", 0),
        ("ew", 1),
        ("kd", 0),
        ("kd", 1),
        ("kd + uw", 2),
    ]


def test_the_table_has_mean_and_std_over_seeds_and_the_teachers_row():
    table = markdown_table(runs_from_experiments(EXPERIMENTS, "metrics/eval.json"))
    lines = table.splitlines()
    assert lines[0] == "| method | seeds | semseg mIoU | depth abs_err | Δ_MTL (%) |"
    assert lines[2] == "| single-task teachers | | 0.5000 | 0.5000 | 0 |"
    # kd: mIoU 0.6 and 0.4, abs_err 0.5 and 0.5; Delta +10 and -10.
    assert "| kd | 0, 1 | 0.5000 ± 0.1414 | 0.5000 ± 0.0000 | +0.00 ± 14.14 |" in lines
    assert "| ew | 0, 1 | 0.5000 ± 0.0000 | 0.5000 ± 0.1414 | +0.00 ± 14.14 |" in lines
    assert "| kd + uw | 2 | 0.5000 | 0.5000 | +0.00 |" in lines


def test_no_evaluated_experiment_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps([{"rev": "workspace", "data": {"metrics": {}}}]))
    result = kdmtl("report", "--experiments", str(path), "--params", str(tmp_path / "p.yaml"))
    assert result.exit_code == 2  # the params file is missing
    (tmp_path / "p.yaml").write_text("{}")
    result = kdmtl("report", "--experiments", str(path), "--params", str(tmp_path / "p.yaml"))
    assert result.exit_code == 2
    assert "no experiment has metrics/eval.json" in result.output


def git(*args: str, cwd: Path) -> None:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dvc_experiments_from_a_fresh_commit_and_the_report(tmp_path: Path):
    copy_project(tmp_path, TINY_PARAMS)
    (tmp_path / ".gitignore").write_text((Path(__file__).parent.parent / ".gitignore").read_text())
    git("init", "-q", cwd=tmp_path)
    git("config", "user.email", "tests@kdmtl.invalid", cwd=tmp_path)
    git("config", "user.name", "kdmtl tests", cwd=tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    git("add", "-A", cwd=tmp_path)
    git("commit", "-qm", "first commit", cwd=tmp_path)
    dvc("exp", "run", "-S", "student.method=dwa", cwd=tmp_path)
    dvc("exp", "run", "-S", "student.method=ew", "-S", "student.seed=1", cwd=tmp_path)
    report = run(str(BIN / "kdmtl"), "report", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "| dwa | 0 |" in report.stdout and "| ew | 1 |" in report.stdout
    assert (tmp_path / "reports" / "methods.md").read_text() in report.stdout
    chart = Image.open(tmp_path / "reports" / "delta_mtl.png")
    assert chart.size[0] > 300 and chart.size[1] > 60


def test_report_outside_a_dvc_repository_says_why(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("{}")
    result = run(str(BIN / "kdmtl"), "report", cwd=tmp_path)
    assert result.returncode == 2
    assert "`dvc exp show --json` failed here" in result.stderr


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
