"""Imported teachers: a module of the user's, not a kdmtl architecture, distilled through the
whole pipeline; its features, predictions and fingerprint checked against the module itself."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, TINY_PARAMS, kdmtl, refused, write_params
from own_data import TEACHER_CODE, build_teacher, write_image_folder, write_teacher
from safetensors.torch import save_file

from pipeline.checkpoints import load_student
from pipeline.errors import KdmtlError
from pipeline.store.extract import feature_shapes
from pipeline.store.features import FeatureStore
from pipeline.store.prepared import open_prepared
from pipeline.teachers import import_teacher, imported_fingerprint
from pipeline.teachers.imported import ImportedTeacher
from schemas.params import ImportedTeacherParams, Params
from stages.common import validation_context

DATA = {"source": "folder", "root": "own", "num_train": None, "num_test": None, "chunk_size": 2}
DATA |= {"height": 16, "width": 24}


def params(project: Path, teacher: dict, tasks=("semseg", "depth"), **student) -> dict:
    trained = [t for t in tasks if t != "depth"]
    values = TINY_PARAMS | {
        "tasks": list(tasks),
        "data": DATA,
        "teacher": TINY_PARAMS["teacher"] | {"trained": trained, "imported": {"depth": teacher}},
        "student": TINY_PARAMS["student"] | student,
    }
    write_params(project, values)
    return values


def run_all(*steps: tuple[str, ...]) -> None:
    for step in steps:
        result = kdmtl(*step)
        assert result.exit_code == 0, (step, result.output)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> Path:
    """Folder data, a trained semseg teacher and an imported depth teacher, both extracted, a kd
    student, its evaluation."""
    project = tmp_path_factory.mktemp("imported")
    write_image_folder(project / "own", {"train": 6, "test": 4})
    params(project, write_teacher(project))
    cwd = os.getcwd()
    os.chdir(project)
    try:
        run_all(
            ("prepare",),
            ("train-teacher", "--teacher", "semseg"),
            ("extract-features", "--teacher", "semseg"),
            ("extract-features", "--teacher", "depth"),
            ("train-student",),
            ("evaluate",),
        )
    finally:
        os.chdir(cwd)
    return project


@pytest.fixture
def copy(distilled: Path, tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "project"
    shutil.copytree(distilled, folder)
    monkeypatch.chdir(folder)
    return folder


def test_the_store_holds_the_modules_own_features_and_names_what_made_them(copy: Path):
    store = FeatureStore.open(copy / "features/depth.zarr")
    record = store.manifest.imported
    assert record is not None and record.factory == "build" and record.kwargs == {"width": 6}
    assert record.taps == {"bottleneck": "encoder", "decoder": "decoder"}
    assert store.manifest.teacher_fingerprint == imported_fingerprint(record)

    module = build_teacher(copy, width=6)
    prepared = open_prepared(copy / "data/prepared.zarr")
    images = torch.from_numpy(prepared.array("train", "image")[:] / np.float32(255))
    with torch.no_grad():
        bottleneck = module.encoder(images)
        decoder = module.decoder(bottleneck)
    stored = {
        name: store.array(name)[:, 0].astype(np.float32) for name in ("bottleneck", "decoder")
    }
    np.testing.assert_allclose(stored["bottleneck"], bottleneck.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(stored["decoder"], decoder.numpy(), rtol=1e-3, atol=1e-3)

    verified = kdmtl("verify", "features/depth.zarr")
    assert verified.exit_code == 0, verified.output
    assert "ok: manifest matches teacher.imported.depth" in verified.output
    inspected = kdmtl("inspect", "features/depth.zarr")
    assert "teacher depth (imported: teachers/depth_net.py:build), 6 samples" in inspected.output


def test_evaluation_compares_with_the_modules_own_predictions(copy: Path):
    report = json.loads((copy / "metrics/details/eval.json").read_text())
    module = build_teacher(copy, width=6)
    prepared = open_prepared(copy / "data/prepared.zarr")
    images = torch.from_numpy(prepared.array("test", "image")[:] / np.float32(255))
    target = torch.from_numpy(prepared.array("test", "depth")[:])
    with torch.no_grad():
        prediction = module(images)
    valid = target != 0
    abs_err = (prediction[valid] - target[valid]).abs().double().mean().item()
    assert report["teachers"]["depth"]["abs_err"] == pytest.approx(abs_err, rel=1e-5)
    assert set(report["teachers"]) == {"semseg", "depth"}
    assert (
        report["teacher_checkpoints"]["depth"]
        == FeatureStore.open(copy / "features/depth.zarr").manifest.teacher_fingerprint
    )


def test_new_weights_make_the_store_stale_and_extraction_replaces_it(copy: Path):
    save_file(build_teacher(copy, width=6, seed=1).state_dict(), "teachers/depth_net.safetensors")
    refused(("train-student",), "features/depth.zarr cannot be used: teacher differs")
    verified = kdmtl("verify", "features/depth.zarr")
    assert verified.exit_code == 1 and "stale: teacher differs" in verified.output
    refused(("evaluate",), "was distilled from another depth teacher than")
    run_all(("extract-features", "--teacher", "depth"))
    assert kdmtl("verify", "features/depth.zarr").exit_code == 0


def test_online_distillation_runs_the_imported_teacher(copy: Path):
    values = yaml.safe_load((copy / "params.yaml").read_text())
    values["student"]["kd_source"] = "online"
    write_params(copy, values)
    run_all(("train-student",))
    _, metadata = load_student(copy / "models/student.pt")
    store = FeatureStore.open(copy / "features/depth.zarr")
    assert metadata.distilled_from["depth"] == store.manifest.teacher_fingerprint
    assert "dist_depth.decoder" in (copy / "metrics/student/metrics.json").read_text()


def test_an_imported_teacher_is_not_trained(copy: Path):
    refused(
        ("train-teacher", "--teacher", "depth"),
        "the depth teacher is imported (teacher.imported.depth): kdmtl does not train it",
    )


def test_a_teacher_without_predictions_leaves_its_task_out_of_delta_mtl(project: Path):
    """Depth alone, imported, without `output`: the student is evaluated against ground truth."""
    write_image_folder(project / "own", {"train": 4, "test": 2}, tasks=("depth",))
    params(project, write_teacher(project) | {"output": None}, tasks=("depth",))
    run_all(("prepare",), ("extract-features", "--teacher", "depth"), ("train-student",))
    result = kdmtl("evaluate")
    assert result.exit_code == 0, result.output
    assert "no teacher gives predictions" in result.output
    headline = json.loads((project / "metrics/eval.json").read_text())
    assert headline["delta_mtl"] is None and set(headline["depth"]) == {"abs_err"}
    details = json.loads((project / "metrics/details/eval.json").read_text())
    assert details["teachers"] == {} and set(details["student"]["depth"]) == {"abs_err", "rel_err"}


@pytest.fixture
def prepared_copy(distilled: Path, tmp_path: Path, monkeypatch) -> Path:
    """The prepared data and the teacher's files, nothing else."""
    folder = tmp_path / "fresh"
    for name in ("own", "data", "teachers", "params.yaml"):
        source = distilled / name
        if source.is_dir():
            shutil.copytree(source, folder / name)
        else:
            shutil.copy(source, folder / name)
    monkeypatch.chdir(folder)
    return folder


