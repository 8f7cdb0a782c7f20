"""The ``room`` family: egocentric rooms, closer to what a head-mounted camera sees at home.

A room of 4-7 m by 4-7 m with textured walls and floor (checker, tiles, planks, stripes or
noise in high-contrast colours; walls in their own colours), 2-5 pieces of furniture built from
boxes and cylinders (tables, shelves, a sofa block, cabinets, stools), and 4-8 small textured
movable objects standing on the floor around a focus point or on a table top. The camera walks
at head height around the focus, turning its head (yaw sweeps) and looking down at the floor
with a little pitch and roll; some objects are pushed while it moves.

Labels: only the small movable objects are objects (1..n). Walls, floor and furniture are
static background and map to 0, as the ground does (``conventions.md``): they are the scene's
structure rather than things one picks up, and their huge masks would swamp object metrics.
``meta.json`` lists them under ``background`` for anyone who wants them.
"""

from __future__ import annotations

import numpy as np

from .assets import (
    random_mesh_id,
    standing_extent,
)
from .spec import (
    CameraPath,
    ObjectSpec,
    Poke,
    SceneSpec,
    StaticSpec,
    light_direction,
    random_color,
    random_light,
    random_surface,
    smooth_walk,
)

OBJECTS = (4, 8)  # default (min, max) movable objects per video
FLOOR_PATTERNS = ("checker", "tiles", "planks", "stripes", "noise")
WALL_PATTERNS = ("stripes", "checker", "noise", "dots")
FURNITURE = ("table", "shelf", "sofa", "cabinet", "stool")
WALL_MARGIN = 0.5  # the eye keeps this far (m) from the walls: deeper than any shelf
WALL_THICKNESS = 0.1


