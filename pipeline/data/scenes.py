"""The built-in dataset: indoor-like rooms rendered by numpy ray casting.

A camera stands inside a box-shaped room (floor, four walls, ceiling) holding boxes, spheres,
cylinders and pictures on the walls. Each pixel's ray is intersected with every surface; the nearest
hit gives the semantic class, the depth along the optical axis and the surface normal in the camera
frame. Colour comes from a per-class albedo with a procedural texture, shaded by a point light
(Lambertian, with cast shadows) plus an ambient term: colour carries class cues, shading carries
shape cues. Blobs of invalid pixels mimic the holes of a depth sensor and unlabelled regions.

Conventions: world frame y up; camera frame x right, y down, z forward (the optical axis); normals
are unit vectors pointing towards the camera. Every random draw comes from a generator seeded by
(data seed, split, sample index), so a sample is the same bytes whichever chunk renders it.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pipeline.data.sources import SOURCES, SPLITS, DataSource

CLASS_NAMES = ("floor", "wall", "ceiling", "box", "sphere", "cylinder", "picture")
FLOOR, WALL, CEILING, BOX, SPHERE, CYLINDER, PICTURE = range(len(CLASS_NAMES))

# Linear-light albedo per class; pictures draw their own colours.
CLASS_ALBEDO = np.array(
    [
        [0.42, 0.26, 0.13],  # floor: wood
        [0.72, 0.68, 0.58],  # wall: beige
        [0.86, 0.86, 0.84],  # ceiling: white
        [0.20, 0.30, 0.60],  # box: blue
        [0.70, 0.15, 0.10],  # sphere: red
        [0.18, 0.50, 0.22],  # cylinder: green
        [0.50, 0.50, 0.50],  # picture: replaced per instance
    ]
)
HFOV_DEGREES = 60.0
EPS = 1e-6


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics; `rays` has z = 1, so a hit's ray parameter is its depth."""

    height: int
    width: int
    focal: float

    @classmethod
    def for_image(cls, height: int, width: int) -> "Camera":
        return cls(height, width, 0.5 * width / np.tan(np.radians(HFOV_DEGREES) / 2))

    @property
    def centre(self) -> tuple[float, float]:
        return self.width / 2, self.height / 2

    def rays(self) -> np.ndarray:
        """Camera-frame ray through each pixel centre, [H, W, 3] with z = 1."""
        cx, cy = self.centre
        v, u = np.mgrid[0 : self.height, 0 : self.width] + 0.5
        ones = np.ones((self.height, self.width))
        return np.stack([(u - cx) / self.focal, (v - cy) / self.focal, ones], axis=-1)


def _safe(d: np.ndarray) -> np.ndarray:
    """Direction components with exact zeros nudged, so slab divisions stay finite."""
    return np.where(np.abs(d) < 1e-12, 1e-12, d)


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


@dataclass(frozen=True, kw_only=True)
class Surface(ABC):
    """Something rays can hit. `intersect(origin, dirs)` takes one origin or one per ray and
    returns, per ray, the hit parameter (inf on a miss), the world normal facing the ray origin and
    the index of the part hit (a face of a box)."""

    semclass: int
    albedo: np.ndarray
    planar_parts: ClassVar[frozenset[int]] = frozenset()  # parts that lie in one plane

    @abstractmethod
    def intersect(self, origin: np.ndarray, dirs: np.ndarray):
        """(t, normal, part) per ray."""

    def semantic(self, part: np.ndarray) -> np.ndarray:
        """Semantic class of each hit part."""
        return np.full(part.shape, self.semclass, dtype=np.int16)

    def texture(self, points: np.ndarray, part: np.ndarray) -> np.ndarray:
        """Albedo of the hit points [n, 3]."""
        return np.broadcast_to(self.albedo, points.shape).copy()


def _slab(origin_local: np.ndarray, dirs_local: np.ndarray, half: np.ndarray):
    """Entry into an axis-aligned box centred at 0 (rays from outside): t, axis, face part."""
    d = _safe(dirs_local)
    t1 = (-half - origin_local) / d
    t2 = (half - origin_local) / d
    t_near = np.minimum(t1, t2)
    t_far = np.maximum(t1, t2).min(axis=-1)
    axis = t_near.argmax(axis=-1)
    t = t_near.max(axis=-1)
    hit = (t <= t_far) & (t > EPS)
    sign = -np.sign(np.take_along_axis(d, axis[..., None], axis=-1)[..., 0])
    part = axis * 2 + (sign > 0)
    return np.where(hit, t, np.inf), axis, sign, part


