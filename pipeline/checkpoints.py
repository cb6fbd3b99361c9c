"""Checkpoints: weights plus a pydantic metadata record, loadable with `weights_only=True`.

A checkpoint is a file of someone else's until proven otherwise: loading never unpickles code,
checks the zip's checksums (torch does not), and checks every weight against the network that the
metadata describes, built on the meta device, before building that network for real. Any problem
is one DataError naming the file and what to do about it.
"""

import io
import pickle
import zipfile
from pathlib import Path
from typing import TypeVar

import torch
from pydantic import ValidationError

from pipeline.errors import DataError, KdmtlError, reading
from pipeline.files import write_atomically
from pipeline.models import ARCHITECTURES, Architecture, build_model
from pipeline.store.manifest import enclosing_store
from schemas.checkpoint import CheckpointMetadata, ModelSpec, StudentMetadata, TeacherMetadata

M = TypeVar("M", bound=CheckpointMetadata)

# What to do about an unusable checkpoint, by the metadata it should hold (teachers are TASK.pt).
REMEDIES: dict[type[CheckpointMetadata], str] = {
    TeacherMetadata: "run `kdmtl train-teacher --teacher {stem}` again",
    StudentMetadata: "run `kdmtl train-student` again",
}
PICKLED = "holds pickled Python objects; kdmtl loads weights only"


def default_remedy(
    path: Path, metadata_type: type[CheckpointMetadata] | tuple[type[CheckpointMetadata], ...]
) -> str:
    return REMEDIES.get(metadata_type, "make it again with kdmtl").format(stem=path.stem)


def unusable(path: Path, problem: str, remedy: str) -> DataError:
    return DataError(f"cannot use {path}: {problem}; {remedy}")


def save_checkpoint(path: Path, model: torch.nn.Module, metadata: CheckpointMetadata) -> None:
    """Write the checkpoint atomically, replacing nothing but a previous kdmtl checkpoint.

    torch.save writes into memory: its own file writer turns a full disk into a RuntimeError,
    a plain write keeps it an OSError (ENOSPC) that the command line reports as such."""
    path = Path(path)
    ensure_replaceable(path, metadata.kind)
    state = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": metadata.model_dump(mode="json"),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, lambda partial: partial.write_bytes(buffer.getbuffer()))


def ensure_replaceable(path: Path, kind: str) -> None:
    """Refuse when `path` lies inside a Zarr store, or holds anything but a checkpoint of `kind`
    (`kdmtl.teacher`, `kdmtl.student`) that kdmtl wrote."""
    path = Path(path)
    outer = enclosing_store(path)
    if outer is not None:
        raise KdmtlError(f"{path} lies inside the Zarr store {outer}: choose another path")
    if not (path.exists() or path.is_symlink()):
        return
    try:
        _, metadata = read_state(path, remedy="")
    except KdmtlError:
        metadata = {}
    if metadata.get("kind") != kind:
        raise KdmtlError(
            f"{path} exists and is not a {kind} checkpoint kdmtl made, and kdmtl replaces only "
            "its own files: move it away and run the command again"
        )


def is_pickle(path: Path) -> bool:
    """Whether the file opens as a pickle does (protocols 2 to 5 start with PROTO and their
    number); torch.save writes a zip archive, which does not."""
    with open(path, "rb") as file:
        head = file.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_state(path: Path, remedy: str) -> tuple[dict, dict]:
    """The state dict and raw metadata of a file that kdmtl wrote; never unpickles code."""
    if not path.exists():
        raise KdmtlError(f"no checkpoint at {path}: {remedy}")
    # save_checkpoint will not replace a file that fails here: it must be moved away first.
    remedy = f"move it away, then {remedy}"
    if path.is_dir():
        raise unusable(path, "it is a folder", remedy)
    with reading(path, remedy):
        if not zipfile.is_zipfile(path):
            problem = "not a complete zip archive as torch.save writes"
            if is_pickle(path):
                problem = PICKLED
            raise unusable(path, problem, remedy)
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise unusable(path, f"damaged: {damaged} fails its checksum", remedy)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch's message advises loading with weights_only=False: running the file's code.
            raise unusable(path, PICKLED, remedy) from None
    if not (
        isinstance(state, dict)
        and set(state) == {"state_dict", "metadata"}
        and isinstance(state["state_dict"], dict)
        and isinstance(state["metadata"], dict)
        and str(state["metadata"].get("kind")).startswith("kdmtl.")
    ):
        raise unusable(path, "not a kdmtl checkpoint: no state_dict and kdmtl metadata", remedy)
    return state["state_dict"], state["metadata"]


