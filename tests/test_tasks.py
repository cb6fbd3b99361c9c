"""Task losses mask what they must, and the task registry's contract."""

import dask.array as da
import numpy as np
import pytest
import torch

from pipeline.tasks import TASKS, make_tasks


def test_registry_holds_the_three_tasks_with_their_heads():
    tasks = make_tasks(["semseg", "depth", "normal"], num_classes=7)
    assert {name: t.channels for name, t in tasks.items()} == {"semseg": 7, "depth": 1, "normal": 3}
    for task in tasks.values():
        assert task.main_metric in task.directions
        assert set(task.meter().compute()) == set(task.directions)


def test_semseg_loss_ignores_minus_one():
    task = TASKS["semseg"](3)
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 2], [-1, -1]]])
    expected = (
        -(torch.log_softmax(logits, 1)[0, 0, 0, 0] + torch.log_softmax(logits, 1)[0, 2, 0, 1]) / 2
    )
    assert task.loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    all_ignored = task.loss(logits.requires_grad_(), torch.full((1, 2, 2), -1))
    assert all_ignored.item() == 0.0
    all_ignored.backward()  # no NaN gradient either
    assert torch.isfinite(logits.grad).all()


def test_depth_loss_is_l1_over_valid_pixels():
    task = TASKS["depth"](3)
    prediction = torch.tensor([[[[1.0, 5.0], [2.0, 100.0]]]])
    target = torch.tensor([[[[2.0, 4.0], [2.0, 0.0]]]])
    assert task.loss(prediction, target).item() == pytest.approx((1 + 1 + 0) / 3)
    assert task.loss(prediction, torch.zeros_like(target)).item() == 0.0


def test_normal_loss_is_one_minus_cosine_of_the_normalised_prediction():
    task = TASKS["normal"](3)
    prediction = torch.tensor([[5.0, 0.0, 7.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]).T
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).T
    # Pixel 1: cosine 0 (loss 1); pixel 0: scaled x, cosine 5/sqrt(74); pixel 2 invalid.
    expected = ((1 - 5 / np.sqrt(74)) + 1) / 2
    loss = task.loss(prediction[None, :, None, :], target[None, :, None, :])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    predicted = task.predict(prediction[None, :, None, :])
    np.testing.assert_allclose(
        predicted[0, :, 0, 0].numpy(), [5 / np.sqrt(74), 0, 7 / np.sqrt(74)], rtol=1e-6
    )


def test_baselines_are_the_trivial_predictions():
    semseg = da.from_array(np.array([[[2, 2, -1], [1, 2, 0]]]), chunks=1)
    output = TASKS["semseg"](3).baseline_output(semseg)
    assert output.shape == (3, 1, 1) and output.argmax().item() == 2
    depth = da.from_array(np.array([[[[1.0, 0.0], [2.0, 6.0]]]], dtype=np.float16), chunks=1)
    assert TASKS["depth"](3).baseline_output(depth).item() == pytest.approx(3.0)
    normal = np.zeros((2, 3, 1, 2), np.float32)
    normal[0, :, 0, 0] = [0, 0, 1]
    normal[1, :, 0, 1] = [0, 1, 0]
    mean = TASKS["normal"](3).baseline_output(da.from_array(normal, chunks=1))
    np.testing.assert_allclose(mean[:, 0, 0].numpy(), [0, np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)
