"""Imported teachers: any torch module, built by a function of a Python file, with weights from a
safetensors or weights-only torch file, and features taken from named submodules by forward hooks.

The module runs in eval mode on images as kdmtl prepares them: float RGB in [0, 1], [B, 3, H, W]
at `data.height` x `data.width` (a module that expects other inputs, say ImageNet-normalised ones,
normalises inside its factory). Its prediction, when it gives one, is what the task's head gives:
class scores for semseg, depth in metres, a normal vector per pixel; one of another size is
resized bilinearly to the image's.
"""

import contextlib
import hashlib
import importlib.util
import json
import pickle
import sys
import traceback
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from pipeline.checkpoints import PICKLED, first_mismatch, is_pickle
from pipeline.errors import DataError, KdmtlError, reading
from pipeline.files import sha256_file
from pipeline.models import PREDICTION, ModelOutput
from pipeline.teachers.base import Teacher
from schemas.features import ImportedTeacherRecord
from schemas.params import ImportedTeacherParams

FORWARD = "forward"  # `output: forward`: the prediction is what the module returns
SAVE_WEIGHTS = (
    "save the module's state dict with safetensors.torch.save_file(module.state_dict(), PATH), "
    "or torch.save(module.state_dict(), PATH)"
)
LISTED_NAMES = 40  # submodule names shown when a tap names none of them


def imported_record(spec: ImportedTeacherParams, key: str) -> ImportedTeacherRecord:
    """The record of what the teacher is made from, with the sha256 of its two files; `key`
    (`teacher.imported.TASK`) is named when one is missing."""
    hashes = {}
    for name in ("file", "weights"):
        path = Path(getattr(spec, name))
        if not path.is_file():
            raise DataError(f"{key}.{name}: no file at {path}")
        hashes[f"{name}_sha256"] = sha256_file(path)
    return ImportedTeacherRecord(**spec.model_dump(), **hashes)


def imported_fingerprint(record: ImportedTeacherRecord) -> str:
    """sha256 of what decides the teacher's values: its files' content, factory, arguments, taps
    and output; not where its files lie."""
    content = record.model_dump(mode="json", exclude={"file", "weights"})
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def own_imports(folder: Path) -> Iterator[None]:
    """Run code that imports from `folder`, then forget the modules it loaded from there: two
    teachers may each have a helper module of the same name (`blocks.py`), and neither may get
    the other's from Python's module cache."""
    folder = folder.resolve()
    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in set(sys.modules) - before:
            if name.partition(".")[0] in before:
                continue  # a new submodule of a package loaded before (kdmtl's own): kept
            origin = getattr(sys.modules[name], "__file__", None)
            if origin is not None and Path(origin).resolve().is_relative_to(folder):
                del sys.modules[name]


