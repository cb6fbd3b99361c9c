"""Hostile and damaged inputs to `kdmtl prepare`: each is refused with one message naming the file
or key and how to fix it, exit status 2, no traceback, and nothing written."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, TINY_PARAMS, files_under, kdmtl, write_params
from test_folder_sources import folder_params, make_dataset

from schemas.params import Params
from stages.common import validation_context


def assert_refused(project: Path, *expected: str) -> str:
    """Run `kdmtl prepare`: exit 2, every `expected` text in the message, nothing written."""
    before = files_under(project)
    result = kdmtl("prepare")
    assert result.exit_code == 2, result.output
    for text in expected:
        assert text in result.output, result.output
    assert "Traceback" not in result.output
    assert files_under(project) == before
    assert not (project / "data" / "prepared.zarr").exists()
    return result.output


@pytest.fixture
def nyuv2(project: Path) -> Path:
    """A valid NYU-v2 folder (12 x 16 samples) and params reading it; returns the folder."""
    make_dataset(project / "raw", "nyuv2")
    folder_params(project, "nyuv2", project / "raw")
    return project / "raw"


@pytest.mark.guard
def test_bad_input_the_fixtures_import_a_valid_dataset(project: Path, nyuv2: Path):
    """The starting point of every data case below is accepted."""
    assert kdmtl("prepare").exit_code == 0
    assert (project / "data" / "prepared.zarr").is_dir()


# Bad data: the .npy folder sources.


@pytest.mark.parametrize(
    ("folder", "shape"), [("depth", (12, 16, 1)), ("normal", (12, 16, 3)), ("depth", (12, 16))]
)
def test_bad_input_float64_too_large_for_float32(project: Path, nyuv2: Path, folder, shape):
    bad = nyuv2 / "train" / folder / "2.npy"
    array = np.full(shape, 0.5)
    array[3, 4] = 1e39  # finite in float64, inf in float32
    np.save(bad, array)
    assert_refused(project, f"{bad} holds values too large for float32")


def test_bad_input_float64_image_too_large_for_float32(project: Path, nyuv2: Path):
    bad = nyuv2 / "val" / "image" / "0.npy"
    array = np.full((12, 16, 3), 0.5)
    array[0, 0, 0] = -1e39
    np.save(bad, array)
    assert_refused(project, f"{bad} holds values too large for float32")


def test_bad_input_empty_file(project: Path, nyuv2: Path):
    bad = nyuv2 / "train" / "label" / "1.npy"
    bad.write_bytes(b"")
    assert_refused(project, f"{bad} is empty (0 bytes)")


def test_bad_input_npz_archive_named_npy(project: Path, nyuv2: Path):
    bad = nyuv2 / "train" / "image" / "0.npy"
    with open(bad, "wb") as file:
        np.savez(file, image=np.full((12, 16, 3), 0.5))
    assert zipfile.is_zipfile(bad)
    assert_refused(project, f"{bad} is a .npz archive, not a .npy array", "numpy.save")


@pytest.mark.parametrize(("array", "shape"), [(np.float64(0.5), "()"), (np.full(16, 0.5), "(16,)")])
@pytest.mark.parametrize("index", [0, 3])  # the first file read, which sets the size, and a later
def test_bad_input_image_with_too_few_dimensions(project: Path, nyuv2: Path, array, shape, index):
    bad = nyuv2 / "train" / "image" / f"{index}.npy"
    np.save(bad, array)
    assert_refused(project, f"{bad} has shape {shape}, expected H x W x 3")


def write_header_only(path: Path, shape: tuple[int, ...], dtype=np.float32) -> None:
    """A .npy header claiming `shape`, followed by a sparse hole as long as the data would be:
    the file is as big as a real one but takes no disk space and nothing is allocated."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, header | {"shape": shape})
        file.truncate(file.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)


@pytest.mark.parametrize("index", [0, 3])
def test_bad_input_header_claiming_a_huge_image(project: Path, nyuv2: Path, index: int):
    bad = nyuv2 / "train" / "image" / f"{index}.npy"
    write_header_only(bad, (100_000, 100_000, 3))
    assert bad.stat().st_size > 10**11  # 120 GB if it were read
    assert_refused(project, f"{bad} has shape (100000, 100000, 3)", "at most 16384")