@dataclass(frozen=True, kw_only=True)
class Room(Surface):
    """The inside of an axis-aligned box: floor y=0, ceiling y=height, walls at x=±w/2, z=±d/2."""

    size: np.ndarray  # (width, height, depth)
    wall_albedo: np.ndarray
    ceiling_albedo: np.ndarray
    planar_parts: ClassVar[frozenset[int]] = frozenset(range(6))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        w, h, d = self.size
        return np.array([-w / 2, 0.0, -d / 2]), np.array([w / 2, h, d / 2])

    def intersect(self, origin, dirs):
        low, high = self.bounds()
        d = _safe(dirs)
        t_exit = np.where(d > 0, (high - origin) / d, (low - origin) / d)
        axis = t_exit.argmin(axis=-1)
        t = t_exit.min(axis=-1)
        normal = np.zeros_like(dirs)
        direction_sign = np.sign(np.take_along_axis(d, axis[..., None], axis=-1)[..., 0])
        np.put_along_axis(normal, axis[..., None], -direction_sign[..., None], axis=-1)
        part = axis * 2 + (direction_sign > 0)  # 2: floor, 3: ceiling
        return t, normal, part

    def semantic(self, part: np.ndarray) -> np.ndarray:
        return np.select([part == 2, part == 3], [FLOOR, CEILING], WALL).astype(np.int16)

    def texture(self, points, part):
        x, z = points[:, 0], points[:, 2]
        floor, ceiling = part == 2, part == 3
        plank = np.floor(x / 0.25)
        floor_shade = 0.8 + 0.2 * ((plank * 0.618) % 1.0) + 0.05 * np.sin(z * 40 + plank)
        along_wall = np.where(part < 2, z, x)
        wall_shade = 0.9 + 0.1 * (np.sin(2 * np.pi * along_wall / 0.3) > 0)
        shade = np.select([floor, ceiling], [floor_shade, np.ones_like(x)], wall_shade)
        albedo = np.select(
            [floor[:, None], ceiling[:, None]],
            [self.albedo, self.ceiling_albedo],
            self.wall_albedo,
        )
        return albedo * shade[:, None]


@dataclass(frozen=True, kw_only=True)
class Box(Surface):
    """A box resting on (or hung from) something, rotated by `yaw` about the vertical."""

    centre: np.ndarray
    half: np.ndarray
    yaw: float = 0.0
    pattern: np.ndarray | None = None  # second colour of a picture's checker pattern
    planar_parts: ClassVar[frozenset[int]] = frozenset(range(6))

    def intersect(self, origin, dirs):
        rotation = _yaw_matrix(self.yaw)
        t, axis, sign, part = _slab((origin - self.centre) @ rotation, dirs @ rotation, self.half)
        normal_local = np.zeros_like(dirs)
        np.put_along_axis(normal_local, axis[..., None], sign[..., None], axis=-1)
        return t, normal_local @ rotation.T, part

    def texture(self, points, part):
        local = (points - self.centre) @ _yaw_matrix(self.yaw)
        if self.pattern is not None:
            checker = (np.floor(local[:, 0] / 0.12) + np.floor(local[:, 1] / 0.12)) % 2
            return np.where(checker[:, None] > 0, self.albedo, self.pattern)
        grain = 0.85 + 0.15 * np.sin(2 * np.pi * (3 * local[:, 0] + 0.3 * np.sin(7 * local[:, 1])))
        return self.albedo * grain[:, None]


@dataclass(frozen=True, kw_only=True)
class Sphere(Surface):
    centre: np.ndarray
    radius: float

    def intersect(self, origin, dirs):
        offset = origin - self.centre
        a = (dirs * dirs).sum(-1)
        b = 2 * (dirs * offset).sum(-1)
        c = (offset * offset).sum(-1) - self.radius**2
        disc = b * b - 4 * a * c
        t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
        t = np.where((disc > 0) & (t > EPS), t, np.inf)
        points = origin + np.where(np.isfinite(t), t, 0)[..., None] * dirs
        return t, (points - self.centre) / self.radius, np.zeros(t.shape, dtype=int)

    def texture(self, points, part):
        local = points - self.centre
        sector = np.sin(4 * np.arctan2(local[:, 2], local[:, 0])) > 0
        return self.albedo * np.where(sector, 1.0, 0.55)[:, None]


