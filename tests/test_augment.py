"""Augmentation views: drawn reproducibly, replayed exactly, geometrically right."""

import numpy as np
import pytest
import torch

from pipeline.augment import IDENTITY, SCALES, apply_view, apply_views, draw_views


def sample(height: int = 12, width: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.uniform(0, 1, (3, height, width)).astype(np.float32))
    normal = torch.from_numpy(rng.normal(size=(3, height, width)).astype(np.float32))
    normal = normal / normal.norm(dim=0, keepdim=True)
    depth = torch.from_numpy(rng.uniform(1, 5, (1, height, width)).astype(np.float32))
    depth[0, 3:6, 4:8] = 0
    normal[:, 3:6, 4:8] = 0
    semseg = torch.from_numpy(rng.integers(-1, 7, (height, width)))
    return image, {"semseg": semseg, "depth": depth, "normal": normal}


def test_views_are_drawn_from_the_seed_and_index_alone():
    first = draw_views(0, 5, 4, 48, 64, augment=True)
    np.testing.assert_array_equal(first, draw_views(0, 5, 4, 48, 64, augment=True))
    assert not np.array_equal(first, draw_views(0, 6, 4, 48, 64, augment=True))
    assert not np.array_equal(first, draw_views(1, 5, 4, 48, 64, augment=True))
    many = np.concatenate([draw_views(0, i, 4, 48, 64, True) for i in range(50)])
    assert set(many[:, 0]) == set(np.float32(SCALES))
    assert set(many[:, 3]) == {0.0, 1.0}
    for scale, top, left, _flip in many:
        assert 0 <= top <= 48 - int(48 / scale) and 0 <= left <= 64 - int(64 / scale)


def test_without_augmentation_every_view_is_the_identity():
    np.testing.assert_array_equal(draw_views(0, 3, 2, 48, 64, augment=False), [IDENTITY] * 2)
    image, targets = sample()
    out_image, out_targets = apply_view(IDENTITY, image, targets)
    assert torch.equal(out_image, image)
    assert all(torch.equal(out_targets[k], targets[k]) for k in targets)


def test_replaying_a_view_is_exact():
    image, targets = sample()
    view = np.array([1.2, 1, 2, 1], np.float32)
    first = apply_view(view, image, targets)
    second = apply_view(view, image.clone(), {k: v.clone() for k, v in targets.items()})
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][k], second[1][k]) for k in targets)


def test_a_flip_mirrors_everything_and_negates_normal_x():
    image, targets = sample()
    out_image, out = apply_view(np.array([1.0, 0, 0, 1], np.float32), image, targets)
    assert torch.equal(out_image, image.flip(-1))
    assert torch.equal(out["semseg"], targets["semseg"].flip(-1))
    assert torch.equal(out["depth"], targets["depth"].flip(-1))
    expected = targets["normal"].flip(-1) * torch.tensor([-1.0, 1, 1])[:, None, None]
    assert torch.equal(out["normal"], expected)


def test_scale_crop_zooms_in_and_divides_depth_by_the_scale():
    image, targets = sample(height=12, width=16)
    view = np.array([1.5, 2, 3, 0], np.float32)  # an 8 x 10 crop at (2, 3), back to 12 x 16
    out_image, out = apply_view(view, image, targets)
    assert out_image.shape == (3, 12, 16) and out["depth"].shape == (1, 12, 16)
    crop = targets["depth"][:, 2:10, 3:13]
    # Nearest neighbour: every output depth is a crop depth divided by 1.5, zeros stay zero.
    values = set(np.round(crop.numpy().ravel() / 1.5, 5))
    assert set(np.round(out["depth"].numpy().ravel(), 5)) <= values
    assert (out["depth"] == 0).any()
    assert set(out["semseg"].unique().tolist()) <= set(
        targets["semseg"][2:10, 3:13].unique().tolist()
    )
    norms = out["normal"].norm(dim=0)
    assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0))
    assert out["semseg"].dtype == targets["semseg"].dtype
    # Corners of the bilinear (align_corners) image are the crop's corners.
    assert torch.allclose(out_image[:, 0, 0], image[:, 2, 3])
    assert torch.allclose(out_image[:, -1, -1], image[:, 9, 12])


def test_a_batch_applies_each_sample_its_own_view():
    pairs = [sample(seed=s) for s in range(3)]
    images = torch.stack([p[0] for p in pairs])
    targets = {k: torch.stack([p[1][k] for p in pairs]) for k in pairs[0][1]}
    views = np.array([IDENTITY, [1.2, 1, 1, 0], [1.5, 0, 2, 1]], np.float32)
    batch_image, batch_targets = apply_views(views, images, targets)
    for i, (image, target) in enumerate(pairs):
        one_image, one = apply_view(views[i], image, target)
        assert torch.equal(batch_image[i], one_image)
        assert all(torch.equal(batch_targets[k][i], one[k]) for k in one)


@pytest.mark.parametrize("scale", SCALES)
def test_crop_sizes_fit_every_scale(scale):
    for index in range(20):
        view = draw_views(3, index, 1, 13, 17, True)[0]
        image, targets = sample(13, 17)
        out_image, _ = apply_view(view, image, targets)
        assert out_image.shape == (3, 13, 17)
