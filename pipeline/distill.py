"""The distillation loss of the paper: adaptors and per-pixel normalised feature distances."""

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import FEATURES

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
    """One adaptor per task and distilled feature: a 1x1 convolution without bias, xavier-normal
    initialised, mapping the student's channels to the teacher's."""

    # The loss sees each teacher feature normalised per pixel: stores that keep only that
    # normalisation (`normalized-int8`) serve it, for the tasks in `normalized_teachers`. A loss
    # that compares magnitudes sets this, and such stores are refused.
    uses_teacher_magnitudes = False

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
                    name: nn.Conv2d(student_channels[name], channels[name], 1, bias=False)
                    for name in FEATURES
                }
            )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight)

    def forward(
        self,
        student: dict[str, dict[str, torch.Tensor]],
        teachers: dict[str, dict[str, torch.Tensor]],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total, sum_t lambda_t (d_bottleneck + d_decoder), and each distance,
        keyed `TASK.FEATURE`; `student[t]` holds the student's taps that serve task t (shared in
        SegNet, attended in MTAN)."""
        distances = {
            f"{task}.{name}": feature_distance(
                adaptors[name](student[task][name]),
                teachers[task][name],
                task in self.normalized_teachers,
            )
            for task, adaptors in self.adaptors.items()
            for name in FEATURES
        }
        total = sum(
            self.weights[task] * distances[f"{task}.{name}"]
            for task in self.adaptors
            for name in FEATURES
        )
        return total, distances