@dataclass(frozen=True, kw_only=True)
class Cylinder(Surface):
    """A vertical cylinder standing on the floor: side (part 0) and top cap (part 1)."""

    base: np.ndarray  # (x, z) of the axis
    radius: float
    height: float
    planar_parts: ClassVar[frozenset[int]] = frozenset({1})

    def intersect(self, origin, dirs):
        ox, oz = origin[..., 0] - self.base[0], origin[..., 2] - self.base[1]
        dx, dz = dirs[..., 0], dirs[..., 2]
        a = np.maximum(dx * dx + dz * dz, 1e-12)
        b = 2 * (dx * ox + dz * oz)
        c = ox * ox + oz * oz - self.radius**2
        disc = b * b - 4 * a * c
        t_side = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
        y_side = origin[..., 1] + t_side * dirs[..., 1]
        side = (disc > 0) & (t_side > EPS) & (y_side >= 0) & (y_side <= self.height)
        t_side = np.where(side, t_side, np.inf)

        dy = np.where(np.abs(dirs[..., 1]) < 1e-12, -1e-12, dirs[..., 1])
        t_cap = (self.height - origin[..., 1]) / dy
        cap_x, cap_z = ox + t_cap * dx, oz + t_cap * dz
        cap = (dy < 0) & (t_cap > EPS) & (cap_x**2 + cap_z**2 <= self.radius**2)
        t_cap = np.where(cap, t_cap, np.inf)

        on_cap = t_cap < t_side
        t = np.minimum(t_side, t_cap)
        points = origin + np.where(np.isfinite(t), t, 0)[..., None] * dirs
        side_normal = np.stack(
            [points[..., 0] - self.base[0], np.zeros_like(t), points[..., 2] - self.base[1]], -1
        )
        side_normal /= self.radius
        normal = np.where(on_cap[..., None], np.array([0.0, 1.0, 0.0]), side_normal)
        return t, normal, on_cap.astype(int)

    def texture(self, points, part):
        rings = np.sin(2 * np.pi * points[:, 1] / 0.15) > 0
        return self.albedo * np.where(rings & (part == 0), 0.75, 1.0)[:, None]


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one sample."""

    camera_position: np.ndarray
    camera_rotation: np.ndarray  # columns: camera x, y, z axes in world coordinates
    surfaces: tuple[Surface, ...]
    light: np.ndarray
    ambient: float


@dataclass(frozen=True)
class Rendering:
    """A rendered sample; `surface` and `planar` are kept for checks of the geometry."""

    image: np.ndarray  # uint8 [3, H, W]
    semseg: np.ndarray  # int16 [H, W], -1 invalid
    depth: np.ndarray  # float32 [1, H, W], 0 invalid
    normal: np.ndarray  # float32 [3, H, W], unit, 0 invalid
    surface: np.ndarray  # int [H, W]: 8 * surface index + part
    planar: np.ndarray  # bool [H, W]: the pixel lies on a planar part


def _look_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    forward = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), -np.cos(yaw) * np.cos(pitch)])
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c, s = np.cos(roll), np.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    return np.stack([right, down, forward], axis=1)


def _jitter(rng: np.random.Generator, albedo: np.ndarray, spread: float = 0.12) -> np.ndarray:
    return np.clip(albedo * rng.uniform(1 - spread, 1 + spread, 3), 0.0, 1.0)


def _place_objects(rng: np.random.Generator, room: Room, camera_z: float) -> list[Surface]:
    """Objects standing on the floor between the far wall and the camera, not overlapping."""
    low, high = room.bounds()
    footprints: list[tuple[float, float, float]] = []
    objects: list[Surface] = []
    for _ in range(rng.integers(2, 8)):
        kind = rng.choice([BOX, SPHERE, CYLINDER])
        if kind == BOX:
            half = rng.uniform([0.15, 0.15, 0.15], [0.7, 0.8, 0.7])
            reach = float(np.hypot(half[0], half[2]))
        elif kind == SPHERE:
            radius = rng.uniform(0.15, 0.55)
            reach = radius
        else:
            radius, height = rng.uniform(0.12, 0.4), rng.uniform(0.3, 1.6)
            reach = radius
        for _attempt in range(30):
            x = rng.uniform(low[0] + reach + 0.05, high[0] - reach - 0.05)
            z = rng.uniform(low[2] + reach + 0.05, camera_z - reach - 0.8)
            if all(np.hypot(x - fx, z - fz) > reach + fr + 0.05 for fx, fz, fr in footprints):
                break
        else:
            continue
        footprints.append((x, z, reach))
        albedo = _jitter(rng, CLASS_ALBEDO[kind])
        if kind == BOX:
            centre = np.array([x, half[1], z])
            yaw = rng.uniform(0, np.pi)
            objects.append(Box(semclass=BOX, albedo=albedo, centre=centre, half=half, yaw=yaw))
        elif kind == SPHERE:
            centre = np.array([x, radius, z])
            objects.append(Sphere(semclass=SPHERE, albedo=albedo, centre=centre, radius=radius))
        else:
            base = np.array([x, z])
            objects.append(
                Cylinder(semclass=CYLINDER, albedo=albedo, base=base, radius=radius, height=height)
            )
    return objects


def _place_pictures(rng: np.random.Generator, room: Room) -> list[Surface]:
    """Thin boxes hung on the side and far walls, in colours unrelated to their class."""
    low, high = room.bounds()
    pictures: list[Surface] = []
    for _ in range(rng.integers(0, 3)):
        half = np.array([rng.uniform(0.2, 0.5), rng.uniform(0.15, 0.4), 0.01])
        y = rng.uniform(1.2, min(2.0, high[1] - half[1] - 0.1))
        wall = rng.integers(0, 3)  # 0: far wall, 1: left wall, 2: right wall
        if wall == 0:
            along = rng.uniform(low[0] + half[0] + 0.1, high[0] - half[0] - 0.1)
            centre, yaw = np.array([along, y, low[2] + 0.02]), 0.0
        else:
            along = rng.uniform(low[2] + half[0] + 0.1, high[2] - half[0] - 0.1)
            x = low[0] + 0.02 if wall == 1 else high[0] - 0.02
            centre, yaw = np.array([x, y, along]), np.pi / 2
        colours = rng.uniform(0.05, 0.9, (2, 3))
        pictures.append(
            Box(
                semclass=PICTURE,
                albedo=colours[0],
                centre=centre,
                half=half,
                yaw=yaw,
                pattern=colours[1],
            )
        )
    return pictures


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a room, a camera pose, objects and a light."""
    size = rng.uniform([3.5, 2.5, 4.0], [6.0, 3.2, 7.0])
    wall_albedo = _jitter(rng, CLASS_ALBEDO[WALL])
    room = Room(
        semclass=FLOOR,
        albedo=_jitter(rng, CLASS_ALBEDO[FLOOR]),
        size=size,
        wall_albedo=wall_albedo,
        ceiling_albedo=_jitter(rng, CLASS_ALBEDO[CEILING], 0.05),
    )
    width, height, depth = size
    position = np.array(
        [
            rng.uniform(-width / 2 + 0.6, width / 2 - 0.6),
            rng.uniform(1.0, 1.7),
            rng.uniform(depth / 2 - 1.0, depth / 2 - 0.4),
        ]
    )
    rotation = _look_rotation(
        yaw=np.radians(rng.uniform(-30, 30)),
        pitch=np.radians(rng.uniform(-20, 5)),
        roll=np.radians(rng.uniform(-4, 4)),
    )
    surfaces = (room, *_place_objects(rng, room, position[2]), *_place_pictures(rng, room))
    light = np.array(
        [
            rng.uniform(-width / 2 + 0.3, width / 2 - 0.3),
            height - rng.uniform(0.1, 0.5),
            rng.uniform(-depth / 2 + 0.3, depth / 2 - 0.3),
        ]
    )
    return Scene(position, rotation, surfaces, light, ambient=float(rng.uniform(0.25, 0.45)))


