"""What every command shares: the --params option, params loading, and user-facing errors."""

import errno
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml
from pydantic import BaseModel, ValidationError

from pipeline.checkpoints import load_teacher
from pipeline.data import SOURCES
from pipeline.errors import KdmtlError
from pipeline.files import write_atomically
from pipeline.models import ARCHITECTURES, Architecture
from pipeline.store.prepared import PreparedStore
from pipeline.tasks import TASKS
from pipeline.weighting import WEIGHTINGS
from schemas.checkpoint import TeacherMetadata
from schemas.params import Params


class UserError(click.ClickException):
    """A mistake in the input: shown as one message, exit status 2, no traceback."""

    exit_code = 2


def validation_context() -> dict[str, Any]:
    """Names the params may use, from the library's registries."""
    return {
        "tasks": TASKS.names(),
        "sources": {name: list(SOURCES[name].tasks) for name in SOURCES},
        "architectures": ARCHITECTURES.names(),
        "weightings": WEIGHTINGS.names(),
    }


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Params
    for key in loc:
        annotation = model.model_fields[key].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(part) for part in loc)
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key; allowed: {', '.join(_allowed_keys(loc[:-1]))}"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    got = f" (got {value!r})" if isinstance(value, str | int | float | bool) else ""
    return f"{key}: {message}{got}" if key else message


def load_params(path: Path) -> Params:
    """Read and validate a params file; any problem is a UserError naming the key."""
    if not path.is_file():
        raise UserError(f"{path} not found: run kdmtl in the project folder or pass --params FILE")
    try:
        # Explicitly UTF-8 (YAML's encoding), not the locale's; "-sig" drops a leading BOM.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}): save it as UTF-8"
        ) from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of keys, not {type(raw).__name__}")
    try:
        return Params.model_validate(raw, context=validation_context())
    except ValidationError as error:
        problems = "\n  ".join(_describe(e) for e in error.errors())
        raise UserError(f"invalid params in {path}:\n  {problems}") from None


def choose_task(task: str, params: Params) -> None:
    """Check a task named on the command line against the params' tasks."""
    if task not in params.tasks:
        raise click.BadParameter(
            f"{task!r} is not one of the tasks in the params: {', '.join(params.tasks)}",
            param_hint="'--teacher'",
        )


def teacher_checkpoint(params: Params, task: str) -> Path:
    path = Path(params.paths.teachers) / f"{task}.pt"
    if not path.is_file():
        raise KdmtlError(
            f"no teacher checkpoint at {path}: run `kdmtl train-teacher --teacher {task}` first"
        )
    return path


def load_current_teacher(
    params: Params, task: str, prepared: PreparedStore
) -> tuple[Architecture, TeacherMetadata, Path]:
    """The task's teacher, refused when it was trained for another task or on other data."""
    path = teacher_checkpoint(params, task)
    teacher, metadata = load_teacher(path)
    if metadata.task != task:
        raise KdmtlError(f"{path} is a {metadata.task} teacher, not {task}")
    if metadata.prepared_fingerprint != prepared.manifest.fingerprint:
        raise KdmtlError(
            f"{path} was trained on other prepared data than {prepared.path}: "
            f"run `kdmtl train-teacher --teacher {task}` again"
        )
    return teacher, metadata, path


def params_option(command: Callable) -> Callable:
    """Adds --params FILE, loaded and validated into a `params: Params` argument."""
    return click.option(
        "--params",
        "params",
        default="params.yaml",
        show_default=True,
        type=click.Path(dir_okay=False, path_type=Path),
        callback=lambda _ctx, _param, value: load_params(value),
        help="Parameters file; every output path is taken from it, relative to the current folder.",
    )(command)


def _without_worker_traceback(message: str) -> str:
    """A DataLoader worker's error comes back with the worker's traceback in its message: keep
    the original message, its last line."""
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith("pipeline.errors.") else last


def user_errors(command: Callable) -> Callable:
    """Turns library errors caused by the input into one clear message and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KdmtlError as error:
            raise UserError(_without_worker_traceback(str(error))) from None
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise click.ClickException(
                    f"no space left on the device while writing {error.filename or 'outputs'}: "
                    "free some space and run the command again"
                ) from None
            raise

    return wrapper


def write_json(path: Path, value: object) -> None:
    write_atomically(path, lambda partial: partial.write_text(json.dumps(value, indent=2) + "\n"))


def _is_curve(path: Path) -> bool:
    """Whether `path` is a curve file that `write_curves` wrote."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(rows, list)
        and bool(rows)
        and all(isinstance(row, dict) and "epoch" in row for row in rows)
    )


def forget_reports(
    curves: Path, metrics: Path | None = None, schema: type[BaseModel] | None = None
) -> None:
    """Remove the curves and the metrics file of a checkpoint that is about to be replaced, so
    that a run killed before its new reports leaves none of the old checkpoint's. Only kdmtl's
    own files go: curve files in the folder, and a metrics file that `schema` validates; any
    other file at the metrics path is refused."""
    if metrics is not None and (metrics.exists() or metrics.is_symlink()):
        try:
            schema.model_validate_json(metrics.read_bytes())
        except (OSError, ValueError):
            raise KdmtlError(
                f"{metrics} exists and is not a kdmtl metrics file: move it away or set "
                "paths.metrics to another folder"
            ) from None
        metrics.unlink()
    if curves.is_dir():
        for path in curves.glob("*.json"):
            if _is_curve(path):
                path.unlink()


def write_curves(folder: Path, rows: list[dict[str, float]]) -> None:
    """One JSON file per logged value, `[{"epoch": e, NAME: v}, ...]`: DVC plots a folder of
    them as one chart per file."""
    for name in rows[0]:
        if name != "epoch":
            write_json(
                folder / f"{name}.json", [{"epoch": r["epoch"], name: r[name]} for r in rows]
            )
