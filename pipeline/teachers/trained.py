"""Teachers that kdmtl trained: `TASK.pt` checkpoints of a registered architecture."""

from pathlib import Path

from pipeline.checkpoints import load_teacher
from pipeline.errors import KdmtlError
from pipeline.files import sha256_file
from pipeline.teachers.base import Teacher


def trained_teacher(path: Path, task: str, prepared_fingerprint: str, key: str) -> Teacher:
    """The teacher checkpoint at `path` (params key `key`), refused when it was trained for
    another task or on other prepared data."""
    path = Path(path)
    retrain = f"run `kdmtl train-teacher --teacher {task}`"
    if not path.is_file():
        raise KdmtlError(f"no teacher checkpoint at {path}: {retrain} first")
    network, metadata = load_teacher(path)
    if metadata.task != task:
        raise KdmtlError(f"{path} is a {metadata.task} teacher, not {task}")
    if metadata.prepared_fingerprint != prepared_fingerprint:
        raise KdmtlError(f"{path} was trained on other prepared data: {retrain} again")
    return Teacher(task, network, sha256_file(path), {key: path})
