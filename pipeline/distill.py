"""Distillation losses: one registered class per `student.method` that distils (`kd`, the paper;
`url`, its authors' follow-up), matching the student's features to its teachers' through
adaptors, and the matching of predictions (`student.kd_outputs`) that either may add."""

from collections.abc import Collection
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import FEATURES
from pipeline.registry import Registry
from pipeline.tasks import Task

EPS = 1e-6


def normalize_pixels(features: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Each pixel's feature vector over the channels `dim`, divided by sqrt(sum_c f^2 + 1e-6): the
    paper's normalisation, which the distance below applies to both sides."""
    return features / (torch.linalg.vecdot(features, features, dim=dim).unsqueeze(dim) + EPS).sqrt()


def feature_distance(
    student: torch.Tensor, teacher: torch.Tensor, teacher_normalized: bool = False
) -> torch.Tensor:
    """Squared L2 distance between the per-pixel L2-normalised features (`f / sqrt(sum_c f^2 +
    1e-6)`), summed over channels and averaged over batch and pixels; the teacher is a constant.
    With `teacher_normalized`, the teacher is that normalisation already (a `normalized-int8`
    store) and is used as it is.

    Expanding |s/a - t/b|^2 with a^2 = ss + eps, b^2 = tt + eps gives ss/a^2 + tt/b^2 - 2 st/(ab):
    three channel sums instead of two normalised copies and their difference, half the time of
    the direct form (forward and backward) and the same value."""
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, teacher.shape[-2:], mode="bilinear", align_corners=False)
    teacher = teacher.detach().float()
    ss = torch.linalg.vecdot(student, student, dim=1) + EPS
    st = torch.linalg.vecdot(student, teacher, dim=1)
    tt = torch.linalg.vecdot(teacher, teacher, dim=1)
    if teacher_normalized:
        return ((ss - EPS) / ss + tt - 2 * st / ss.sqrt()).mean()
    tt = tt + EPS
    return ((ss - EPS) / ss + (tt - EPS) / tt - 2 * st / (ss * tt).sqrt()).mean()


class Distiller(nn.Module):
    """Per task and student feature tap, an adaptor, a 1x1 convolution without bias,
    xavier-normal initialised, mapping the student's channels to those of the teacher feature
    it is matched to (`targets`); the loss is `sum_t lambda_t sum_s d(adaptor(s), teacher_t)`
    with the per-pixel normalised distance `feature_distance`."""

    name: ClassVar[str]
    # student tap -> the teacher tap it is matched to
    targets: ClassVar[dict[str, str]]
    # The adaptors' Adam learning rate when params leave it null, and whether it follows a
    # cosine schedule over the student's epochs.
    adaptor_lr: ClassVar[float]
    adaptor_cosine: ClassVar[bool]
    # The loss sees each teacher feature normalised per pixel: stores that keep only that
    # normalisation (`normalized-int8`) serve it, for the tasks in `normalized_teachers`. A loss
    # that compares magnitudes sets this, and such stores are refused.
    uses_teacher_magnitudes: ClassVar[bool] = False

    def __init__(
        self,
        student_channels: dict[str, int],
        teacher_channels: dict[str, dict[str, int]],
        weights: dict[str, float],
        normalized_teachers: Collection[str] = (),
    ) -> None:
        super().__init__()
        self.weights = {task: weights[task] for task in teacher_channels}
        self.normalized_teachers = set(normalized_teachers)
        self.adaptors = nn.ModuleDict()
        for task, channels in teacher_channels.items():
            self.adaptors[task] = nn.ModuleDict(
                {
                    name: nn.Conv2d(student_channels[name], channels[target], 1, bias=False)
                    for name, target in self.targets.items()
                }
            )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight)

    @classmethod
    def teacher_features(cls) -> list[str]:
        """The teacher taps this loss reads."""
        return sorted(set(cls.targets.values()), key=FEATURES.index)

    def forward(
        self,
        student: dict[str, dict[str, torch.Tensor]],
        teachers: dict[str, dict[str, torch.Tensor]],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total and each distance, keyed `TASK.STUDENT_TAP`; `student[t]` holds the
        student's taps that serve task t (shared in SegNet, attended in MTAN)."""
        distances = {
            f"{task}.{name}": feature_distance(
                adaptors[name](student[task][name]),
                teachers[task][self.targets[name]],
                task in self.normalized_teachers,
            )
            for task, adaptors in self.adaptors.items()
            for name in self.targets
        }
        total = sum(
            self.weights[task] * distances[f"{task}.{name}"]
            for task in self.adaptors
            for name in self.targets
        )
        return total, distances


DISTILLERS: Registry[Distiller] = Registry("distillation method")


@DISTILLERS.register
class PaperKD(Distiller):
    """Li and Bilen (2020): each student tap matched to the same tap of each teacher, the
    bottleneck to the bottleneck and the last decoder feature to the last decoder feature."""

    name: ClassVar[str] = "kd"
    targets: ClassVar[dict[str, str]] = {"bottleneck": "bottleneck", "decoder": "decoder"}
    adaptor_lr: ClassVar[float] = 0.1
    adaptor_cosine: ClassVar[bool] = False


@DISTILLERS.register
class UniversalRepresentations(Distiller):
    """Li, Liu and Bilen (2022), dense prediction: both student taps matched to each teacher's
    last decoder feature, the adapted bottleneck upsampled to its resolution."""

    name: ClassVar[str] = "url"
    targets: ClassVar[dict[str, str]] = {"bottleneck": "decoder", "decoder": "decoder"}
    adaptor_lr: ClassVar[float] = 0.01
    adaptor_cosine: ClassVar[bool] = True


class OutputDistiller:
    """The student's predictions matched to its teachers' (`student.kd_outputs`), per task by the
    task's `output_distance` (per-pixel KL at a temperature for segmentation, L1 for depth,
    cosine for normals), weighted per task; tasks of weight 0 are left out."""

    def __init__(self, tasks: dict[str, Task], weights: dict[str, float], temperature: float):
        self.tasks = {name: task for name, task in tasks.items() if weights.get(name, 0) > 0}
        self.weights = {name: weights[name] for name in self.tasks}
        self.temperature = temperature

    def __call__(
        self, predictions: dict[str, torch.Tensor], teachers: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total and each task's distance, keyed `TASK.prediction`."""
        distances = {
            f"{name}.prediction": task.output_distance(
                predictions[name], teachers[name].detach().float(), self.temperature
            )
            for name, task in self.tasks.items()
        }
        total = sum(self.weights[name] * distances[f"{name}.prediction"] for name in self.tasks)
        return total, distances
