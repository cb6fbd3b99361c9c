"""What every command shares: the --params option, params loading, and user-facing errors."""

import errno
import functools
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import click
import torch
import yaml
from pydantic import BaseModel, ValidationError
from upath import UPath

from pipeline.data import SOURCES
from pipeline.distill import DISTILLERS
from pipeline.distributed import Replicas, process_device, process_group
from pipeline.errors import KdmtlError, first_line
from pipeline.files import sha256_file, write_atomically
from pipeline.models import ARCHITECTURES, FEATURES, Architecture
from pipeline.store.encodings import ENCODINGS
from pipeline.store.location import remote_errors, store_path, unreachable
from pipeline.store.prepared import PreparedStore
from pipeline.tasks import TASKS, make_tasks
from pipeline.teachers import (
    Teacher,
    import_teacher,
    imported_fingerprint,
    imported_record,
    trained_teacher,
)
from pipeline.training import resolve_device
from pipeline.weighting import WEIGHTINGS
from schemas.checkpoint import CheckpointMetadata
from schemas.params import DEVICE_PATTERN, Params


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
        "distillers": DISTILLERS.names(),
        "encodings": {name: ENCODINGS[name].mantissa_bits for name in ENCODINGS},
        "feature_taps": list(FEATURES),
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


def prepared_path(params: Params) -> UPath:
    """The prepared store: a local path, or a URL in object storage."""
    return store_path(params.paths.prepared)


def feature_store_path(params: Params, task: str) -> UPath:
    """The task's feature store, `TASK.zarr` in `paths.features` (a folder or a URL)."""
    return store_path(params.paths.features) / f"{task}.zarr"


def trained_checkpoint(params: Params, task: str) -> Path:
    return Path(params.paths.teachers) / f"{task}.pt"


def current_teacher(params: Params, task: str, prepared: PreparedStore) -> Teacher:
    """The task's teacher as the params name it: imported (`teacher.imported.TASK`), or the
    checkpoint kdmtl trained on the current prepared data (`paths.teachers/TASK.pt`)."""
    spec = params.teacher.imported.get(task)
    if spec is None:
        path = trained_checkpoint(params, task)
        return trained_teacher(path, task, prepared.manifest.fingerprint, "paths.teachers")
    channels = make_tasks([task], prepared.manifest.num_classes)[task].channels
    size = (prepared.manifest.height, prepared.manifest.width)
    return import_teacher(task, spec, channels, size, f"teacher.imported.{task}")


def current_fingerprint(params: Params, task: str) -> str | None:
    """The fingerprint of the task's teacher from its files alone, without building it; None
    when a file is missing."""
    spec = params.teacher.imported.get(task)
    if spec is None:
        path = trained_checkpoint(params, task)
        return sha256_file(path) if path.is_file() else None
    if not (Path(spec.file).is_file() and Path(spec.weights).is_file()):
        return None
    return imported_fingerprint(imported_record(spec, f"teacher.imported.{task}"))


def parse_device(value: str) -> torch.device:
    """A `--device` option: auto, cpu, cuda or cuda:N."""
    if not DEVICE_PATTERN.fullmatch(value):
        raise click.BadParameter(
            f"{value!r} is not a device; allowed: auto, cpu, cuda, cuda:N", param_hint="'--device'"
        )
    try:
        return resolve_device(value)
    except KdmtlError as error:
        raise click.BadParameter(str(error), param_hint="'--device'") from None


def network_input_size(
    network: Architecture, size: str | None, path: Path, metadata: CheckpointMetadata
) -> tuple[int, int]:
    """The image size a trained network is run at: `--size HxW`, else the size it was trained on
    (recorded in its checkpoint), at least 2 pixels per level of its encoder."""
    if size is not None:
        try:
            height, width = (int(side) for side in size.lower().split("x"))
        except ValueError:
            height = width = 0
        if min(height, width) < 1:
            raise click.BadParameter(f"{size!r} is not HxW, e.g. 288x384", param_hint="'--size'")
    elif metadata.image_size is None:
        raise KdmtlError(
            f"{path} was made before kdmtl recorded the image size: pass --size HxW, the "
            "data.height and data.width it was trained with"
        )
    else:
        height, width = metadata.image_size
    smallest = 2 ** len(network.filters)
    if min(height, width) < smallest:
        raise click.BadParameter(
            f"{height}x{width} is too small for {path}: its {len(network.filters)} levels each "
            f"halve the image, so each side must be at least {smallest}",
            param_hint="'--size'",
        )
    return height, width