def set_teacher(project: Path, **changes) -> None:
    values = yaml.safe_load((project / "params.yaml").read_text())
    values["teacher"]["imported"]["depth"] |= changes
    write_params(project, values)


def test_pickled_weights_are_refused_unloaded(prepared_copy: Path):
    module = build_teacher(prepared_copy, width=6)
    torch.save(module.state_dict(), "teachers/old.pt", _use_new_zipfile_serialization=False)
    torch.save(torch.nn.Conv2d(3, 3, 1), "teachers/module.pt")  # a module: its class pickled
    for name in ("old.pt", "module.pt"):
        set_teacher(prepared_copy, weights=f"teachers/{name}")
        refused(
            ("extract-features", "--teacher", "depth"),
            f"cannot use teachers/{name}: it holds pickled Python objects; kdmtl loads weights "
            "only",
            "safetensors.torch.save_file",
        )
    assert not (prepared_copy / "features").exists()


def test_a_weights_only_torch_file_is_accepted(prepared_copy: Path):
    torch.save(build_teacher(prepared_copy, width=6).state_dict(), "teachers/weights.pt")
    set_teacher(prepared_copy, weights="teachers/weights.pt")
    run_all(("extract-features", "--teacher", "depth"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"taps": {"bottleneck": "encoder.9", "decoder": "decoder"}},
            "teacher.imported.depth.taps.bottleneck: the module has no submodule 'encoder.9'; "
            "its submodules: encoder, encoder.0, encoder.1, encoder.2, encoder.3, encoder.4, "
            "decoder, decoder.0, decoder.1, decoder.2, head",
        ),
        ({"factory": "make"}, "teachers/depth_net.py defines no function 'make'; it defines"),
        ({"kwargs": {"depth": 3}}, "build(**teacher.imported.depth.kwargs) failed: TypeError"),
        ({"kwargs": {"width": 5}}, "does not fit the module that build(**teacher.imported"),
        ({"output": "head.weight"}, "submodule 'head.weight'"),
        ({"weights": "teachers/none.safetensors"}, "teacher.imported.depth.weights: no file at"),
    ],
)
def test_a_teacher_that_does_not_fit_is_one_clear_message(
    prepared_copy: Path, changes: dict, message: str
):
    set_teacher(prepared_copy, **changes)
    refused(("extract-features", "--teacher", "depth"), message)
    assert not (prepared_copy / "features").exists()