def load_factory(path: Path, name: str, key: str) -> Callable[..., object]:
    """The function `name` of the Python file at `path`, run as a module (under `own_imports`
    of its folder, which the caller holds while the factory runs)."""
    module_name = "kdmtl_teacher_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise DataError(f"{key}.file: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # as an import does: dataclasses and the like look it up
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise DataError(f"{path}, line {error.lineno}: {error.msg}") from None
    except (Exception, SystemExit) as error:
        raise DataError(f"running {path} failed: {_user_code_error(error, path)}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        functions = sorted(n for n, v in vars(module).items() if callable(v) and n[0] != "_")
        raise DataError(
            f"{key}.factory: {path} defines no function {name!r}; it defines "
            f"{', '.join(functions) or 'none'}"
        )
    return factory


def _user_code_error(error: BaseException, path: Path) -> str:
    """`Type: message (FILE, line N)`, N the last line of the user's file in the traceback."""
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if Path(frame.filename).resolve() == path.resolve()
    ]
    where = f" ({path}, line {frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def read_weights(path: Path, key: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a weights-only torch.save file; a pickle (which
    could run code when loaded) is refused."""
    if not path.is_file():
        raise DataError(f"{key}.weights: no file at {path}")
    remedy = SAVE_WEIGHTS
    with reading(path, remedy):
        if path.suffix == ".safetensors":
            try:
                return load_file(path, device="cpu")
            except SafetensorError as error:
                raise DataError(f"cannot read {path}: {error}; {remedy}") from None
        if not zipfile.is_zipfile(path):
            problem = PICKLED if is_pickle(path) else "is neither safetensors nor a torch.save file"
            raise DataError(f"cannot use {path}: it {problem}; {remedy}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise DataError(f"cannot use {path}: it {PICKLED}; {remedy}") from None
    if isinstance(state, dict) and set(state) in ({"state_dict"}, {"model"}):
        state = next(iter(state.values()))  # a state dict wrapped by a training script
    if not (
        isinstance(state, dict)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise DataError(f"cannot use {path}: it holds no state dict of tensors; {remedy}")
    return state


def _submodule(module: nn.Module, name: str, what: str, key: str) -> nn.Module:
    try:
        return module.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in module.named_modules() if n]
        shown = ", ".join(names[:LISTED_NAMES])
        more = f" and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else ""
        raise DataError(
            f"{key}.{what}: the module has no submodule {name!r}; its submodules: "
            f"{shown or 'none'}{more}"
        ) from None


class ImportedTeacher(nn.Module):
    """A user's module seen as a kdmtl teacher: its taps' outputs as features, and its prediction
    (the `output` submodule's, or what it returns) resized to the image."""

    def __init__(
        self, module: nn.Module, task: str, taps: dict[str, str], output: str | None, key: str
    ) -> None:
        super().__init__()
        self.module = module
        self.task = task
        self.key = key
        self.taps = dict(taps)
        self.output = output
        self._captured: dict[str, object] = {}
        self.tap_channels: dict[str, int] = {}  # measured by import_teacher
        hooked = dict(taps) | ({"output": output} if output not in (None, FORWARD) else {})
        for role, name in hooked.items():
            what = "output" if role == "output" else f"taps.{role}"
            _submodule(module, name, what, key).register_forward_hook(self._capture(role, name))

    def _capture(self, role: str, name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if role in self._captured:
                raise KdmtlError(
                    f"{self.key}: submodule {name!r} runs twice in one forward pass, so its "
                    "output is not one feature map: choose another"
                )
            # A copy: an in-place operation after the submodule (ReLU(inplace=True)) would
            # otherwise change the captured values.
            self._captured[role] = output.clone() if isinstance(output, torch.Tensor) else output

        return hook

    def _tensor(self, role: str, value: object, name: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.ndim != 4:
            found = (
                f"a tensor of shape {list(value.shape)}"
                if isinstance(value, torch.Tensor)
                else f"a {type(value).__name__}"
            )
            raise KdmtlError(
                f"{self.key}: {name!r} ({role}) gives {found}, not a [B, C, h, w] feature map"
            )
        return value

    def forward(self, images: torch.Tensor) -> ModelOutput:
        self._captured = {}
        try:
            returned = self.module(images)
            captured = self._captured
        finally:
            self._captured = {}
        features = {}
        for feature, name in self.taps.items():
            if feature not in captured:
                raise KdmtlError(f"{self.key}: submodule {name!r} (taps.{feature}) did not run")
            features[feature] = self._tensor(f"taps.{feature}", captured[feature], name)
        predictions = {}
        if self.output is not None:
            value = returned if self.output == FORWARD else captured.get("output")
            prediction = self._tensor("output", value, self.output)
            if prediction.shape[-2:] != images.shape[-2:]:
                prediction = F.interpolate(
                    prediction, images.shape[-2:], mode="bilinear", align_corners=False
                )
            predictions[self.task] = prediction
        return ModelOutput(predictions, features)

    def distilled_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The taps, and the prediction where `output` names one."""
        output = self(images)
        predicted = output.predictions.get(self.task)
        return output.features | ({} if predicted is None else {PREDICTION: predicted})

    def feature_channels(self) -> dict[str, int]:
        return dict(self.tap_channels)


def import_teacher(
    task: str,
    spec: ImportedTeacherParams,
    channels: int,
    image_size: tuple[int, int],
    key: str,
) -> Teacher:
    """Build the module with its factory, load its weights (every one, none missing), hook its
    taps, and check with one blank image that the taps give feature maps and the prediction has
    the task's `channels`. `key` is the params key (`teacher.imported.TASK`), named in errors."""
    record = imported_record(spec, key)
    code = Path(spec.file)
    call = f"{spec.factory}(**{key}.kwargs)"
    with own_imports(code.parent):
        factory = load_factory(code, spec.factory, key)
        try:
            module = factory(**spec.kwargs)
        except (Exception, SystemExit) as error:
            raise DataError(f"{call} failed: {_user_code_error(error, code)}") from None
    if not isinstance(module, nn.Module):
        raise DataError(f"{call} returned a {type(module).__name__}, not a torch.nn.Module")
    weights = Path(spec.weights)
    state = read_weights(weights, key)
    mismatch = first_mismatch(state, module.state_dict())
    if mismatch is not None:
        raise DataError(f"{weights} does not fit the module that {call} builds: {mismatch}")
    module.load_state_dict(state)
    network = ImportedTeacher(module, task, spec.taps, spec.output, key).eval()
    blank = torch.zeros(1, 3, *image_size)
    try:
        with torch.inference_mode():
            output = network(blank)
    except KdmtlError:
        raise
    except Exception as error:
        raise DataError(
            f"{key}: the module fails on a [1, 3, {image_size[0]}, {image_size[1]}] float32 "
            f"image in [0, 1], as kdmtl gives it: {_user_code_error(error, code)}"
        ) from None
    network.tap_channels = {name: value.shape[1] for name, value in output.features.items()}
    if spec.output is not None:
        found = output.predictions[task].shape[1]
        if found != channels:
            raise DataError(
                f"{key}.output: {spec.output!r} gives {found} channels, and a {task} prediction "
                f"has {channels}"
            )
    files = {f"{key}.weights": weights, f"{key}.file": Path(spec.file)}
    return Teacher(
        task, network, imported_fingerprint(record), files, spec.output is not None, record
    )
