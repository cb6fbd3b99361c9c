"""Dense-prediction metrics as LibMTL defines them for NYU-v2, accumulated over a whole split.

Meters take one batch at a time and keep only running sums (a confusion matrix, error sums), except
the normal meter, which keeps every valid pixel's angle as float32 because the median is over all
valid pixels of the split, not an average of batch medians. Depth errors are averages over all
valid pixels of the split; LibMTL 1.1.5 averages per-batch means weighted by each batch's count of
valid pixels (its `bs` is taken after masking), which is the same number.
"""

import math
from abc import ABC, abstractmethod

import numpy as np
import torch


class Meter(ABC):
    """Accumulates one task's metrics over batches."""

    @abstractmethod
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of post-processed predictions and their targets."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metrics over everything added so far."""

    @abstractmethod
    def merge(self, other: "Meter") -> "Meter":
        """This meter with everything `other` was given added (another process's share)."""


class SegmentationMeter(Meter):
    """mIoU and pixel accuracy from one confusion matrix; labels below 0 are ignored.

    mIoU averages the IoU of the classes present in the target or the prediction; a class absent
    from both has no IoU and is left out (LibMTL's plain mean would be NaN).
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        valid = (target >= 0) & (target < self.num_classes)
        pairs = target[valid].long() * self.num_classes + prediction[valid].long()
        counts = torch.bincount(pairs.cpu(), minlength=self.num_classes**2)
        self.confusion += counts.reshape(self.num_classes, self.num_classes)

    def merge(self, other: "SegmentationMeter") -> "SegmentationMeter":
        self.confusion += other.confusion
        return self

    def compute(self) -> dict[str, float]:
        h = self.confusion.double()
        hits = h.diag()
        union = h.sum(0) + h.sum(1) - hits
        present = union > 0
        miou = (hits[present] / union[present]).mean().item() if present.any() else math.nan
        total = h.sum().item()
        return {"mIoU": miou, "pixel_acc": hits.sum().item() / total if total else math.nan}


class DepthMeter(Meter):
    """Absolute and relative error over valid pixels (target != 0)."""

    def __init__(self) -> None:
        self.abs_sum = 0.0
        self.rel_sum = 0.0
        self.count = 0

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        valid = target != 0
        error = (prediction[valid] - target[valid]).abs().double()
        self.abs_sum += error.sum().item()
        self.rel_sum += (error / target[valid].double()).sum().item()
        self.count += int(valid.sum())

    def merge(self, other: "DepthMeter") -> "DepthMeter":
        self.abs_sum += other.abs_sum
        self.rel_sum += other.rel_sum
        self.count += other.count
        return self

    def compute(self) -> dict[str, float]:
        if not self.count:
            return {"abs_err": math.nan, "rel_err": math.nan}
        return {"abs_err": self.abs_sum / self.count, "rel_err": self.rel_sum / self.count}


NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)


def angles_degrees(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Angle between unit vectors along dim 1, at the valid pixels (non-zero target)."""
    valid = target.abs().sum(1) > 0
    cosine = (prediction * target).sum(1)[valid].clamp(-1, 1)
    return torch.rad2deg(torch.acos(cosine.double())).float()


class NormalMeter(Meter):
    """Mean and median angle in degrees, and the share of pixels within 11.25, 22.5 and 30 degrees.

    Predictions must be unit vectors (the normal task normalises them)."""

    def __init__(self) -> None:
        self.angles: list[np.ndarray] = []

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        self.angles.append(angles_degrees(prediction, target).cpu().numpy())

    def merge(self, other: "NormalMeter") -> "NormalMeter":
        """Every angle of both, so the median stays exact."""
        self.angles += other.angles
        return self

    def compute(self) -> dict[str, float]:
        angles = np.concatenate(self.angles) if self.angles else np.empty(0, np.float32)
        if not len(angles):
            return {"mean_angle": math.nan, "median_angle": math.nan} | {
                f"within_{t:g}": math.nan for t in NORMAL_THRESHOLDS
            }
        result = {
            "mean_angle": float(angles.astype(np.float64).mean()),
            "median_angle": float(np.median(angles)),
        }
        for threshold in NORMAL_THRESHOLDS:
            result[f"within_{threshold:g}"] = float((angles < threshold).mean())
        return result


def delta_mtl(
    single: dict[str, dict[str, float]],
    multi: dict[str, dict[str, float]],
    higher_is_better: dict[str, dict[str, bool]],
) -> float:
    """LibMTL's Delta_MTL in percent: the mean over tasks of the mean over that task's metrics of
    (-1)^w (B - N) / B, with B the single-task value, N the multi-task value and w = 1 when higher
    is better. Positive means the multi-task model does better on average."""
    per_task = []
    for task, metrics in single.items():
        gains = [
            (multi[task][m] - b) / b if higher_is_better[task][m] else (b - multi[task][m]) / b
            for m, b in metrics.items()
        ]
        per_task.append(sum(gains) / len(gains))
    return 100.0 * sum(per_task) / len(per_task)
