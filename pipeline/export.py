"""A trained network as an ONNX model, for deployment without kdmtl or PyTorch.

The ONNX model takes `image`, float RGB in [0, 1] of shape [batch, 3, H, W] at the size the
network was trained on (any batch size), and gives one output per task, named after it: the raw
head outputs (class scores, depth in metres, unnormalised normals), as `ModelOutput.predictions`.

SegNet's max-unpooling is exported as a scatter of the pooled values to their indices. torch's
own ONNX translation of `max_unpool2d` gives wrong values (ONNX's MaxUnpool counts indices over
the whole tensor, torch's per channel plane), which the check after export would catch.
"""

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import KdmtlError
from pipeline.models import Architecture

# Largest difference allowed between ONNX Runtime's outputs and PyTorch's, relative to the
# largest magnitude of each output: float32 kernels that sum in another order.
TOLERANCE = 1e-4
CHECK_BATCH = 2


class ScatterUnpool(nn.Module):
    """`nn.MaxUnpool2d` as a scatter: each pooled value goes to its index in its channel plane."""

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, output_size: torch.Size
    ) -> torch.Tensor:
        batch, channels = x.shape[:2]
        height, width = output_size[-2], output_size[-1]
        planes = x.new_zeros(batch, channels, height * width)
        planes = planes.scatter(2, indices.flatten(2), x.flatten(2))
        return planes.view(batch, channels, height, width)


class HeadOutputs(nn.Module):
    """The network with a tensor per task as its outputs, in `tasks` order."""

    def __init__(self, model: Architecture, tasks: list[str]) -> None:
        super().__init__()
        self.model = model
        self.tasks = list(tasks)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        predictions = self.model(images).predictions
        return tuple(predictions[task] for task in self.tasks)


def exportable(model: Architecture, tasks: list[str]) -> HeadOutputs:
    """A copy of the network, in eval mode, whose max-unpooling ONNX exports right."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MaxUnpool2d):
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, ScatterUnpool())
    return HeadOutputs(model, tasks).eval()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs warnings about optional operator libraries that kdmtl does not use,
    and warns of deprecations inside torch."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations
            yield
    finally:
        logger.setLevel(level)


MADE_BY = "kdmtl.checkpoint_sha256"  # metadata key: which checkpoint an ONNX file holds


def export_onnx(
    model: Architecture, tasks: list[str], size: tuple[int, int], path: Path, checkpoint: str
) -> None:
    """Write the network to `path` as ONNX (opset of the installed exporter), batch dynamic,
    recording the sha256 of its `checkpoint` in the model's metadata."""
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; a clear message if absent)
    except ImportError:
        raise KdmtlError(
            'exporting to ONNX needs the onnx and onnxscript packages: pip install "kdmtl[export]"'
        ) from None
    wrapped = exportable(model, tasks)
    example = torch.rand(CHECK_BATCH, 3, *size)
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter():
        program = torch.onnx.export(
            wrapped,
            (example,),
            dynamo=True,
            input_names=["image"],
            output_names=list(tasks),
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    program.model.metadata_props[MADE_BY] = checkpoint
    program.save(str(path))


def made_by_kdmtl(path: Path) -> bool:
    """Whether `path` is an ONNX model that `export_onnx` wrote."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX, damaged, or onnx absent: not known to be ours
        return False
    return any(prop.key == MADE_BY for prop in model.metadata_props)


def onnx_difference(
    model: Architecture, tasks: list[str], size: tuple[int, int], path: Path, seed: int = 0
) -> float | None:
    """Largest difference between the ONNX model's outputs (run by ONNX Runtime) and PyTorch's
    on random images, relative to each output's largest magnitude; None when ONNX Runtime is not
    installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(CHECK_BATCH + 1, 3, *size, generator=generator)  # not the export's batch
    with torch.inference_mode():
        expected = HeadOutputs(model.eval(), tasks)(images)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    found = session.run(list(tasks), {"image": images.numpy()})
    worst = 0.0
    for ours, theirs in zip(expected, found, strict=True):
        scale = max(float(ours.abs().max()), 1e-6)
        worst = max(worst, float(np.abs(ours.numpy() - theirs).max()) / scale)
    return worst
