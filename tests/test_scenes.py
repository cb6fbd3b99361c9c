"""The built-in scenes: deterministic, and physically right labels."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.scenes import CLASS_NAMES, Camera, render_sample

H, W = 48, 64


def normals_from_depth(depth: np.ndarray, camera: Camera) -> np.ndarray:
    """Unit normal of the surface through back-projected neighbours (forward differences)."""
    points = depth[..., None] * camera.rays()
    along_u = points[:-1, 1:] - points[:-1, :-1]
    along_v = points[1:, :-1] - points[:-1, :-1]
    normal = np.cross(along_v, along_u)
    with np.errstate(invalid="ignore", divide="ignore"):  # degenerate where depth is invalid
        return normal / np.linalg.norm(normal, axis=-1, keepdims=True)


def angle_degrees(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cosine = (a.astype(np.float64) * b).sum(-1)
    return np.degrees(np.arccos(np.clip(cosine, -1, 1)))


def test_same_seed_gives_byte_identical_arrays():
    first, second = render_sample(3, "train", 5, H, W), render_sample(3, "train", 5, H, W)
    for name in ("image", "semseg", "depth", "normal"):
        assert getattr(first, name).tobytes() == getattr(second, name).tobytes()


def test_seeds_splits_and_indices_give_different_scenes():
    base = render_sample(0, "train", 0, H, W)
    for other in (
        render_sample(1, "train", 0, H, W),
        render_sample(0, "test", 0, H, W),
        render_sample(0, "train", 1, H, W),
    ):
        assert not np.array_equal(base.image, other.image)
        assert not np.array_equal(base.depth, other.depth)


def test_dtypes_and_shapes_are_the_prepared_layout():
    sample = render_sample(0, "train", 0, H, W)
    assert sample.image.shape == (3, H, W) and sample.image.dtype == np.uint8
    assert sample.semseg.shape == (H, W) and sample.semseg.dtype == np.int16
    assert sample.depth.shape == (1, H, W) and sample.depth.dtype == np.float32
    assert sample.normal.shape == (3, H, W) and sample.normal.dtype == np.float32


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), index=st.integers(0, 10_000))
def test_valid_normals_are_unit_facing_the_camera_and_depth_is_positive(seed, index):
    sample = render_sample(seed, "train", index, 24, 32)
    depth, normal = sample.depth[0], sample.normal.transpose(1, 2, 0)
    valid = depth > 0
    assert valid.mean() > 0.8
    np.testing.assert_allclose(np.linalg.norm(normal[valid], axis=-1), 1.0, atol=1e-5)
    assert (normal[~valid] == 0).all()
    assert (depth[valid] > 0.05).all() and (depth[valid] < 12).all()
    rays = Camera.for_image(24, 32).rays()
    assert ((normal * rays).sum(-1)[valid] < 1e-6).all()  # visible surfaces face the camera
    labels = sample.semseg
    assert labels.min() >= -1 and labels.max() < len(CLASS_NAMES)


def test_pixels_of_one_planar_surface_share_one_normal():
    checked = 0
    for index in range(10):
        sample = render_sample(0, "train", index, H, W)
        normal = sample.normal.transpose(1, 2, 0)
        valid = sample.depth[0] > 0
        for surface in np.unique(sample.surface[sample.planar]):
            on = (sample.surface == surface) & valid
            if on.sum() < 2:
                continue
            assert np.ptp(normal[on], axis=0).max() < 1e-6
            checked += 1
    assert checked > 50


def test_walls_floor_and_ceiling_have_the_room_normals():
    sample = render_sample(0, "train", 0, H, W)
    # Room faces are surface 0; part 2 is the floor, 3 the ceiling, others walls.
    up_in_camera = None
    for part, label in ((2, 0), (3, 2)):
        on = (sample.surface == part) & (sample.depth[0] > 0)
        if on.any():
            assert (sample.semseg[on & (sample.semseg >= 0)] == label).all()
            normal = sample.normal[:, on].T[0]
            up_in_camera = normal if part == 2 else -normal
    assert up_in_camera is not None
    walls = (sample.surface < 8) & ~np.isin(sample.surface, (2, 3)) & (sample.depth[0] > 0)
    wall_normals = sample.normal[:, walls].T
    assert np.abs(wall_normals @ up_in_camera).max() < 1e-5  # walls are vertical


def test_normals_agree_with_back_projected_depth():
    camera = Camera.for_image(H, W)
    planar_errors, all_errors = [], []
    for index in range(20):
        sample = render_sample(0, "train", index, H, W)
        fd = normals_from_depth(sample.depth[0], camera)
        s, d = sample.surface, sample.depth[0]
        same = (s[:-1, :-1] == s[1:, :-1]) & (s[:-1, :-1] == s[:-1, 1:])
        valid = (d[:-1, :-1] > 0) & (d[1:, :-1] > 0) & (d[:-1, 1:] > 0)
        mask = same & valid
        error = angle_degrees(fd, sample.normal.transpose(1, 2, 0)[:-1, :-1])
        planar_errors.append(error[mask & sample.planar[:-1, :-1]])
        all_errors.append(error[mask])
    planar, everything = np.concatenate(planar_errors), np.concatenate(all_errors)
    assert planar.max() < 0.5
    # Curved surfaces differ from a one-pixel chord; most pixels still agree closely.
    assert np.median(everything) < 0.5
    assert np.percentile(everything, 95) < 10


def test_invalid_pixels_are_a_small_fraction_in_blobs():
    holes = []
    for index in range(40):
        sample = render_sample(0, "train", index, H, W)
        invalid = sample.depth[0] == 0
        holes.append(invalid.mean())
        assert ((sample.normal == 0).all(axis=0) == invalid).all()
        if invalid.sum() > 4:  # blobs: most invalid pixels have an invalid neighbour
            neighbour = np.zeros_like(invalid)
            neighbour[1:] |= invalid[:-1]
            neighbour[:-1] |= invalid[1:]
            assert (neighbour[invalid]).mean() > 0.8
    assert 0.003 < np.mean(holes) < 0.06
    assert max(holes) < 0.2


def test_every_class_appears_and_colour_is_a_cue_but_not_the_answer():
    pixels, labels = [], []
    for index in range(60):
        sample = render_sample(0, "train", index, H, W)
        valid = sample.semseg >= 0
        pixels.append(sample.image[:, valid].T.astype(float))
        labels.append(sample.semseg[valid])
    x, y = np.concatenate(pixels), np.concatenate(labels)
    assert set(np.unique(y)) == set(range(len(CLASS_NAMES)))
    half = len(x) // 2
    centroids = np.stack([x[:half][y[:half] == c].mean(0) for c in range(len(CLASS_NAMES))])
    nearest = ((x[half:, None] - centroids) ** 2).sum(-1).argmin(1)
    accuracy = (nearest == y[half:]).mean()
    majority = np.bincount(y).max() / len(y)
    assert majority < accuracy < 0.95


@pytest.mark.parametrize("size", [(16, 24), (45, 61)])
def test_any_size_renders(size):
    sample = render_sample(0, "test", 0, *size)
    assert sample.image.shape == (3, *size)