def load_checkpoint(
    path: Path, metadata_type: type[M] | tuple[type[M], ...], remedy: str | None = None
) -> tuple[dict[str, torch.Tensor], M]:
    """Weights and validated metadata, of the kind of `metadata_type` (or of one of several);
    never unpickles code. A problem is a DataError naming the file and `remedy` (by default:
    make it again)."""
    path = Path(path)
    types = metadata_type if isinstance(metadata_type, tuple) else (metadata_type,)
    remedy = remedy or default_remedy(path, metadata_type)
    state_dict, raw = read_state(path, remedy)
    kinds = {t.model_fields["kind"].default: t for t in types}
    if raw["kind"] not in kinds:
        wanted = " or ".join(kinds)
        raise unusable(path, f"it is a {raw['kind']} checkpoint, not a {wanted} one", remedy)
    metadata_type = kinds[raw["kind"]]
    try:
        return state_dict, metadata_type.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "metadata"
        problem = first["msg"].removeprefix("Value error, ")
        raise unusable(path, f"invalid metadata: {field}: {problem}", remedy) from None


def build_from_spec(spec: ModelSpec) -> Architecture:
    return build_model(spec.arch, spec.filters, spec.heads)


def describe(value: object) -> str:
    if not isinstance(value, torch.Tensor):
        return f"{type(value).__name__} (not a tensor)"
    layout = "" if value.layout == torch.strided else f" {value.layout}"
    return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}{layout}"


def first_mismatch(found: dict, expected: dict[str, torch.Tensor]) -> str | None:
    """The first weight in `found` that `expected` lacks or shapes otherwise, else the first
    missing one; None when they match."""
    for key, value in found.items():
        if key not in expected:
            return f"unexpected weight {key} {describe(value)}"
        if describe(value) != describe(expected[key]):
            return f"{key} is {describe(value)}, expected {describe(expected[key])}"
    missing = next((key for key in expected if key not in found), None)
    return None if missing is None else f"missing weight {missing} {describe(expected[missing])}"


def load_network(
    path: Path, metadata_type: type[M] | tuple[type[M], ...], remedy: str | None = None
) -> tuple[Architecture, M]:
    """A network in eval mode, and its metadata (which holds its `model` spec).

    The weights are checked against the network built on the meta device, which allocates
    nothing: metadata claiming a huge network costs nothing unless the file holds its weights."""
    path = Path(path)
    remedy = remedy or default_remedy(path, metadata_type)
    state_dict, metadata = load_checkpoint(path, metadata_type, remedy)
    spec = metadata.model
    if spec.arch not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES.names())
        raise unusable(path, f"unknown architecture {spec.arch!r} (known: {known})", remedy)
    with reading(path, remedy), torch.device("meta"):
        expected = build_from_spec(spec).state_dict()
    mismatch = first_mismatch(state_dict, expected)
    if mismatch is not None:
        raise unusable(
            path, f"its weights do not fit the network of its metadata: {mismatch}", remedy
        )
    model = build_from_spec(spec)
    model.load_state_dict(state_dict)
    return model.eval(), metadata


def load_teacher(path: Path, remedy: str | None = None) -> tuple[Architecture, TeacherMetadata]:
    """A teacher in eval mode (cached features must be deterministic), and its metadata."""
    return load_network(path, TeacherMetadata, remedy)


def load_student(path: Path, remedy: str | None = None) -> tuple[Architecture, StudentMetadata]:
    return load_network(path, StudentMetadata, remedy)


def load_trained_network(path: Path) -> tuple[Architecture, TeacherMetadata | StudentMetadata]:
    """A student or a teacher checkpoint, whichever `path` holds, in eval mode."""
    path = Path(path)
    remedy = "give a student or teacher checkpoint that kdmtl wrote"
    if path.is_dir():
        raise KdmtlError(f"{path} is a folder, not a checkpoint: {remedy}")
    return load_network(path, (StudentMetadata, TeacherMetadata), remedy)
