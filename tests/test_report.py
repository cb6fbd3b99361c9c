"""`kdmtl report`: the methods table over DVC experiments, from a saved JSON and from real ones."""

import io
import json
import math
from pathlib import Path

import pytest
from conftest import BIN, kdmtl, run
from PIL import Image

from pipeline.report import (
    curves_chart,
    markdown_report,
    method_label,
    runs_from_experiments,
    teacher_sets,
)
from stages.report import RevisionFiles, run_curves

TEACHERS_A = {"semseg": ("aaaa111", 0.5), "depth": ("aaaa222", 0.5)}
TEACHERS_B = {"semseg": ("bbbb111", 0.7), "depth": ("bbbb222", 0.3)}


def record(
    name: str,
    method: str,
    seed: int,
    miou: float,
    abs_err: float,
    teachers: dict = TEACHERS_A,
    **student,
) -> dict:
    (semseg_hash, semseg_teacher), (depth_hash, depth_teacher) = teachers.values()
    semseg_delta = 100 * (miou - semseg_teacher) / semseg_teacher
    depth_delta = 100 * (depth_teacher - abs_err) / depth_teacher
    headline = {
        "delta_mtl": (semseg_delta + depth_delta) / 2,
        "semseg": {"mIoU": miou, "teacher_mIoU": semseg_teacher, "delta": semseg_delta},
        "depth": {"abs_err": abs_err, "teacher_abs_err": depth_teacher, "delta": depth_delta},
    }
    params = {"seed": 0, "student": {"method": method, "seed": seed, **student}}
    outs = {
        "models/teachers/semseg.pt": {"hash": semseg_hash},
        "models/teachers/depth.pt": {"hash": depth_hash},
    }
    return {
        "rev": f"{name}-rev-0123456789",
        "name": name,
        "data": {
            "params": {"params.yaml": {"data": params}},
            "metrics": {"metrics/eval.json": {"data": headline}},
            "outs": outs,
        },
    }


def runs_of(records: list[dict]):
    runs, notes = runs_from_experiments(records, "metrics/eval.json", "models/teachers")
    assert notes == []
    return runs


def workspace(record: dict) -> dict:
    return {"rev": "workspace", "data": record["data"], "experiments": None}


EXPERIMENTS = [
    workspace(record("w", "kd", 0, 0.6, 0.5)),  # the commit's own result, not yet changed
    {
        **record("main", "kd", 0, 0.6, 0.5),
        "experiments": [
            {"revs": [record("a", "kd", 1, 0.4, 0.5)]},
            {"revs": [record("d", "kd", 1, 0.4, 0.5)]},  # a repeated: counts once
            {"revs": [record("b", "ew", 0, 0.5, 0.6)]},
            {"revs": [record("c", "ew", 1, 0.5, 0.4)]},
            {"revs": [record("e", "kd", 2, 0.5, 0.5, weighting="uw")]},
            {"revs": [{"rev": "f-rev", "name": "f", "data": {"metrics": {}}}]},  # failed run
            # Still running: it shows its baseline's metrics, which must not count as its own.
            {"executor": {"state": "running"}, "revs": [record("g", "uw", 0, 0.6, 0.5)]},
            {"executor": {"state": "success"}, "revs": [record("h", "dwa", 0, 0.5, 0.5)]},
            # Other teachers: never in a row with the runs above.
            {"revs": [record("t1", "kd", 0, 0.7, 0.3, TEACHERS_B)]},
            {"revs": [record("t2", "kd", 1, 0.8, 0.2, TEACHERS_B)]},
            {"revs": [record("t3", "ew", 0, 0.6, 0.3, TEACHERS_B)]},
        ],
    },
]