def test_bad_input_header_claiming_more_data_than_the_file_holds(project: Path, nyuv2: Path):
    bad = nyuv2 / "train" / "depth" / "0.npy"
    write_header_only(bad, (12, 16, 1))
    with open(bad, "r+b") as file:
        file.truncate(file.seek(0, 2) - 4)
    assert_refused(project, f"{bad} is truncated")


@pytest.mark.parametrize(
    ("folder", "array", "dtype"),
    [
        ("image", np.full((12, 16, 3), 0.5 + 0.5j), "complex128"),
        ("normal", np.full((12, 16, 3), 1.0, np.complex64), "complex64"),
        ("label", np.full((12, 16), "a"), "<U1"),
        ("depth", np.zeros((12, 16, 1), dtype=[("d", "f4")]), "[('d', '<f4')]"),
        ("depth", np.zeros((12, 16, 1), dtype="m8[s]"), "timedelta64[s]"),
    ],
)
def test_bad_input_values_that_are_not_real_numbers(project: Path, nyuv2, folder, array, dtype):
    bad = nyuv2 / "val" / folder / "1.npy"
    np.save(bad, array)
    assert_refused(project, f"{bad} holds {dtype} values, expected real numbers")


def test_bad_input_object_arrays_are_refused_without_unpickling(project: Path, nyuv2: Path):
    bad = nyuv2 / "train" / "image" / "2.npy"
    np.save(bad, np.empty((12, 16, 3), dtype=object), allow_pickle=True)
    assert_refused(project, f"{bad} holds object values, expected real numbers")


# Bad params.


def test_bad_input_params_not_utf8(project: Path):
    (project / "params.yaml").write_bytes("data:\n  root: caf\xe9\n".encode("latin-1"))
    assert_refused(project, "params.yaml is not UTF-8 text (byte 0xe9", "save it as UTF-8")


@pytest.mark.guard
def test_bad_input_params_with_a_byte_order_mark_are_read(project: Path):
    """The UTF-8 signature some editors write is not a mistake."""
    path = write_params(project, TINY_PARAMS)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert kdmtl("prepare").exit_code == 0


SEEDS = ["seed", "data.seed", "features.seed", "student.seed"]
LARGEST_SEED = 2**63 - 1


def nested(key: str, value: object) -> dict:
    """`{"a": {"b": value}}` for the key "a.b"."""
    section, _, name = key.rpartition(".")
    return {section: {name: value}} if section else {name: value}


def tiny(changes: dict) -> dict:
    """The tiny params with `changes` merged into each section (quick to run were it accepted)."""
    merged = dict(TINY_PARAMS)
    for section, values in changes.items():
        old = merged.get(section)
        merged[section] = old | values if isinstance(old, dict) else values
    return merged


@pytest.mark.parametrize("key", SEEDS)
@pytest.mark.parametrize("value", [2**64, LARGEST_SEED + 1])
def test_bad_input_seed_out_of_range(project: Path, key: str, value: int):
    write_params(project, tiny(nested(key, value)))
    assert_refused(project, f"{key}: Input should be less than or equal to {LARGEST_SEED}")


@pytest.mark.guard
@pytest.mark.parametrize("key", SEEDS)
def test_bad_input_largest_seed_is_accepted_by_torch_and_numpy(key: str):
    params = Params.model_validate(nested(key, LARGEST_SEED), context=validation_context())
    section, _, name = key.rpartition(".")
    seed = getattr(getattr(params, section) if section else params, name)
    torch.Generator().manual_seed(seed)  # same bounds as torch.manual_seed, no global state
    np.random.default_rng([seed, 1, 2])


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"segm": 1}, "student.kd_weights: 'segm' is not a task; allowed: semseg, depth, normal"),
        (
            {"semseg": 1, "depth": 1, "normal": 2, "edges": 1},
            "student.kd_weights: 'edges' is not a task",
        ),
    ],
)
def test_bad_input_kd_weights_naming_an_unknown_task(project: Path, weights, expected):
    write_params(project, tiny({"student": {"kd_weights": weights}}))
    assert_refused(project, expected)


@pytest.mark.guard
def test_bad_input_kd_weights_may_name_known_tasks_outside_tasks():
    """The defaults weight all three tasks, so a run on fewer tasks keeps them."""
    raw = {
        "tasks": ["depth"],
        "teacher": {"trained": ["depth"]},
        "student": {"kd_weights": {"semseg": 1, "depth": 1, "normal": 2}},
    }
    assert Params.model_validate(raw, context=validation_context()).tasks == ["depth"]


