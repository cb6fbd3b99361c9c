"""Augmentation views that can be replayed exactly.

A view is four numbers: the scale s, the top-left corner (top, left) of a crop of size
(H / s, W / s), and a horizontal flip (0 or 1). Applying it crops, resizes back to (H, W) and flips:
the image bilinearly (as MTAN's RandomScaleCrop, which the paper's follow-up uses), the targets by
nearest neighbour so that labels, invalid pixels and unit normals stay exact; depth is divided by
the scale (zooming in brings the scene closer) and a flip negates the normal's x component.

The feature extractor draws the views, stores them beside the teacher's features and runs the
teacher on them; the student replays the stored numbers with the same function, so a cached feature
always matches the view the student sees. A cached feature map itself is never flipped or cropped:
that does not give the feature of the transformed image.
"""

import numpy as np
import torch
import torch.nn.functional as F

SCALES = (1.0, 1.2, 1.5)
IDENTITY = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
FLIP_NORMAL = torch.tensor([-1.0, 1.0, 1.0])[:, None, None]  # a mirrored image mirrors normals' x


def draw_views(
    seed: int, index: int, views: int, height: int, width: int, augment: bool
) -> np.ndarray:
    """`views` parameter sets [views, 4] for sample `index`; identity views when not augmenting.

    Drawn from a generator seeded by (seed, index) alone, so any process extracting any shard
    draws the same views for a sample."""
    if not augment:
        return np.tile(IDENTITY, (views, 1))
    rng = np.random.default_rng([seed, index])
    return np.stack([random_view(rng, height, width) for _ in range(views)])


def random_view(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One view: a scale from SCALES, a crop corner that fits, a coin flip."""
    scale = SCALES[rng.integers(len(SCALES))]
    crop_h, crop_w = crop_size(scale, height, width)
    top, left = rng.integers(height - crop_h + 1), rng.integers(width - crop_w + 1)
    return np.array([scale, top, left, rng.integers(2)], dtype=np.float32)


def crop_size(scale: float, height: int, width: int) -> tuple[int, int]:
    return int(height / scale), int(width / scale)


def apply_view(
    view: np.ndarray, image: torch.Tensor, targets: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Apply one view to an image [3, H, W] and its targets (`semseg` [H, W], `depth` [1, H, W],
    `normal` [3, H, W], any subset)."""
    scale, top, left, flip = float(view[0]), int(view[1]), int(view[2]), bool(view[3])
    if scale == 1.0 and not flip:
        return image, targets
    height, width = image.shape[-2:]
    crop_h, crop_w = crop_size(scale, height, width)
    window = (slice(top, top + crop_h), slice(left, left + crop_w))

    def resize(x: torch.Tensor, mode: str) -> torch.Tensor:
        x = x[(..., *window)]
        if scale != 1.0:
            kwargs = {"align_corners": True} if mode == "bilinear" else {}
            x = F.interpolate(x[None].float(), (height, width), mode=mode, **kwargs)[0]
        return x.flip(-1) if flip else x

    image = resize(image, "bilinear")
    out = {}
    for name, target in targets.items():
        if name == "semseg":
            out[name] = resize(target[None], "nearest")[0].to(target.dtype)
        else:
            out[name] = resize(target, "nearest")
            if name == "depth":
                out[name] = out[name] / scale
            elif name == "normal" and flip:
                out[name] = out[name] * FLIP_NORMAL
    return image, out


def apply_views(
    views: np.ndarray, images: torch.Tensor, targets: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`apply_view` per sample of a batch; views [B, 4]."""
    pairs = [
        apply_view(view, images[i], {name: t[i] for name, t in targets.items()})
        for i, view in enumerate(views)
    ]
    return (
        torch.stack([image for image, _ in pairs]),
        {name: torch.stack([t[name] for _, t in pairs]) for name in targets},
    )
