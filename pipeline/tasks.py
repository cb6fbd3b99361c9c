"""Dense tasks: one registered class per task, with its head size, loss, metrics and baseline.

Losses follow LibMTL's NYU-v2 definitions. A task's target is the prepared array of the same name.
"""

from abc import ABC, abstractmethod
from typing import ClassVar

import dask.array as da
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.metrics import DepthMeter, Meter, NormalMeter, SegmentationMeter
from pipeline.registry import Registry


class Task(ABC):
    """A dense prediction task.

    `directions` maps each metric to True when higher is better; `main_metric` is the one shown in
    training curves and summaries.
    """

    name: ClassVar[str]
    main_metric: ClassVar[str]
    directions: ClassVar[dict[str, bool]]

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    @property
    @abstractmethod
    def channels(self) -> int:
        """Output channels of the task's head."""

    @abstractmethod
    def loss_terms(
        self, output: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of a raw head output as (sum over the valid pixels, their count),
        so that processes sharing a batch can divide by the count of the whole batch."""

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training loss of a raw head output: its mean over the valid pixels; zero (with
        gradient) when a batch has none."""
        total, count = self.loss_terms(output, target)
        return total / count.clamp(min=1)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """Post-processed prediction, as the metrics and the user see it."""
        return output

    @abstractmethod
    def output_distance(
        self, student: torch.Tensor, teacher: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """How far the student's raw head output is from its teacher's, averaged over every
        pixel (the teacher predicts where the target is missing too); output distillation."""

    @abstractmethod
    def meter(self) -> Meter:
        """A fresh metric accumulator."""

    @abstractmethod
    def baseline_output(self, targets: da.Array) -> torch.Tensor:
        """The trivial prediction from the training targets [N, ...] as a raw head output
        [channels, 1, 1], the same for every pixel of every image."""


TASKS: Registry[Task] = Registry("task")


def _valid_terms(loss: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (loss * valid).sum(), valid.sum()


@TASKS.register
class Semseg(Task):
    """Semantic segmentation: cross-entropy ignoring label -1; mIoU and pixel accuracy."""

    name: ClassVar[str] = "semseg"
    main_metric: ClassVar[str] = "mIoU"
    directions: ClassVar[dict[str, bool]] = {"mIoU": True, "pixel_acc": True}

    @property
    def channels(self) -> int:
        return self.num_classes

    def loss_terms(self, output, target):
        total = F.cross_entropy(output, target, ignore_index=-1, reduction="sum")
        return total, (target >= 0).sum()

    def predict(self, output):
        return output.argmax(1)

    def output_distance(self, student, teacher, temperature):
        """KL(teacher || student) of the class probabilities at `temperature`, summed over
        classes, times temperature^2 (Hinton et al.: gradients keep their size as it grows)."""
        log_student = F.log_softmax(student / temperature, dim=1)
        log_teacher = F.log_softmax(teacher / temperature, dim=1)
        kl = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(1)
        return kl.mean() * temperature**2

    def meter(self) -> Meter:
        return SegmentationMeter(self.num_classes)

    def baseline_output(self, targets):
        counts = da.bincount(targets.ravel().astype(np.int64) + 1, minlength=self.num_classes + 1)
        most_frequent = int(np.argmax(counts.compute()[1:]))
        return F.one_hot(torch.tensor(most_frequent), self.num_classes).float()[:, None, None]


@TASKS.register
class Depth(Task):
    """Depth: L1 over valid pixels (target != 0); absolute and relative error."""

    name: ClassVar[str] = "depth"
    main_metric: ClassVar[str] = "abs_err"
    directions: ClassVar[dict[str, bool]] = {"abs_err": False, "rel_err": False}

    @property
    def channels(self) -> int:
        return 1

    def loss_terms(self, output, target):
        return _valid_terms((output - target).abs(), target != 0)

    def output_distance(self, student, teacher, temperature):
        """L1; the temperature is segmentation's."""
        return (student - teacher).abs().mean()

    def meter(self) -> Meter:
        return DepthMeter()

    def baseline_output(self, targets):
        valid = targets != 0
        mean = targets.sum(dtype="f8") / valid.sum()
        return torch.full((1, 1, 1), float(mean.compute()))


@TASKS.register
class Normal(Task):
    """Surface normals: 1 - cosine over valid pixels of the L2-normalised prediction; angles."""

    name: ClassVar[str] = "normal"
    main_metric: ClassVar[str] = "mean_angle"
    directions: ClassVar[dict[str, bool]] = {
        "mean_angle": False,
        "median_angle": False,
        "within_11.25": True,
        "within_22.5": True,
        "within_30": True,
    }

    @property
    def channels(self) -> int:
        return 3

    def predict(self, output):
        return F.normalize(output, dim=1)

    def loss_terms(self, output, target):
        cosine = (self.predict(output) * target).sum(1)
        return _valid_terms(1 - cosine, target.abs().sum(1) > 0)

    def output_distance(self, student, teacher, temperature):
        """1 - cosine of the normalised predictions; the temperature is segmentation's."""
        return (1 - (self.predict(student) * self.predict(teacher)).sum(1)).mean()

    def meter(self) -> Meter:
        return NormalMeter()

    def baseline_output(self, targets):
        mean = targets.sum(axis=(0, 2, 3), dtype="f8").compute()
        return F.normalize(torch.tensor(mean, dtype=torch.float32), dim=0)[:, None, None]


def make_tasks(names: list[str], num_classes: int) -> dict[str, Task]:
    return {name: TASKS[name](num_classes) for name in names}


def higher_is_better(tasks: dict[str, Task]) -> dict[str, dict[str, bool]]:
    return {name: dict(task.directions) for name, task in tasks.items()}