def _nearest_hits(surfaces, origin, dirs):
    """Z-buffer over surfaces: t, world normal, surface index and part per ray."""
    best_t = np.full(dirs.shape[:-1], np.inf)
    normal = np.zeros_like(dirs)
    index = np.zeros(dirs.shape[:-1], dtype=int)
    part = np.zeros(dirs.shape[:-1], dtype=int)
    for i, surface in enumerate(surfaces):
        t, n, p = surface.intersect(origin, dirs)
        nearer = t < best_t
        best_t = np.where(nearer, t, best_t)
        normal = np.where(nearer[..., None], n, normal)
        index = np.where(nearer, i, index)
        part = np.where(nearer, p, part)
    return best_t, normal, index, part


def _in_shadow(surfaces, points, normals, light) -> np.ndarray:
    """Whether an object blocks the way to the light (the room cannot: the light is inside it)."""
    origins = points + 1e-4 * normals
    to_light = light - origins
    blocked = np.zeros(len(points), dtype=bool)
    for surface in surfaces:
        if not isinstance(surface, Room):
            blocked |= surface.intersect(origins, to_light)[0] < 1.0
    return blocked


def _hole_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A few round blobs of invalid pixels, like the holes of a depth sensor."""
    v, u = np.mgrid[0:height, 0:width] + 0.5
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(rng.integers(0, 4)):
        cv, cu = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(0.02, 0.07) * width
        mask |= (v - cv) ** 2 + (u - cu) ** 2 < radius**2
    return mask


def render(scene: Scene, camera: Camera, rng: np.random.Generator) -> Rendering:
    """Ray cast `scene`; `rng` draws sensor noise and invalid blobs."""
    h, w = camera.height, camera.width
    rays_cam = camera.rays().reshape(-1, 3)
    dirs = rays_cam @ scene.camera_rotation.T
    depth, normal_world, index, part = _nearest_hits(scene.surfaces, scene.camera_position, dirs)
    points = scene.camera_position + depth[:, None] * dirs

    albedo = np.zeros_like(points)
    semseg = np.zeros(len(points), dtype=np.int16)
    planar = np.zeros(len(points), dtype=bool)
    for i, surface in enumerate(scene.surfaces):
        on = index == i
        if not on.any():
            continue
        albedo[on] = surface.texture(points[on], part[on])
        semseg[on] = surface.semantic(part[on])
        planar[on] = np.isin(part[on], list(surface.planar_parts))

    to_light = scene.light - points
    lambert = np.clip((normal_world * to_light).sum(-1) / np.linalg.norm(to_light, axis=-1), 0, 1)
    lambert[_in_shadow(scene.surfaces, points, normal_world, scene.light)] = 0.0
    radiance = albedo * (scene.ambient + (1 - scene.ambient) * lambert)[:, None]
    srgb = np.clip(radiance, 0, 1) ** (1 / 2.2) + rng.normal(0, 0.01, radiance.shape)
    image = np.round(np.clip(srgb, 0, 1) * 255).astype(np.uint8)

    normal_cam = normal_world @ scene.camera_rotation  # world -> camera: R^T n, row-wise
    depth_map = depth.reshape(h, w).astype(np.float32)
    normal_map = normal_cam.reshape(h, w, 3).transpose(2, 0, 1).astype(np.float32)
    semseg_map = semseg.reshape(h, w)
    geometry_holes = _hole_mask(rng, h, w)
    label_holes = _hole_mask(rng, h, w)
    depth_map[geometry_holes] = 0.0
    normal_map[:, geometry_holes] = 0.0
    semseg_map[label_holes] = -1
    return Rendering(
        image=image.reshape(h, w, 3).transpose(2, 0, 1).copy(),
        semseg=semseg_map,
        depth=depth_map[None],
        normal=normal_map,
        surface=(index * 8 + part).reshape(h, w),
        planar=planar.reshape(h, w),
    )


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def render_sample(seed: int, split: str, index: int, height: int, width: int) -> Rendering:
    """Sample `index` of `split`: the same bytes for the same arguments, on every run."""
    rng = sample_rng(seed, split, index)
    return render(sample_scene(rng), Camera.for_image(height, width), rng)


# Rendered scenes are endless: `null` (all samples) means this many.
SCENES_PER_SPLIT = {"train": 800, "test": 200}


@SOURCES.register
class ScenesSource(DataSource):
    """Procedurally rendered indoor scenes with semantic, depth and normal targets."""

    name: ClassVar[str] = "scenes"
    tasks: ClassVar[tuple[str, ...]] = ("semseg", "depth", "normal")
    class_names: ClassVar[tuple[str, ...]] = CLASS_NAMES

    def num_samples(self, split: str) -> int:
        wanted = self.config.num_train if split == "train" else self.config.num_test
        return SCENES_PER_SPLIT[split] if wanted is None else wanted

    def read(self, split: str, start: int, stop: int) -> dict[str, np.ndarray]:
        c = self.config
        samples = [render_sample(c.seed, split, i, c.height, c.width) for i in range(start, stop)]
        return {name: np.stack([getattr(s, name) for s in samples]) for name in self.arrays}