def test_method_labels():
    assert method_label({"student": {"method": "dwa"}}) == "dwa"
    assert method_label({"student": {"method": "kd", "weighting": "uw"}}) == "kd + uw"
    assert method_label({"student": {"method": "kd", "model": {"arch": "mtan"}}}) == "mtan: kd"
    assert method_label({"model": {"arch": "mtan"}, "student": {"method": "ew"}}) == "mtan: ew"
    assert method_label({"student": {"method": "url", "weighting": "dwa"}}) == "url + dwa"
    on = {"weights": {"semseg": 1.0, "depth": 0.0}, "temperature": 2.0}
    assert method_label({"student": {"method": "url", "kd_outputs": on}}) == "url + outputs"
    off = {"weights": {"semseg": 0.0, "depth": 0.0}, "temperature": 2.0}
    assert method_label({"student": {"method": "kd", "kd_outputs": off}}) == "kd"


def test_output_distillation_params_name_only_the_rows_that_distil_outputs():
    def outputs(temperature: float, semseg: float = 1.0) -> dict:
        return {"kd_outputs": {"weights": {"semseg": semseg}, "temperature": temperature}}

    records = [
        record("a", "kd", 0, 0.6, 0.4, **outputs(1.0, semseg=0.0)),
        record("b", "kd", 0, 0.6, 0.4, **outputs(2.0)),
        record("c", "kd", 1, 0.6, 0.4, **outputs(2.0)),
        record("d", "url", 0, 0.6, 0.4, **outputs(2.0)),
    ]
    (only,) = teacher_sets(runs_of(records))
    assert sorted((row.label, tuple(row.seeds)) for row in only.rows) == [
        ("kd", (0,)),
        ("kd + outputs", (0, 1)),
        ("url + outputs", (0,)),
    ]
    records.append(record("e", "kd", 0, 0.6, 0.4, **outputs(4.0)))
    (only,) = teacher_sets(runs_of(records))
    assert sorted((row.label, tuple(row.seeds)) for row in only.rows) == [
        ("kd", (0,)),
        ("kd + outputs (student.kd_outputs.temperature=2.0)", (0, 1)),
        ("kd + outputs (student.kd_outputs.temperature=4.0)", (0,)),
        ("url + outputs (student.kd_outputs.temperature=2.0)", (0,)),
    ]


def test_params_a_method_does_not_use_neither_split_nor_label_rows():
    old_kd = {"adaptor_lr": 0.1}  # before adaptor_lr's null default: kd's own rate, listed
    records = [
        record("a", "kd", 0, 0.6, 0.4, **old_kd),
        record("b", "kd", 1, 0.6, 0.4, adaptor_lr=None, gradnorm_alpha=3.0),
        record("c", "url", 0, 0.6, 0.4, adaptor_lr=0.01),
        record("d", "url", 1, 0.6, 0.4, adaptor_lr=None),
        record("e", "ew", 0, 0.6, 0.4, adaptor_lr=0.5, kd_weights={"depth": 9.0}),
        record("f", "ew", 1, 0.6, 0.4, adaptor_lr=None, kd_source="online"),
        record("g", "gradnorm", 0, 0.6, 0.4, gradnorm_alpha=1.5),
    ]
    # The same run before and after adaptor_lr's null default counts once, from both places.
    records.append(record("k", "kd", 0, 0.6, 0.4, adaptor_lr=None))
    runs = runs_of(records)
    kd_seed_0 = [run for run in runs if run.seed == 0 and run.params["student"]["method"] == "kd"]
    assert [run.sources for run in kd_seed_0] == [("a (a-rev-0)", "k (k-rev-0)")]
    (only,) = teacher_sets(runs)
    assert sorted((row.label, tuple(row.seeds)) for row in only.rows) == [
        ("ew", (0, 1)),
        ("gradnorm", (0,)),
        ("kd", (0, 1)),
        ("url", (0, 1)),
    ]
    # Where a method uses them, they split rows as any param does.
    records += [
        record("h", "kd", 2, 0.6, 0.4, adaptor_lr=0.05),
        record("i", "gradnorm", 1, 0.6, 0.4, gradnorm_alpha=3.0),
        record("j", "kd", 0, 0.6, 0.4, weighting="gradnorm", gradnorm_alpha=3.0),
    ]
    (only,) = teacher_sets(runs_of(records))
    assert sorted((row.label, tuple(row.seeds)) for row in only.rows) == [
        ("ew", (0, 1)),
        ("gradnorm (student.gradnorm_alpha=1.5)", (0,)),
        ("gradnorm (student.gradnorm_alpha=3.0)", (1,)),
        ("kd (student.adaptor_lr=0.05)", (2,)),
        ("kd (student.adaptor_lr=None)", (0, 1)),
        ("kd + gradnorm (student.adaptor_lr=None, student.gradnorm_alpha=3.0)", (0,)),
        ("url (student.adaptor_lr=None)", (0, 1)),
    ]