def test_broken_factory_code_names_its_line(prepared_copy: Path):
    code = prepared_copy / "teachers/depth_net.py"
    code.write_text(code.read_text() + "raise RuntimeError('no GPU driver')\n")
    last = len(code.read_text().splitlines())
    refused(
        ("extract-features", "--teacher", "depth"),
        "running teachers/depth_net.py failed: RuntimeError: no GPU driver "
        f"(teachers/depth_net.py, line {last})",
    )


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        ({"trained": ["semseg", "depth"]}, "task 'depth' is in teacher.trained and in"),
        ({"trained": ["semseg"], "imported": {}}, "task 'depth' has no teacher"),
        ({"trained": ["semseg", "depth", "normal"], "imported": {}}, "teacher.trained: 'normal'"),
    ],
)
def test_every_task_has_exactly_one_teacher(project: Path, teacher: dict, message: str):
    values = params(project, write_teacher(project))
    values["teacher"] |= teacher
    write_params(project, values)
    refused(("prepare",), message)


def test_taps_name_the_students_features():
    spec = {"file": "f.py", "factory": "f", "weights": "w", "taps": {"decoder": "x"}}
    with pytest.raises(ValueError, match="taps must name one submodule for each of the student's"):
        ImportedTeacherParams.model_validate(spec, context=validation_context())


def test_the_readme_example_is_the_teacher_these_tests_import():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Your own teachers and data\n")[1].split("\n## ")[0]
    code = section.split("```python\n")[1].split("```")[0]
    assert code.strip() == TEACHER_CODE.strip()
    example = yaml.safe_load(section.split("```yaml\n")[1].split("```")[0])
    values = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in example.items():
        values[key] = values[key] | value if isinstance(value, dict) else value
    parsed = Params.model_validate(values, context=validation_context())
    assert parsed.teacher.imported["depth"].taps == {"bottleneck": "encoder", "decoder": "decoder"}
    assert parsed.data.source == "folder"


class TwoOutputs(torch.nn.Module):
    def forward(self, x):
        return x, x


class Shared(torch.nn.Module):
    """Runs one block twice, returns a tuple from another."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Conv2d(3, 3, 1)
        self.pair = TwoOutputs()

    def forward(self, x):
        return self.pair(self.block(self.block(x)))[0]


@pytest.mark.parametrize(
    ("taps", "message"),
    [
        ({"bottleneck": "pair", "decoder": "pair"}, "'pair' (taps.bottleneck) gives a tuple"),
        ({"bottleneck": "block", "decoder": "pair"}, "submodule 'block' runs twice"),
    ],
)
def test_a_tap_must_give_one_feature_map(taps: dict, message: str):
    teacher = ImportedTeacher(Shared(), "depth", taps, None, "teacher.imported.depth")
    with pytest.raises(KdmtlError, match=re.escape(message)):
        teacher(torch.zeros(1, 3, 8, 8))


HELPER_TEACHER = """
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from blocks import Activation


@dataclass
class Config:
    width: int = 4


class Net(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, config.width, 1), Activation(), nn.MaxPool2d(2))
        self.decoder = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(config.width, 2, 1))
        self.head = nn.Conv2d(2, 1, 1)

    def forward(self, images):
        return self.head(self.decoder(self.encoder(images)))


def build():
    return Net(Config())
