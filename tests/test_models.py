"""The SegNet family: heads, feature taps, shapes and initialisation."""

import pytest
import torch

from pipeline.models import ARCHITECTURES, SegNet, build_model


def test_segnet_predicts_every_head_at_full_resolution_with_two_taps():
    model = build_model("segnet", [4, 8, 16], {"semseg": 7, "depth": 1, "normal": 3})
    output = model(torch.randn(2, 3, 24, 32))
    assert {k: tuple(v.shape) for k, v in output.predictions.items()} == {
        "semseg": (2, 7, 24, 32),
        "depth": (2, 1, 24, 32),
        "normal": (2, 3, 24, 32),
    }
    assert output.features["bottleneck"].shape == (2, 16, 3, 4)  # after the third pool
    assert output.features["decoder"].shape == (2, 4, 24, 32)
    assert model.feature_channels() == {"bottleneck": 16, "decoder": 4}


def test_sizes_that_do_not_halve_evenly_come_back_whole():
    model = SegNet([4, 8], {"depth": 1})
    assert model(torch.randn(1, 3, 13, 18)).predictions["depth"].shape == (1, 1, 13, 18)


def test_a_teacher_is_the_same_class_with_one_head():
    teacher = build_model("segnet", [4, 8], {"depth": 1})
    student = build_model("segnet", [4, 8], {"semseg": 5, "depth": 1})
    shared = {k for k in student.state_dict() if not k.startswith("task_heads")}
    assert shared == {k for k in teacher.state_dict() if not k.startswith("task_heads")}


def test_levels_follow_the_official_layout():
    model = SegNet([64, 128, 256, 512, 512], {"semseg": 13})
    convs = [
        sum(isinstance(m, torch.nn.Conv2d) for m in block.modules()) for block in model.encoder
    ]
    assert convs == [2, 2, 3, 3, 3]
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == pytest.approx(24.98e6, rel=0.02)  # the paper's single-task SegNet


def test_initialisation_is_seeded_and_biases_start_at_zero():
    torch.manual_seed(1)
    first = build_model("segnet", [4, 8], {"depth": 1}).state_dict()
    torch.manual_seed(1)
    second = build_model("segnet", [4, 8], {"depth": 1}).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(v.abs().sum() == 0 for k, v in first.items() if k.endswith("0.bias"))


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(Exception, match="unknown architecture 'unet'; known: segnet"):
        build_model("unet", [4], {"depth": 1})
    assert "segnet" in ARCHITECTURES


def test_mtan_has_attended_taps_per_task_over_the_shared_segnet():
    model = build_model("mtan", [4, 8, 16], {"semseg": 7, "normal": 3})
    output = model(torch.randn(2, 3, 24, 32))
    assert set(output.task_features) == {"semseg", "normal"}
    for task in ("semseg", "normal"):
        taps = output.features_of(task)
        assert taps["bottleneck"].shape == (2, 16, 3, 4)
        assert taps["decoder"].shape == (2, 4, 24, 32)
        assert not torch.equal(taps["decoder"], output.features["decoder"])
    assert output.predictions["normal"].shape == (2, 3, 24, 32)
    # Without a branch of its own, a task reads the shared taps.
    assert output.features_of("depth") is output.features
    assert model.feature_channels() == {"bottleneck": 16, "decoder": 4}


def test_mtan_task_features_are_the_shared_features_gated_by_masks_in_zero_one():
    model = build_model("mtan", [4, 8], {"depth": 1}).eval()
    output = model(torch.randn(2, 3, 16, 16))
    shared, attended = output.features["decoder"], output.task_features["depth"]["decoder"]
    assert (attended.abs() <= shared.abs()).all()
    assert (attended[shared == 0] == 0).all()
    assert (attended[shared > 0] > 0).all()


def test_the_teacher_taps_of_a_single_task_network():
    segnet = build_model("segnet", [4, 8], {"depth": 1}).eval()
    images = torch.randn(1, 3, 16, 16)
    assert torch.equal(
        segnet.distilled_features(images)["decoder"], segnet(images).features["decoder"]
    )
    mtan = build_model("mtan", [4, 8], {"depth": 1}).eval()
    expected = mtan(images).task_features["depth"]["decoder"]
    assert torch.equal(mtan.distilled_features(images)["decoder"], expected)