def test_runs_count_once_and_say_where_they_come_from():
    runs = runs_of(EXPERIMENTS)
    sources = sorted(run.sources for run in runs)
    assert ("main (main-re)", "workspace") in sources  # the same run, shown twice by DVC
    assert ("a", "d") in sources
    assert ("g",) not in sources and ("f",) not in sources
    assert len(runs) == 9


def test_rows_never_mix_teachers():
    first, second = teacher_sets(runs_of(EXPERIMENTS))
    assert first.describe() == "Teachers A (checkpoints semseg aaaa111, depth aaaa222)"
    assert second.describe() == "Teachers B (checkpoints semseg bbbb111, depth bbbb222)"
    assert {(row.label, tuple(row.seeds)) for row in first.rows} == {
        ("kd", (0, 1)),
        ("ew", (0, 1)),
        ("kd + uw", (2,)),
        ("dwa", (0,)),
    }
    assert {(row.label, tuple(row.seeds)) for row in second.rows} == {("kd", (0, 1)), ("ew", (0,))}
    kd = next(row for row in second.rows if row.label == "kd")
    assert {s for run in kd.runs for s in run.sources} == {"t1", "t2"}


def test_a_rerun_with_other_metrics_counts_once_and_is_named():
    first = record("x", "kd", 0, 0.6, 0.4)
    rerun = record("y", "kd", 0, 0.61, 0.4)  # the same params and teachers, on another machine
    runs, notes = runs_from_experiments([first, rerun], "metrics/eval.json", "models/teachers")
    (run,) = runs
    assert run.sources == ("x (x-rev-0)", "y (y-rev-0)")
    assert run.headline.tasks["semseg"].student == 0.6
    assert notes == [
        "y (y-rev-0) has the params and teachers of x (x-rev-0) but other metrics (Delta_MTL "
        "+21.00 against +20.00): counted once, with x (x-rev-0)'s metrics"
    ]


def test_a_run_without_numbers_gets_nan_not_an_error():
    records = [record("x", "kd", 0, 0.6, 0.4), record("y", "kd", 1, math.nan, 0.4)]
    records.append(record("z", "ew", 0, 0.5, 0.5))
    (teachers,) = teacher_sets(runs_of(records))
    assert [row.label for row in teachers.rows] == ["ew", "kd"]  # NaN last
    assert math.isnan(teachers.rows[1].delta[0])
    assert "| kd | 0, 1 | nan ± nan |" in markdown_report([teachers])