"""


def write_helper_teacher(folder: Path, activation: str) -> dict:
    """A teacher in its own folder whose helper module `blocks.py` defines `Activation`."""
    folder.mkdir(parents=True)
    (folder / "net.py").write_text(HELPER_TEACHER)
    (folder / "blocks.py").write_text(f"from torch.nn import {activation} as Activation\n")
    namespace: dict = {"__name__": "net"}
    sys.path.insert(0, str(folder))  # `from blocks import ...` as the user's file does
    sys.modules["net"] = type(sys)("net")  # the dataclass looks its module up
    try:
        exec(compile(HELPER_TEACHER, str(folder / "net.py"), "exec"), namespace)
        save_file(namespace["build"]().state_dict(), folder / "net.safetensors")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("blocks", None)
        sys.modules.pop("net", None)
    return {
        "file": str(folder / "net.py"),
        "factory": "build",
        "weights": str(folder / "net.safetensors"),
        "taps": {"bottleneck": "encoder", "decoder": "decoder"},
        "output": "forward",
    }


def test_two_teachers_keep_their_own_helper_modules(tmp_path: Path):
    """Each teacher imports `blocks` from its own folder; neither may get the other's from
    Python's module cache (and a file with a dataclass loads as an import would)."""
    specs = {
        "depth": write_helper_teacher(tmp_path / "a", "Sigmoid"),
        "semseg": write_helper_teacher(tmp_path / "b", "Tanh"),
    }
    built = {
        task: import_teacher(
            task, ImportedTeacherParams(**spec), 1, (8, 8), f"teacher.imported.{task}"
        )
        for task, spec in (
            ("depth", specs["depth"]),
            ("semseg", specs["semseg"] | {"output": None}),
        )
    }
    assert type(built["depth"].network.module.encoder[1]).__name__ == "Sigmoid"
    assert type(built["semseg"].network.module.encoder[1]).__name__ == "Tanh"
    assert "blocks" not in sys.modules


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            "def build():\n    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1))\n",
            "the module fails on a [1, 3, 8, 8] float32 image in [0, 1], as kdmtl gives it: "
            "RuntimeError",
        ),
        (
            "import sys\nsys.exit('usage: net.py [--gpu]')\n",
            "running {file} failed: SystemExit: usage: net.py [--gpu]",
        ),
    ],
)
def test_a_module_that_fails_is_one_message(tmp_path: Path, code: str, message: str):
    (tmp_path / "net.py").write_text("from torch import nn\n" + code)
    save_file(
        {
            "0.weight": torch.zeros(2, 1, 1, 1),
            "0.bias": torch.zeros(2),
            "1.weight": torch.zeros(2, 2, 1, 1),
            "1.bias": torch.zeros(2),
        },
        tmp_path / "w.safetensors",
    )
    spec = ImportedTeacherParams(
        file=str(tmp_path / "net.py"),
        factory="build",
        weights=str(tmp_path / "w.safetensors"),
        taps={"bottleneck": "0", "decoder": "1"},
    )
    with pytest.raises(KdmtlError, match=re.escape(message.format(file=tmp_path / "net.py"))):
        import_teacher("depth", spec, 1, (8, 8), "teacher.imported.depth")


def test_a_parameter_free_teacher_and_in_place_operations_after_a_tap(tmp_path: Path):
    """The tap's own output is kept, even when ReLU(inplace=True) runs on it afterwards."""
    (tmp_path / "net.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    pool, relu = nn.AvgPool2d(2), nn.ReLU(inplace=True)\n"
        "    return nn.Sequential(pool, relu, nn.Upsample(scale_factor=2))\n"
    )
    save_file({}, tmp_path / "w.safetensors")
    spec = ImportedTeacherParams(
        file=str(tmp_path / "net.py"),
        factory="build",
        weights=str(tmp_path / "w.safetensors"),
        taps={"bottleneck": "0", "decoder": "2"},
    )
    teacher = import_teacher("depth", spec, 1, (8, 8), "teacher.imported.depth")
    images = torch.rand(2, 3, 8, 8) - 0.5
    features = teacher.network.distilled_features(images)
    np.testing.assert_allclose(features["bottleneck"], torch.nn.functional.avg_pool2d(images, 2))
    assert feature_shapes(teacher.network, 8, 8) == {"bottleneck": (3, 4, 4), "decoder": (3, 8, 8)}