def model_option(command: Callable) -> Callable:
    """Adds --model PATH, a trained network's checkpoint (predict, export)."""
    return click.option(
        "--model",
        default="models/student.pt",
        show_default=True,
        type=click.Path(path_type=Path),
        help="A student or teacher checkpoint that kdmtl trained.",
    )(command)


def size_option(help_text: str) -> Callable[[Callable], Callable]:
    """Adds --size HxW, read by `network_input_size` (predict, export)."""
    return click.option("--size", default=None, metavar="HxW", help=help_text)


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


SCHEDULER_TIMEOUT = 10  # seconds to connect to a dask scheduler, and for it to have a worker


def store_argument(command: Callable) -> Callable:
    """Adds the STORE argument: a local path, or a URL in object storage (`s3://...`)."""
    return click.argument("store", callback=lambda _ctx, _param, value: _store(value))(command)


def _store(value: str) -> UPath:
    try:
        return store_path(value)
    except KdmtlError as error:  # raised while parsing, before `user_errors` runs
        raise UserError(str(error)) from None


def scheduler_option(command: Callable) -> Callable:
    """Adds --scheduler ADDRESS: the dask work runs on that dask.distributed cluster."""
    return click.option(
        "--scheduler",
        metavar="ADDRESS",
        default=None,
        help="Run the reading on the dask.distributed cluster whose scheduler is at ADDRESS "
        "(tcp://HOST:PORT). Its workers open the store themselves: give a URL, or a path they "
        "see at the same place.",
    )(command)


@contextmanager
def dask_scheduler(address: str | None) -> Iterator[None]:
    """Within the block, dask computes on the cluster at `address` (None: here, in threads)."""
    if address is None:
        yield
        return
    try:
        from distributed import Client
    except ImportError:
        raise KdmtlError(
            "--scheduler needs dask.distributed: pip install 'kdmtl[cluster]'"
        ) from None
    remedy = "start one (`dask scheduler`, then `dask worker ADDRESS` on each machine)"
    connected: dict[str, Any] = {}

    def connect() -> None:
        try:
            # Not the process's default: a client left behind below must not take over dask's
            # global config; the block sets it as current in this thread only.
            connected["client"] = Client(
                address, timeout=f"{SCHEDULER_TIMEOUT}s", set_as_default=False
            )
        except BaseException as error:
            connected["error"] = error

    # A server that accepts the connection but never answers as a scheduler holds the client
    # past its own timeout: wait in a thread that is left behind if it does not return.
    thread = threading.Thread(target=connect, name="dask-connect", daemon=True)
    thread.start()
    thread.join(SCHEDULER_TIMEOUT + 5)
    if "client" not in connected:
        error = connected.get("error")
        why = first_line(error) if error else f"no answer in {SCHEDULER_TIMEOUT + 5} s"
        raise KdmtlError(f"cannot reach a dask scheduler at {address} ({why}): {remedy}")
    with connected["client"] as client:
        try:
            client.wait_for_workers(1, timeout=SCHEDULER_TIMEOUT)
        except TimeoutError:
            raise KdmtlError(
                f"the dask scheduler at {address} has no workers after {SCHEDULER_TIMEOUT} s: "
                "start `dask worker ADDRESS` on each machine"
            ) from None
        with client.as_current():
            yield


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
        except remote_errors() as error:  # the store was reached before, at store_path
            raise UserError(str(unreachable(error))) from None
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise click.ClickException(
                    f"no space left on the device while writing {error.filename or 'outputs'}: "
                    "free some space and run the command again"
                ) from None
            raise

    return wrapper


@contextmanager
def training_processes(params: Params) -> Iterator[tuple[Replicas, torch.device]]:
    """This process's replica and device: one of torchrun's processes (each with its own GPU
    under `device: auto` or `cuda`), or the only one."""
    device = process_device(resolve_device(params.device))
    with process_group(device) as replicas:
        yield replicas, device


def main_process_log(folder: Path, replicas: Replicas) -> AbstractContextManager:
    """The training log, written by the main process only (a null context elsewhere)."""
    return TrainingLog(folder) if replicas.is_main else nullcontext()