def test_the_same_teachers_with_other_metrics_are_another_set():
    """Checkpoints DVC did not record (runs by hand): the teachers' metrics tell them apart."""
    by_hand = {"semseg": ("", 0.7), "depth": ("", 0.3)}
    by_hand_too = {"semseg": ("", 0.5), "depth": ("", 0.5)}
    records = [
        record("x", "kd", 0, 0.6, 0.4, by_hand),
        record("y", "kd", 1, 0.6, 0.4, by_hand_too),
    ]
    sets = teacher_sets(runs_of(records))
    assert [len(s.rows) for s in sets] == [1, 1]
    assert (
        sets[0].describe() == "Teachers A (checkpoints not recorded by DVC: told apart by metrics)"
    )
    # Recorded checkpoints are the teachers, whatever metrics they were evaluated to.
    recorded = {"semseg": ("aaaa111", 0.5), "depth": ("aaaa222", 0.5)}
    again = {"semseg": ("aaaa111", 0.5000001), "depth": ("aaaa222", 0.5)}
    records = [record("x", "kd", 0, 0.6, 0.4, recorded), record("y", "kd", 1, 0.6, 0.4, again)]
    (only,) = teacher_sets(runs_of(records))
    assert only.rows[0].seeds == [0, 1]


def test_a_student_without_a_model_of_its_own_has_the_teachers():
    teachers = {"arch": "segnet", "filters": [16, 32]}
    records = [
        record("x", "kd", 0, 0.6, 0.4),  # student.model null
        record("y", "kd", 1, 0.6, 0.4, model=teachers),
        record("z", "kd", 0, 0.6, 0.4, model={"arch": "segnet", "filters": [24, 48]}),
    ]
    for each in records:
        each["data"]["params"]["params.yaml"]["data"]["model"] = teachers
    (only,) = teacher_sets(runs_of(records))
    assert sorted((row.label, tuple(row.seeds)) for row in only.rows) == [
        ("kd (student.model.filters=[16, 32])", (0, 1)),
        ("kd (student.model.filters=[24, 48])", (0,)),
    ]


def test_runs_differing_in_another_param_get_rows_of_their_own():
    records = [
        record("x", "kd", 0, 0.6, 0.4),
        record("y", "kd", 1, 0.6, 0.4),
        record("z", "kd", 0, 0.6, 0.4, lr=0.01),
    ]
    (only,) = teacher_sets(runs_of(records))
    assert sorted((row.label, tuple(row.seeds)) for row in only.rows) == [
        ("kd (student.lr=0.01)", (0,)),
        ("kd (student.lr=None)", (0, 1)),
    ]


def test_the_table_has_mean_and_std_over_seeds_and_the_teachers_row():
    table = markdown_report(teacher_sets(runs_of(EXPERIMENTS)))
    lines = table.splitlines()
    assert lines[0] == "## Teachers A (checkpoints semseg aaaa111, depth aaaa222)"
    assert lines[2] == (
        "| method | seeds | semseg mIoU | semseg Δ (%) | depth abs_err | depth Δ (%) "
        "| Δ_MTL (%) | runs |"
    )
    assert lines[4] == "| single-task teachers |  | 0.5000 |  | 0.5000 |  | 0 |  |"
    # kd on teachers A: mIoU 0.6 and 0.4 (semseg delta +20, -20), abs_err 0.5 and 0.5.
    assert (
        "| kd | 0, 1 | 0.5000 ± 0.1414 | +0.00 ± 28.28 | 0.5000 ± 0.0000 | +0.00 ± 0.00 "
        "| +0.00 ± 14.14 | main (main-re), workspace; a, d |"
    ) in lines
    assert "| kd + uw | 2 | 0.5000 | +0.00 | 0.5000 | +0.00 | +0.00 | e |" in lines
    second = lines.index("## Teachers B (checkpoints semseg bbbb111, depth bbbb222)")
    assert lines[second + 4] == "| single-task teachers |  | 0.7000 |  | 0.3000 |  | 0 |  |"
    assert lines[second + 5].startswith("| kd | 0, 1 | 0.7500 ± 0.0707 |")
    assert lines[second + 5].endswith("| t1; t2 |")


def test_a_run_every_commit_lists_names_its_first_places_and_counts_the_rest():
    """With --all-commits, every commit since a run was made shows it."""
    commits = [record(f"c{i}", "kd", 0, 0.6, 0.4) for i in range(5)]
    table = markdown_report(teacher_sets(runs_of([*commits, record("x", "kd", 1, 0.6, 0.4)])))
    assert "| c0 (c0-rev-), c1 (c1-rev-) and 3 more; x (x-rev-0) |" in table


