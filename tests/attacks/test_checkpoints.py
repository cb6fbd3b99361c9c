"""Damaged, foreign and malicious checkpoints: one line naming the file and the remedy, no code run.

Each case damages the tiny project's depth teacher and runs `kdmtl extract-features`, which must
refuse it (exit 2) without a traceback and without torch's advice to load with `weights_only=False`.
"""

import errno
import pickle
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch
from conftest import TINY_PARAMS, files_under, kdmtl, tmpfs, write_params

import pipeline.checkpoints
from pipeline.checkpoints import load_checkpoint, load_teacher, save_checkpoint
from pipeline.errors import KdmtlError
from pipeline.models import build_model
from schemas.checkpoint import StudentMetadata, TeacherMetadata
from schemas.params import StudentParams

TEACHER = Path("models/teachers/depth.pt")
REMEDY = "run `kdmtl train-teacher --teacher depth` again"


@pytest.fixture
def project(outputs: Path) -> Path:
    return outputs


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """The device of every network that loading builds during the test."""
    devices: list[str] = []

    def spy(*args):
        model = build_model(*args)
        devices.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(pipeline.checkpoints, "build_model", spy)
    return devices


def refused(*fragments: str) -> str:
    """`extract-features` refuses the depth teacher in one line naming it and the remedy."""
    result = kdmtl("extract-features", "--teacher", "depth")
    message = result.output.strip()
    assert result.exit_code == 2, message
    assert len(message.splitlines()) == 1, message
    for fragment in (str(TEACHER), REMEDY, *fragments):
        assert fragment in message
    assert "Traceback" not in message
    assert "weights_only" not in message
    return message


def rewrite(change: Callable[[dict], None]) -> None:
    """Edit the teacher's content and save it as torch does: the zip and its checksums intact."""
    state = torch.load(TEACHER, weights_only=True)
    change(state)
    torch.save(state, TEACHER)


class Payload:
    """Unpickling it would create `marker`: proof that the file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_bad_checkpoint_with_a_pickle_payload_is_refused_unrun(project: Path, writer: str):
    marker = project / "payload-ran"
    state = {"state_dict": {}, "metadata": Payload(marker)}
    if writer == "torch.save":
        torch.save(state, TEACHER)
    else:
        TEACHER.write_bytes(pickle.dumps(state))
    refused("holds pickled Python objects; kdmtl loads weights only")
    assert not marker.exists()


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_a_byte(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    return bytes(flipped)


@pytest.mark.parametrize(
    "damage",
    [truncate, lambda _: b"", flip_a_byte, lambda _: b"depth teacher, see the wiki\n"],
    ids=["truncated", "empty", "byte flip", "text"],
)
def test_corrupt_checkpoint_is_refused_naming_it(project: Path, damage: Callable):
    TEACHER.write_bytes(damage(TEACHER.read_bytes()))
    refused()


def test_corrupt_checkpoint_that_is_a_folder_is_refused_naming_it(tmp_path: Path):
    folder = tmp_path / "depth.pt"
    folder.mkdir()
    with pytest.raises(KdmtlError) as raised:
        load_teacher(folder)
    assert str(raised.value).startswith(f"cannot use {folder}: it is a folder")
    assert REMEDY in str(raised.value)
    with pytest.raises(KdmtlError, match="restore it from the backup"):
        load_checkpoint(folder, TeacherMetadata, remedy="restore it from the backup")


def wrong_shape(state: dict) -> None:
    state["state_dict"]["encoder.0.0.0.weight"] = torch.zeros(5, 3, 3, 3)


def missing_key(state: dict) -> None:
    del state["state_dict"]["task_heads.depth.1.bias"]


def extra_head(state: dict) -> None:
    weights = state["state_dict"]
    for key in [key for key in weights if key.startswith("task_heads.depth.")]:
        weights[key.replace(".depth.", ".semseg.")] = weights[key].clone()


def extra_key(state: dict) -> None:
    state["state_dict"]["junk"] = torch.zeros(2)


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (
            wrong_shape,
            ["encoder.0.0.0.weight is float32 [5, 3, 3, 3], expected float32 [4, 3, 3, 3]"],
        ),
        (missing_key, ["missing weight task_heads.depth.1.bias float32 [1]"]),
        (extra_head, ["unexpected weight task_heads.semseg.0.weight float32 [4, 4, 3, 3]"]),
        (extra_key, ["unexpected weight junk float32 [2]"]),
    ],
    ids=["wrong shape", "missing key", "extra head", "extra key"],
)
def test_bad_checkpoint_weights_are_refused_naming_the_first_offending_key(
    project: Path, change: Callable, fragments: list[str]
):
    rewrite(change)
    refused(*fragments)


def set_model(**spec) -> Callable[[dict], None]:
    return lambda state: state["metadata"]["model"].update(spec)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (set_model(filters=[65536, 65536]), "model.filters.0: Input should be less than or equal"),
        (set_model(filters=[4] * 50), "model.filters: List should have at most"),
        (
            set_model(heads={"depth": 10**6}),
            "model.heads.depth: Input should be less than or equal",
        ),
        (set_model(filters=[1024, 1024, 1024]), "encoder.0.0.0.weight is float32 [4, 3, 3, 3]"),
    ],
    ids=["huge filters", "50 levels", "huge head", "metadata larger than its weights"],
)
def test_bad_checkpoint_sizes_are_refused_before_building_the_network(
    project: Path, builds: list[str], change: Callable, fragment: str
):
    rewrite(change)
    refused(fragment)
    assert set(builds) <= {"meta"}


def test_bad_checkpoint_teacher_with_two_heads_is_refused(project: Path):
    def two_heads(state: dict) -> None:
        extra_head(state)
        state["metadata"]["model"]["heads"]["semseg"] = 1

    rewrite(two_heads)
    refused("model.heads must be the teacher's task 'depth' alone")


def test_bad_checkpoint_of_a_student_where_a_teacher_is_expected(project: Path):
    teacher, metadata = load_teacher(TEACHER)
    student = StudentMetadata(
        tasks=["depth"],
        model=metadata.model,
        train=StudentParams(),
        augment=False,
        prepared_fingerprint=metadata.prepared_fingerprint,
        distilled_from={"depth": "0" * 64},
        class_names=metadata.class_names,
        test_metrics={"depth": metadata.test_metrics},
        kdmtl_version=metadata.kdmtl_version,
    )
    TEACHER.unlink()  # saving a student over a teacher is refused
    save_checkpoint(TEACHER, teacher, student)
    refused("it is a kdmtl.student checkpoint, not a kdmtl.teacher one")


def tiny_tmpfs(folder: Path) -> AbstractContextManager[Path]:
    """A 16 KiB disk, smaller than the tiny teacher's checkpoint (about 28 KB)."""
    return tmpfs(folder, "16k")