def sample(
    rng: np.random.Generator, frames: int, fps: float, min_objects: int, max_objects: int
) -> SceneSpec:
    """Draw one room: walls, furniture, movable objects, light and a walking camera."""
    half = rng.uniform(2.0, 3.5, 2)  # half sizes of the floor along x and y
    height = float(rng.uniform(2.4, 3.0))
    focus = rng.uniform(-half + 1.3, half - 1.3)  # where the person is busy
    statics, footprints, surfaces = _walls(rng, half, height), [], []
    table_side = None  # azimuth of the table seen from the focus: the camera keeps off it
    if rng.random() < 0.7:  # a table near the focus, where some objects stand
        table_side = rng.uniform(0, 2 * np.pi)
        offset = rng.uniform(0.5, 1.0) * _unit(table_side)
        _furnish(
            rng,
            "table",
            focus + offset,
            rng.integers(4) * np.pi / 2,
            statics,
            footprints,
            surfaces,
            half,
        )
    for kind in rng.choice(FURNITURE, size=int(rng.integers(2, 5))):
        wall = int(rng.integers(4))
        yaw = (0.0, -np.pi / 2, np.pi, np.pi / 2)[wall]  # backs against y=+b, x=+a, y=-b, x=-a
        along, across = (half[0], half[1]) if wall % 2 == 0 else (half[1], half[0])
        s = rng.uniform(-along + 0.8, along - 0.8)
        depth = _SIZES[str(kind)][1]
        centre = _rot(yaw) @ np.array([s, across - depth / 2 - 0.02])
        _furnish(rng, str(kind), centre, yaw, statics, footprints, surfaces, half)

    n = int(rng.integers(min_objects, max_objects + 1))
    objects, placed = [], []
    scatter = rng.uniform(0.5, 1.1)
    for _ in range(n):
        mesh_id = random_mesh_id(rng)
        size = float(np.exp(rng.uniform(np.log(0.18), np.log(0.4))))
        half_height, radius = standing_extent(mesh_id, size)
        xy, floor = _stand(rng, focus, scatter, radius, half, footprints, surfaces, placed)
        placed.append((xy, radius))
        yaw = rng.uniform(0, 2 * np.pi)
        pushed = rng.random() < 0.35
        speed = rng.uniform(0.3, 1.0) if pushed else 0.0
        heading = _unit(rng.uniform(0, 2 * np.pi)) * speed
        objects.append(
            ObjectSpec(
                mesh_id=mesh_id,
                **random_surface(rng, size, 0.75, (0.4, 0.9), (0.1, 0.4)),
                position=[float(xy[0]), float(xy[1]), float(floor + half_height + 0.002)],
                orientation=[0.0, 0.0, float(np.sin(yaw / 2)), float(np.cos(yaw / 2))],
                linear_velocity=[float(heading[0]), float(heading[1]), 0.0],
                angular_velocity=[0.0, 0.0, float(rng.normal(0.0, 1.5)) if pushed else 0.0],
            )
        )
    light_azimuth, light_elevation = rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(45, 85))
    floor_colors = [
        random_color(rng, saturation=(0.05, 0.6), value=(0.7, 0.95)),
        random_color(rng, saturation=(0.2, 0.8), value=(0.15, 0.45)),
    ]
    spec = SceneSpec(
        objects=objects,
        ground_pattern=str(rng.choice(FLOOR_PATTERNS)),
        ground_colors=[[float(c) for c in col] for col in floor_colors[:: rng.choice([-1, 1])]],
        light_direction=light_direction(light_azimuth, light_elevation),
        **random_light(rng, 0.8, ambient=(0.4, 0.7), diffuse=(0.3, 0.6), specular=(0.05, 0.2)),
        camera=_walking_camera(rng, frames, fps, focus, half, table_side),
        texture_seed=int(rng.integers(2**31)),
        scene="room",
        statics=statics,
        center=[float(c) for c in focus],
        ground_tile=float(rng.uniform(0.9, 2.0)),  # coarse: fine stripes shimmer at 128 px
        extra={
            "room": {
                "half_size": [round(float(c), 4) for c in half],
                "height": round(height, 4),
                "focus": [round(float(c), 4) for c in focus],
            }
        },
    )
    spec.texture_tints = [[float(c) for c in random_color(rng)] for _ in objects]
    if frames > 1:
        spec.pokes = [
            Poke(
                frame=int(rng.integers(1, frames)),
                object=k,
                speed=float(rng.uniform(0.3, 1.0)),
                turn=float(rng.uniform(-np.pi, np.pi)),  # any direction, not just to the focus
                lift=0.0,
                spin=[0.0, 0.0, float(rng.normal(0.0, 1.5))],
            )
            for k in range(n)
            if rng.random() < 0.3
        ]
        spec.pokes.sort(key=lambda poke: poke.frame)
    return spec


# ---------------------------------------------------------------------------------------------
# Walls and furniture


def _walls(rng, half, height: float) -> list[StaticSpec]:
    """Four textured walls; one may be an accent wall in another colour."""
    base = random_color(rng, saturation=(0.2, 0.8), value=(0.45, 0.9))
    accent = random_color(rng, saturation=(0.4, 1.0), value=(0.4, 0.9))
    pattern = str(rng.choice(WALL_PATTERNS)) if rng.random() < 0.7 else None
    accent_wall = int(rng.integers(4)) if rng.random() < 0.5 else -1
    tile = float(rng.uniform(0.6, 1.2))
    walls = []
    t = WALL_THICKNESS / 2
    for k, (centre, extents) in enumerate(
        [
            ([0.0, half[1] + t], [half[0] + 2 * t, t, height / 2]),
            ([half[0] + t, 0.0], [t, half[1] + 2 * t, height / 2]),
            ([0.0, -half[1] - t], [half[0] + 2 * t, t, height / 2]),
            ([-half[0] - t, 0.0], [t, half[1] + 2 * t, height / 2]),
        ]
    ):
        color = accent if k == accent_wall else base
        walls.append(
            StaticSpec(
                name="wall",
                shape="box",
                half_extents=[float(c) for c in extents],
                position=[float(centre[0]), float(centre[1]), height / 2],
                yaw=0.0,
                color=[float(c) for c in color],
                pattern=pattern,
                pattern_colors=[_shade(color, 1.15), _shade(color, 0.6)] if pattern else [],
                tile=tile,
            )
        )
    return walls