@pytest.mark.parametrize(
    ("headline", "problem"),
    [
        (
            {"delta_mtl": 1.0, "semseg": 3},
            "semseg: expected {METRIC, teacher_METRIC, delta} or {METRIC}",
        ),
        (
            {"delta_mtl": 1.0},
            "tasks: Dictionary should have at least 1 item after validation, not 0",
        ),
        (  # an older kdmtl's metrics/eval.json
            {"delta_mtl": 1.0, "delta_per_task": {}, "student": {}, "teachers": {}},
            "delta_per_task: expected {METRIC, teacher_METRIC, delta} or {METRIC}",
        ),
    ],
)
def test_a_run_whose_metrics_are_not_kdmtls_is_left_out_and_named(headline: dict, problem: str):
    broken = record("x", "kd", 0, 0.6, 0.4)
    broken["data"]["metrics"]["metrics/eval.json"]["data"] = headline
    good = record("y", "ew", 0, 0.6, 0.4)
    runs, notes = runs_from_experiments([broken, good], "metrics/eval.json", "models/teachers")
    assert [run.sources for run in runs] == [("y (y-rev-0)",)]
    assert notes == [
        f"x (x-rev-0) is left out: its metrics/eval.json is not kdmtl's evaluation ({problem}); "
        "run `kdmtl evaluate` (or `dvc repro`) there again"
    ]


def test_no_evaluated_experiment_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps([{"rev": "workspace", "data": {"metrics": {}}}]))
    result = kdmtl("report", "--experiments", str(path), "--params", str(tmp_path / "p.yaml"))
    assert result.exit_code == 2  # the params file is missing
    (tmp_path / "p.yaml").write_text("{}")
    result = kdmtl("report", "--experiments", str(path), "--params", str(tmp_path / "p.yaml"))
    assert result.exit_code == 2
    assert "no experiment has metrics/eval.json" in result.output


def test_report_outside_a_dvc_repository_says_why(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("{}")
    result = run(str(BIN / "kdmtl"), "report", cwd=tmp_path)
    assert result.returncode == 2
    assert "`dvc exp show --json` failed here" in result.stderr


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def write_curve(folder: Path, name: str, values: dict[int, float]) -> None:
    path = folder / "plots/metrics" / f"{name}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"step\t{name.split('/')[-1]}", *(f"{step}\t{value}" for step, value in values.items())]
    path.write_text("\n".join(rows) + "\n")


def test_curves_sum_the_task_losses_and_draw_a_line_per_row(tmp_path: Path):
    (run,) = runs_of([workspace(record("w", "kd", 0, 0.6, 0.4))])
    folder = tmp_path / "metrics/student"
    write_curve(folder, "train/loss_semseg", {1: 2.0, 2: 1.5})
    write_curve(folder, "train/loss_depth", {1: 0.5, 2: 0.25})
    write_curve(folder, "test/mIoU", {1: 0.3, 2: 0.6})
    files = RevisionFiles()  # no git repository here: the workspace's files only
    assert run_curves(run, files, "metrics/student") is None  # test/abs_err is missing
    write_curve(folder, "test/abs_err", {1: 0.5, 2: 0.4})
    curves = run_curves(run, files, "metrics/student")
    assert curves == {
        "loss": {1: 2.5, 2: 1.75},
        "mIoU": {1: 0.3, 2: 0.6},
        "abs_err": {1: 0.5, 2: 0.4},
    }
    picture = Image.open(io.BytesIO(curves_chart(teacher_sets([run]), {run.rev: curves})))
    assert picture.size == (1200, 340)
    blank = Image.open(io.BytesIO(curves_chart(teacher_sets([run]), {})))
    assert picture.tobytes() != blank.tobytes()
