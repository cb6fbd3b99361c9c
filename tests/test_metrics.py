"""Metrics on small hand-computed cases, and Delta_MTL's signs."""

import math

import numpy as np
import pytest
import torch

from pipeline.metrics import DepthMeter, NormalMeter, SegmentationMeter, delta_mtl


def test_segmentation_from_one_confusion_matrix_ignoring_minus_one():
    meter = SegmentationMeter(num_classes=3)
    # Batch 1: class 2 absent from target and prediction alike.
    meter.update(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 1, -1]]))
    # Batch 2: the ignored pixel's prediction does not count.
    meter.update(torch.tensor([[1, 2, 0]]), torch.tensor([[1, 2, -1]]))
    # Valid pairs (target, prediction): (0,0) (1,0) (1,1) (1,1) (2,2).
    # IoU: class 0: 1/(2+1-1)=1/2; class 1: 2/(3+2-2)=2/3; class 2: 1/1.
    result = meter.compute()
    assert result["mIoU"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert result["pixel_acc"] == pytest.approx(4 / 5)


def test_a_class_absent_from_the_whole_split_is_left_out_of_miou():
    meter = SegmentationMeter(num_classes=4)
    meter.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    # Class 0: 1/(2+1-1)=1/2; class 1: 1/(1+2-1)=1/2; classes 2 and 3 never appear.
    assert meter.compute()["mIoU"] == pytest.approx(0.5)


def test_batches_add_up_to_the_whole():
    rng = np.random.default_rng(0)
    prediction = torch.from_numpy(rng.integers(0, 5, (6, 8, 8)))
    target = torch.from_numpy(rng.integers(-1, 5, (6, 8, 8)))
    whole, parts = SegmentationMeter(5), SegmentationMeter(5)
    whole.update(prediction, target)
    for i in range(6):
        parts.update(prediction[i : i + 1], target[i : i + 1])
    assert whole.compute() == parts.compute()


def test_depth_errors_over_valid_pixels_of_the_split():
    meter = DepthMeter()
    meter.update(
        torch.tensor([[[[1.0, 2.0], [5.0, 9.0]]]]), torch.tensor([[[[2.0, 2.0], [0.0, 3.0]]]])
    )
    meter.update(torch.tensor([[[[4.0]]]]), torch.tensor([[[[5.0]]]]))
    # Valid: |1-2|=1 (rel 1/2), |2-2|=0, |9-3|=6 (rel 2), |4-5|=1 (rel 1/5); target 0 is invalid.
    result = meter.compute()
    assert result["abs_err"] == pytest.approx(8 / 4)
    assert result["rel_err"] == pytest.approx((0.5 + 0 + 2 + 0.2) / 4)


def unit(*vectors) -> torch.Tensor:
    """[1, 3, 1, n] normals from 3-vectors."""
    return torch.tensor(vectors, dtype=torch.float32).T[None, :, None, :]


def test_normal_angles_of_exactly_0_and_180_degrees():
    meter = NormalMeter()
    meter.update(unit([1, 0, 0], [0, 0, 1]), unit([1, 0, 0], [0, 0, -1]))
    angles = np.concatenate(meter.angles)
    np.testing.assert_allclose(angles, [0.0, 180.0], atol=1e-4)


def test_normal_median_is_over_all_pixels_not_a_mean_of_batch_medians():
    s = math.sqrt(0.5)
    meter = NormalMeter()
    # Batch 1: angles 0, 0, 90; batch 2: angles 45 and an invalid (zero) target.
    meter.update(unit([1, 0, 0], [1, 0, 0], [1, 0, 0]), unit([1, 0, 0], [1, 0, 0], [0, 1, 0]))
    meter.update(unit([1, 0, 0], [1, 0, 0]), unit([s, s, 0], [0, 0, 0]))
    result = meter.compute()
    assert result["median_angle"] == pytest.approx(22.5, abs=1e-3)  # median of 0, 0, 45, 90
    assert result["mean_angle"] == pytest.approx(135 / 4, abs=1e-3)
    assert result["within_11.25"] == pytest.approx(0.5)
    assert result["within_22.5"] == pytest.approx(0.5)
    assert result["within_30"] == pytest.approx(0.5)


def test_delta_mtl_signs_follow_the_metric_directions():
    directions = {"semseg": {"mIoU": True}, "depth": {"abs_err": False}}
    single = {"semseg": {"mIoU": 0.5}, "depth": {"abs_err": 1.0}}
    better = {"semseg": {"mIoU": 0.55}, "depth": {"abs_err": 0.9}}
    worse = {"semseg": {"mIoU": 0.45}, "depth": {"abs_err": 1.1}}
    assert delta_mtl(single, better, directions) == pytest.approx(10.0)
    assert delta_mtl(single, worse, directions) == pytest.approx(-10.0)
    assert delta_mtl(single, single, directions) == 0.0


def test_delta_mtl_averages_metrics_within_a_task_then_tasks():
    directions = {"a": {"x": True, "y": False}, "b": {"z": True}}
    single = {"a": {"x": 1.0, "y": 2.0}, "b": {"z": 4.0}}
    multi = {"a": {"x": 1.2, "y": 2.0}, "b": {"z": 3.0}}
    # a: mean(+0.2, 0) = +0.1; b: -0.25; mean over tasks: -0.075.
    assert delta_mtl(single, multi, directions) == pytest.approx(-7.5)