@pytest.mark.parametrize(
    "key",
    [
        "data.num_train",
        "data.num_test",
        "data.height",
        "data.chunk_size",
        "data.seed",
        "seed",
        "loader.num_workers",
        "teacher.epochs",
        "student.batch_size",
        "features.keep_bits",
        "features.clevel",
        "features.views",
    ],
)
def test_bad_input_booleans_for_integers(project: Path, key: str):
    write_params(project, tiny(nested(key, True)))
    assert_refused(project, f"{key}: Input should be a valid integer (got True)")


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"model": {"filters": [4, True]}}, "model.filters.1: Input should be a valid integer"),
        ({"teacher": {"lr": True}}, "teacher.lr: Input should be a number, not a boolean"),
        (
            {"teacher": {"overrides": {"depth": {"epochs": True}}}},
            "overrides.depth.epochs: Input should be a valid integer",
        ),
        ({"student": {"kd_weights": {"depth": True}}}, "student.kd_weights.depth: Input should"),
    ],
)
def test_bad_input_booleans_in_lists_floats_and_overrides(project: Path, params, expected):
    write_params(project, tiny(params))
    assert_refused(project, expected)


@pytest.mark.guard
def test_bad_input_floats_still_take_yaml_integers_and_exponents():
    """YAML reads `lr: 1` as an integer and `lr: 1e-3` (no dot) as a string."""
    text = (
        "teacher: {lr: 1, weight_decay: 0}\n"
        "student: {lr: 1e-3, kd_weights: {semseg: 1, depth: 0, normal: 2}}"
    )
    params = Params.model_validate(yaml.safe_load(text), context=validation_context())
    assert (params.teacher.lr, params.teacher.weight_decay, params.student.lr) == (1.0, 0.0, 1e-3)
    assert params.student.kd_weights == {"semseg": 1.0, "depth": 0.0, "normal": 2.0}
    assert isinstance(params.teacher.lr, float)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (-1, "student.kd_weights.depth: Input should be greater than or equal to 0"),
        (-0.5, "student.kd_weights.depth: Input should be greater than or equal to 0"),
        (float("inf"), "student.kd_weights.depth: Input should be a finite number"),
        (float("-inf"), "student.kd_weights.depth: Input should be a finite number"),
        (float("nan"), "student.kd_weights.depth: Input should be a finite number"),
    ],
)
def test_bad_input_kd_weights_negative_or_not_finite(project: Path, value, expected):
    weights = {"semseg": 1, "depth": value, "normal": 2}
    write_params(project, tiny({"student": {"kd_weights": weights}}))
    assert_refused(project, expected)


# What the documentation shows keeps working.

README_EXAMPLES = [
    {},
    {"student": {"method": "dwa"}},
    *[
        {"student": {"method": method, "seed": seed}}
        for method in ("kd", "ew", "dwa", "uw", "gradnorm", "mgda")
        for seed in (0, 1, 2)
    ],
    {"teacher": {"overrides": {"depth": {"lr": 0.0005}}}},
    {"model": {"filters": [64, 128, 256, 512, 512]}, "data": {"height": 288, "width": 384}},
    {"student": {"model": {"arch": "segnet", "filters": [8, 16]}}},
    {"features": {"keep_bits": 7, "encoding": "float16"}},
    {"features": {"encoding": "normalized-int8"}},
    {"loader": {"resident": "device", "memory_budget_gb": 40}},
    {"features": {"views": 4}, "data": {"augment": True}},
    {
        "tasks": ["semseg", "depth"],
        "teacher": {"trained": ["semseg", "depth"]},
        "data": {"source": "cityscapes", "root": "x"},
    },
    {"data": {"source": "nyuv2", "root": "x", "num_train": None, "num_test": None}},
]


@pytest.mark.guard
@pytest.mark.parametrize("changes", README_EXAMPLES)
def test_bad_input_rules_keep_the_documented_params_valid(changes: dict):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in changes.items():
        if isinstance(values, dict):
            raw[section] = raw[section] | values
        else:
            raw[section] = values
    Params.model_validate(raw, context=validation_context())