def write_json(path: Path, value: object) -> None:
    write_atomically(path, lambda partial: partial.write_text(json.dumps(value, indent=2) + "\n"))


class TrainingLog:
    """A training run's values through DVCLive, in `folder`: `plots/metrics/train/NAME.tsv` and
    `plots/metrics/test/NAME.tsv` (one row per epoch, step = epoch) and `metrics.json` (the latest
    values, then the final ones), all rewritten after every epoch so that `dvc plots show` follows
    a run. Opening it removes the folder's earlier curves: they describe the checkpoint this run
    replaces. A folder holding a file that DVCLive would delete and kdmtl did not write is
    refused; a run that fails leaves no curves."""

    def __init__(self, folder: Path):
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            kind = "a symbolic link" if folder.is_symlink() else "a file"
            raise KdmtlError(
                f"{folder} is {kind}, not a folder of training curves: move it away or set "
                "paths.metrics to another folder"
            )
        foreign = _foreign_files(folder)
        if foreign:
            raise KdmtlError(
                f"{folder} holds files that kdmtl does not write ({', '.join(foreign[:3])}): "
                "move them away or set paths.metrics to another folder"
            )
        from dvclive import Live  # its import opens DVC: only for the commands that train
        from dvclive.env import DVCLIVE_RESUME
        from dvclive.utils import env2bool

        if env2bool(DVCLIVE_RESUME):
            raise KdmtlError(
                f"{DVCLIVE_RESUME} is set: DVCLive would add this run's curves to the last "
                "run's, and kdmtl's training runs start anew; unset it"
            )

        class _Live(Live):
            def _init_dvc(self) -> None:
                # Outside a DVC project DVCLive would run `dvc init` in the enclosing git repo.
                if _inside_dvc_project():
                    super()._init_dvc()

        self.folder = folder
        self.live = _Live(str(folder), save_dvc_exp=False, dvcyaml=False)

    def epoch(self, row: dict[str, float]) -> None:
        self.live.step = int(row["epoch"])
        for name, value in row.items():
            if name != "epoch":
                self.live.log_metric(_logged_name(name), value)
        self.live.next_step()

    def final(self, group: str, values: dict[str, float]) -> None:
        """Values of the finished run, in `metrics.json` only (`group/NAME`)."""
        for name, value in values.items():
            self.live.log_metric(f"{group}/{name}", value, plot=False)

    def __enter__(self) -> "TrainingLog":
        return self

    def __exit__(self, error_type, *_) -> None:
        if error_type is None:
            self.live.end()
        else:
            for path in _files(self.folder):
                if _written_by_dvclive(self.folder, path):
                    path.unlink()


def _logged_name(name: str) -> str:
    """`test_mIoU` -> `test/mIoU`; every other value is the training split's."""
    return "test/" + name.removeprefix("test_") if name.startswith("test_") else f"train/{name}"


def _inside_dvc_project() -> bool:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        Repo.find_root()
    except NotDvcRepoError:
        return False
    return True


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _written_by_dvclive(folder: Path, path: Path) -> bool:
    """Whether `path` is a file that TrainingLog writes."""
    relative = path.relative_to(folder)
    return not path.is_symlink() and (
        relative.as_posix() == "metrics.json"
        or (relative.parts[:2] == ("plots", "metrics") and relative.suffix == ".tsv")
    )


def _deleted_by_dvclive(folder: Path, path: Path) -> bool:
    """Whether DVCLive's cleanup, when a run starts, deletes `path` (its `Live._init_cleanup`)."""
    relative = path.relative_to(folder)
    if relative.parts[0] == "plots" and len(relative.parts) > 2:
        return relative.parts[1] in ("metrics", "images", "sklearn", "custom")
    return len(relative.parts) == 1 and (
        relative.name in ("metrics.json", "params.yaml", "report.html", "report.md")
        or relative.name.endswith("dvc.yaml")
    )


def _foreign_files(folder: Path) -> list[str]:
    """Files in `folder` that DVCLive would delete and kdmtl did not write."""
    if not folder.exists():
        return []
    return [
        path.relative_to(folder).as_posix()
        for path in _files(folder)
        if _deleted_by_dvclive(folder, path) and not _written_by_dvclive(folder, path)
    ]