# width (x) ranges and fixed depth (y) of each kind, metres; its back faces local +y
_SIZES = {
    "table": ((0.9, 1.6), 0.75),
    "shelf": ((0.8, 1.4), 0.35),
    "sofa": ((1.5, 2.2), 0.9),
    "cabinet": ((0.6, 1.2), 0.5),
    "stool": ((0.4, 0.8), 0.6),
}


def _furnish(rng, kind, centre, yaw, statics, footprints, surfaces, half) -> None:
    """Add one piece of furniture (its boxes) unless it would overlap another or a wall."""
    width = float(rng.uniform(*_SIZES[kind][0]))
    depth = float(_SIZES[kind][1]) if kind != "stool" else width
    rot = _rot(yaw)
    ext = np.abs(rot) @ np.array([width / 2, depth / 2])  # world half sizes of the footprint
    lo, hi = centre - ext, centre + ext
    if np.any(lo < -half - 1e-6) or np.any(hi > half + 1e-6):
        return
    if any(np.all(lo < b_hi + 0.1) and np.all(b_lo - 0.1 < hi) for b_lo, b_hi in footprints):
        return
    footprints.append((lo, hi))
    color = random_color(rng, saturation=(0.2, 0.9), value=(0.3, 0.9))
    pattern = (
        str(rng.choice(("noise", "stripes", "planks", "checker"))) if rng.random() < 0.6 else None
    )
    colors = [_shade(color, 1.2), _shade(color, 0.65)] if pattern else []
    w, d = width / 2, depth / 2
    parts: list[tuple[str, list[float], list[float]]] = []  # shape, local centre, half extents
    if kind == "table":
        h = float(rng.uniform(0.7, 0.78))
        parts.append(("box", [0.0, 0.0, h - 0.02], [w, d, 0.02]))
        for sx in (-1, 1):
            for sy in (-1, 1):
                leg = (h - 0.04) / 2
                parts.append(("box", [sx * (w - 0.06), sy * (d - 0.06), leg], [0.025, 0.025, leg]))
        surfaces.append((lo + 0.05, hi - 0.05, h))
    elif kind == "shelf":
        h = float(rng.uniform(1.4, 2.0))
        boards = int(rng.integers(3, 6))
        parts.append(("box", [0.0, d - 0.01, h / 2], [w, 0.01, h / 2]))  # back panel
        for sx in (-1, 1):
            parts.append(("box", [sx * (w - 0.02), 0.0, h / 2], [0.02, d, h / 2]))
        for z in np.linspace(0.05, h - 0.015, boards):
            parts.append(("box", [0.0, 0.0, float(z)], [w - 0.04, d - 0.02, 0.015]))
    elif kind == "sofa":
        seat = float(rng.uniform(0.4, 0.48))
        parts.append(("box", [0.0, -0.1, seat / 2], [w, d - 0.1, seat / 2]))
        parts.append(("box", [0.0, d - 0.1, 0.42], [w, 0.1, 0.42]))  # backrest
        for sx in (-1, 1):
            parts.append(
                ("box", [sx * (w - 0.1), -0.1, seat / 2 + 0.1], [0.1, d - 0.1, seat / 2 + 0.1])
            )
    elif kind == "cabinet":
        h = float(rng.uniform(0.6, 1.1))
        parts.append(("box", [0.0, 0.0, h / 2], [w, d, h / 2]))
        surfaces.append((lo + 0.05, hi - 0.05, h))
    else:  # stool or round side table
        h = float(rng.uniform(0.45, 0.75))
        parts.append(("cylinder", [0.0, 0.0, h / 2], [w, w, h / 2]))
        surfaces.append((centre - w * 0.6, centre + w * 0.6, h))
    for shape, local, extents in parts:
        xy = centre + rot @ np.array(local[:2])
        statics.append(
            StaticSpec(
                name=kind,
                shape=shape,
                half_extents=[float(c) for c in extents],
                position=[float(xy[0]), float(xy[1]), float(local[2])],
                yaw=float(yaw),
                color=[float(c) for c in color],
                pattern=pattern,
                pattern_colors=colors,
                tile=0.3,
            )
        )


