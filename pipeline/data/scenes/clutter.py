"""The ``clutter`` family: many objects heaped close together and seen from low down, so they
overlap in view and hide parts of one another (occlusion is the rule, not the exception).

10-20 objects of 7-22 cm are stood in a pile 30-50 cm across (those that do not fit stand
on top of others and topple), on a textured ground with two textured walls forming a corner behind it. The
camera looks at the pile from 15-35 degrees above the ground and 0.75-1.1 m away, so objects
in front cover those behind. Pushes are rare and gentle, so the heap stays a heap.
"""

from __future__ import annotations

import numpy as np

from .assets import (
    GROUND_PATTERNS,
    random_mesh_id,
    standing_extent,
)
from .room import WALL_PATTERNS
from .spec import (
    ObjectSpec,
    Poke,
    SceneSpec,
    StaticSpec,
    light_direction,
    random_color,
    random_light,
    random_surface,
)
from .tabletop import sample_camera_path

OBJECTS = (10, 20)  # default (min, max) objects per video
POKES_PER_SECOND = 0.3


def sample(
    rng: np.random.Generator, frames: int, fps: float, min_objects: int, max_objects: int
) -> SceneSpec:
    """Draw one heap: objects, backdrop walls, light and a low camera."""
    n = int(rng.integers(min_objects, max_objects + 1))
    pile = rng.uniform(0.15, 0.25)  # radius of the pile, metres
    objects, placed = [], []
    for _ in range(n):
        mesh_id = random_mesh_id(rng)
        size = float(np.exp(rng.uniform(np.log(0.07), np.log(0.22))))
        half_height, radius = standing_extent(mesh_id, size)
        x, y, bottom = _heap_position(rng, placed, pile, radius)
        position = np.array([x, y, bottom + half_height + 0.003])
        placed.append((position[:2], radius, bottom + 2 * half_height))
        yaw = rng.uniform(0, 2 * np.pi)
        pushed = rng.random() < 0.2
        speed = rng.uniform(0.2, 0.6) if pushed else 0.0
        heading = -position[:2] / (np.linalg.norm(position[:2]) + 1e-6) * speed
        objects.append(
            ObjectSpec(
                mesh_id=mesh_id,
                **random_surface(rng, size, 0.5, (0.5, 0.9), (0.05, 0.3)),
                position=[float(c) for c in position],
                orientation=[0.0, 0.0, float(np.sin(yaw / 2)), float(np.cos(yaw / 2))],
                linear_velocity=[float(heading[0]), float(heading[1]), 0.0],
                angular_velocity=[float(c) for c in rng.normal(0.0, 1.0, 3)],
            )
        )
    ground = [random_color(rng, saturation=(0.1, 0.6), value=(0.3, 0.85)) for _ in range(2)]
    light_azimuth, light_elevation = rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(35, 80))
    camera = sample_camera_path(
        rng,
        frames,
        fps,
        elevation_range=(15, 35),
        distance_range=(0.75, 1.1),
        gaze_spread=0.05,
        gaze_height=0.1,
    )
    spec = SceneSpec(
        objects=objects,
        ground_pattern=str(rng.choice(GROUND_PATTERNS)),
        ground_colors=[[float(c) for c in col] for col in ground],
        light_direction=light_direction(light_azimuth, light_elevation),
        **random_light(rng, 0.8, ambient=(0.4, 0.7), diffuse=(0.35, 0.6), specular=(0.05, 0.25)),
        camera=camera,
        texture_seed=int(rng.integers(2**31)),
        scene="clutter",
        statics=_backdrop(rng, camera.eye[0]),
        ground_tile=float(rng.uniform(0.25, 0.6)),
    )
    spec.texture_tints = [[float(c) for c in random_color(rng)] for _ in objects]
    spec.pokes = [
        Poke(
            frame=t,
            object=int(rng.integers(n)),
            speed=float(rng.uniform(0.2, 0.6)),
            turn=float(rng.normal(0.0, 0.5)),
            lift=float(rng.uniform(0.0, 0.3)),
            spin=[float(c) for c in rng.normal(0.0, 1.0, 3)],
        )
        for t in range(1, frames)
        if rng.random() < POKES_PER_SECOND / fps
    ]
    return spec


def _heap_position(rng, placed, pile: float, radius: float, tries: int = 24) -> np.ndarray:
    """(x, y, bottom) of an object standing in the pile, as low as it goes: of ``tries``
    random spots in the pile, the one where it rests lowest, on the ground or on the tops of
    the objects whose footprints (circles of ``radius``) it overlaps. The heap starts compact
    and upright; what stands on others topples as the video starts."""
    best = None
    for _ in range(tries):
        r, a = pile * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        xy = np.array([r * np.cos(a), r * np.sin(a)])
        bottom = max(
            (top for c, rc, top in placed if np.linalg.norm(xy - c) < radius + rc), default=0.0
        )
        if best is None or bottom < best[2]:
            best = np.array([xy[0], xy[1], bottom])
    return best


def _backdrop(rng, eye) -> list[StaticSpec]:
    """Two walls meeting in a corner behind the pile (as seen from the camera's first frame),
    so a low view shows a textured wall rather than an empty horizon."""
    away = -np.asarray(eye[:2]) / (np.linalg.norm(eye[:2]) + 1e-9)  # from the eye past the pile
    angle = np.arctan2(away[1], away[0]) + rng.uniform(-0.6, 0.6)
    distance, height = rng.uniform(1.2, 2.0), rng.uniform(1.2, 2.0)  # beyond the eye's reach
    color = random_color(rng, saturation=(0.2, 0.8), value=(0.45, 0.9))
    pattern = str(rng.choice(WALL_PATTERNS)) if rng.random() < 0.7 else None
    walls = []
    for turn, side in ((np.pi / 4, 1.0), (-np.pi / 4, -1.0)):  # the corner's walls, 6 m long
        normal = angle + turn
        along = side * (2.95 - distance)  # from the corner outwards
        centre = distance * _unit(normal) + along * _unit(normal + np.pi / 2)
        walls.append(
            StaticSpec(
                name="wall",
                shape="box",
                half_extents=[0.05, 3.0, height / 2],
                position=[float(centre[0]), float(centre[1]), height / 2],
                yaw=float(normal),
                color=[float(c) for c in color],
                pattern=pattern,
                pattern_colors=[[min(1.0, c * 1.15) for c in color], [c * 0.6 for c in color]]
                if pattern
                else [],
                tile=float(rng.uniform(0.3, 0.8)),
            )
        )
    return walls


def _unit(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle)])
