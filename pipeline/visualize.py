"""Pictures of predictions: class colours, a depth colour map, normals as RGB."""

import numpy as np
from PIL import Image, ImageDraw

# Anchors of the viridis colour map; depth is interpolated between them.
VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
PALETTE = np.array(
    [
        [230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66], [0, 114, 178],
        [213, 94, 0], [204, 121, 167], [153, 153, 153], [127, 60, 141], [17, 165, 121],
        [57, 105, 172], [242, 183, 1], [231, 63, 116], [128, 186, 90], [230, 131, 16],
    ],
    dtype=np.uint8,
)  # fmt: skip


def colour_classes(labels: np.ndarray) -> np.ndarray:
    """[H, W] labels to RGB; ignored (-1) pixels black."""
    rgb = PALETTE[np.clip(labels, 0, None) % len(PALETTE)]
    rgb[labels < 0] = 0
    return rgb


def colour_depth(depth: np.ndarray, low: float, high: float) -> np.ndarray:
    """[H, W] depth to RGB on a shared [low, high] range; invalid (0) pixels black."""
    t = np.clip((depth - low) / max(high - low, 1e-6), 0, 1) * (len(VIRIDIS) - 1)
    below = np.minimum(t.astype(int), len(VIRIDIS) - 2)
    frac = (t - below)[..., None]
    rgb = (VIRIDIS[below] * (1 - frac) + VIRIDIS[below + 1] * frac).astype(np.uint8)
    rgb[depth == 0] = 0
    return rgb


def colour_normals(normal: np.ndarray) -> np.ndarray:
    """[3, H, W] unit normals to RGB ((n + 1) / 2); invalid (zero) pixels black."""
    rgb = ((normal.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    rgb[np.abs(normal).sum(0) == 0] = 0
    return rgb


def grid(rows: list[list[np.ndarray]], titles: list[str], scale: int = 2) -> Image.Image:
    """Lay out equal-size RGB cells [H, W, 3] in rows, with a title above each column."""
    height, width = rows[0][0].shape[:2]
    cell_h, cell_w, header, gap = height * scale, width * scale, 14, 2
    canvas = Image.new(
        "RGB",
        (len(titles) * (cell_w + gap), header + len(rows) * (cell_h + gap)),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(titles):
        draw.text((column * (cell_w + gap) + 2, 1), title, fill="black")
    for r, row in enumerate(rows):
        for column, cell in enumerate(row):
            image = Image.fromarray(cell).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(image, (column * (cell_w + gap), header + r * (cell_h + gap)))
    return canvas


def _with_strip(rgb: np.ndarray, strip_height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """The picture with a white strip of `strip_height` pixels below it, at least 160 wide."""
    height, width = rgb.shape[:2]
    canvas = Image.new("RGB", (max(width, 160), height + strip_height), "white")
    canvas.paste(Image.fromarray(rgb), (0, 0))
    return canvas, ImageDraw.Draw(canvas)


def with_legend(rgb: np.ndarray, entries: list[tuple[np.ndarray, str]]) -> Image.Image:
    """The picture above a legend: a swatch and a name per (colour, name) entry."""
    line = 14
    canvas, draw = _with_strip(rgb, line * len(entries) + 4)
    top = rgb.shape[0] + 2
    for row, (colour, name) in enumerate(entries):
        y = top + row * line
        draw.rectangle((2, y + 1, 12, y + 11), fill=tuple(int(c) for c in colour))
        draw.text((16, y), name, fill="black")
    return canvas


def with_colour_bar(rgb: np.ndarray, low: float, high: float, unit: str) -> Image.Image:
    """The picture above a colour bar of `colour_depth`'s map from `low` to `high`, in `unit`."""
    canvas, draw = _with_strip(rgb, 30)
    width = canvas.width - 4
    ramp = np.linspace(low, high, width)[None].repeat(10, 0)
    bar = colour_depth(np.where(ramp == 0, 1e-9, ramp), low, high)  # 0 is not invalid here
    canvas.paste(Image.fromarray(bar), (2, rgb.shape[0] + 2))
    top = rgb.shape[0] + 14
    draw.text((2, top), f"{low:.2f} {unit}", fill="black")
    label = f"{high:.2f} {unit}"
    draw.text((canvas.width - 2 - 6 * len(label), top), label, fill="black")
    return canvas