# ---------------------------------------------------------------------------------------------
# Where objects stand, and the walking camera


def _stand(rng, focus, scatter, radius, half, footprints, surfaces, placed, tries=60):
    """(x, y) and floor height for an object: on a table top now and then, else on the floor
    near the focus, clear of furniture and of the objects already placed."""
    if surfaces and rng.random() < 0.35:
        lo, hi, top = surfaces[int(rng.integers(len(surfaces)))]
        if np.all(hi - lo > 2 * radius):
            for _ in range(tries):
                xy = rng.uniform(lo + radius, hi - radius)
                if all(np.linalg.norm(xy - c) > radius + r for c, r in placed):
                    return xy, float(top)
    for attempt in range(2 * tries):
        spread = scatter if attempt < tries else 2.5 * scatter  # crowded: look further out
        xy = focus + spread * np.sqrt(rng.random()) * _unit(rng.uniform(0, 2 * np.pi))
        inside = np.all(np.abs(xy) < half - radius - 0.05)
        clear = not any(
            np.all(lo - radius < xy) and np.all(xy < hi + radius) for lo, hi in footprints
        )
        if inside and clear and all(np.linalg.norm(xy - c) > radius + r for c, r in placed):
            return xy, 0.0
    return np.clip(xy, -half + radius, half - radius), 0.0  # give up: physics sorts it out


def _walking_camera(rng, frames: int, fps: float, focus, half, table_side) -> CameraPath:
    """A person walking slowly around the focus at head height, turning the head from side to
    side (yaw sweeps) and looking down at the floor, with a step's bob and a little roll. It
    starts on the side away from the table (``table_side``), which would hide the floor."""
    dt = 1.0 / fps
    t = np.arange(frames) * dt
    distance = rng.uniform(1.3, 2.1)
    speed = rng.uniform(0.15, 0.6) * rng.choice([-1.0, 1.0])  # m/s around the focus
    start = rng.uniform(-np.pi / 2, np.pi / 2) + (
        np.pi if table_side is None else table_side + np.pi
    )
    azimuth = start + speed / distance * t
    azimuth = azimuth + smooth_walk(rng, frames, dt, 0.0, 0.1, 1.5)
    radius = smooth_walk(rng, frames, dt, distance, 0.2, 1.5)
    xy = focus + radius[:, None] * np.stack([np.cos(azimuth), np.sin(azimuth)], axis=1)
    xy = np.clip(xy, -half + WALL_MARGIN, half - WALL_MARGIN)
    step_hz, bob = rng.uniform(1.6, 2.1), rng.uniform(0.01, 0.03)
    z = rng.uniform(1.45, 1.75) + bob * np.sin(2 * np.pi * step_hz * t + rng.uniform(0, 2 * np.pi))
    eye = np.concatenate([xy, z[:, None]], axis=1)
    to_focus = focus - xy
    sweep_amplitude, sweep_period = np.radians(rng.uniform(15, 40)), rng.uniform(2.0, 5.0)
    yaw = (
        np.arctan2(to_focus[:, 1], to_focus[:, 0])
        + sweep_amplitude * np.sin(2 * np.pi * t / sweep_period + rng.uniform(0, 2 * np.pi))
        + smooth_walk(rng, frames, dt, 0.0, np.radians(5), 0.5)
    )
    pitch = (
        -np.arctan2(z, np.linalg.norm(to_focus, axis=1))
        + np.radians(rng.uniform(-4, 6))
        + smooth_walk(rng, frames, dt, 0.0, np.radians(4), 0.8)
    )
    forward = np.stack(
        [np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)], axis=1
    )
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    up = np.cross(right, forward)
    roll = np.radians(smooth_walk(rng, frames, dt, 0.0, 2.0, 0.7))
    up = np.cos(roll)[:, None] * up + np.sin(roll)[:, None] * right
    return CameraPath(fov=float(rng.uniform(55, 70)), eye=eye, target=eye + forward, up=up)


def _unit(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle)])


def _rot(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s], [s, c]])


def _shade(color, factor: float) -> list[float]:
    return [float(min(1.0, c * factor)) for c in color]