def test_bad_checkpoint_save_on_a_full_disk_is_enospc_and_leaves_nothing(
    pipeline_outputs: Path, tmp_path: Path
):
    teacher, metadata = load_teacher(pipeline_outputs / TEACHER)
    with tiny_tmpfs(tmp_path / "disk") as disk:
        with pytest.raises(OSError) as raised:
            save_checkpoint(disk / "depth.pt", teacher, metadata)
        assert raised.value.errno == errno.ENOSPC
        assert files_under(disk) == []


def test_bad_checkpoint_save_on_a_full_disk_says_so_on_the_command_line(
    project: Path, tmp_path: Path
):
    with tiny_tmpfs(tmp_path / "disk") as disk:
        write_params(project, TINY_PARAMS | {"paths": {"teachers": str(disk / "teachers")}})
        result = kdmtl("train-teacher", "--teacher", "depth")
        assert result.exit_code == 1, result.output
        assert "no space left" in result.output
        assert "Traceback" not in result.output
        assert files_under(disk) == []


@pytest.mark.parametrize("kind", ["text file", "folder"])
def test_bad_checkpoint_save_does_not_replace_what_kdmtl_did_not_make(
    pipeline_outputs: Path, tmp_path: Path, kind: str
):
    teacher, metadata = load_teacher(pipeline_outputs / TEACHER)
    path = tmp_path / "depth.pt"
    notes = path / "notes.txt" if kind == "folder" else path
    notes.parent.mkdir(exist_ok=True)
    notes.write_text("my notes\n")
    with pytest.raises(KdmtlError) as raised:
        save_checkpoint(path, teacher, metadata)
    assert str(raised.value).startswith(
        f"{path} exists and is not a kdmtl.teacher checkpoint kdmtl made"
    )
    assert notes.read_text() == "my notes\n"
    assert files_under(tmp_path) == [notes]


@pytest.mark.guard
def test_bad_checkpoint_save_replaces_a_previous_kdmtl_checkpoint(
    pipeline_outputs: Path, tmp_path: Path
):
    path = tmp_path / "depth.pt"
    shutil.copy(pipeline_outputs / TEACHER, path)
    teacher, metadata = load_teacher(path)
    with torch.no_grad():
        next(teacher.parameters()).add_(1.0)
    save_checkpoint(path, teacher, metadata)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(saved[key], value) for key, value in teacher.state_dict().items())
