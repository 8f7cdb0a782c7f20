"""The ``clutter`` family: many objects heaped close together and seen from low down, so they
overlap in view and hide parts of one another (occlusion is the rule, not the exception).

10-20 objects of 8-25 cm are dropped into a pile 20-35 cm across (those that do not fit are
stacked on top), on a textured ground with two textured walls forming a corner behind it. The
camera looks at the pile from 15-35 degrees above the ground and 0.6-0.95 m away, so objects
in front cover those behind. Pushes are rare and gentle, so the heap stays a heap.
"""

from __future__ import annotations

import numpy as np

from .assets import (
    GROUND_PATTERNS,
    NAMED_MESH_PROBABILITY,
    NAMED_MESHES,
    NUM_BLOBS,
    TEXTURE_PATTERNS,
)
from .room import WALL_PATTERNS
from .spec import ObjectSpec, Poke, SceneSpec, StaticSpec, random_color, random_quaternion
from .tabletop import sample_camera_path

OBJECTS = (10, 20)  # default (min, max) objects per video
POKES_PER_SECOND = 0.3


def sample(
    rng: np.random.Generator, frames: int, fps: float, min_objects: int, max_objects: int
) -> SceneSpec:
    """Draw one heap: objects, backdrop walls, light and a low camera."""
    n = int(rng.integers(min_objects, max_objects + 1))
    pile = rng.uniform(0.1, 0.18)  # radius of the pile, metres
    objects, placed = [], []
    for _ in range(n):
        if rng.random() < NAMED_MESH_PROBABILITY:
            mesh_id = int(rng.integers(len(NAMED_MESHES)))
        else:
            mesh_id = len(NAMED_MESHES) + int(rng.integers(NUM_BLOBS))
        size = float(np.exp(rng.uniform(np.log(0.08), np.log(0.25))))
        radius = 0.5 * np.sqrt(3) * size
        position = _heap_position(rng, placed, pile, radius)
        placed.append((position, radius))
        pushed = rng.random() < 0.2
        speed = rng.uniform(0.2, 0.6) if pushed else 0.0
        heading = -position[:2] / (np.linalg.norm(position[:2]) + 1e-6) * speed
        objects.append(
            ObjectSpec(
                mesh_id=mesh_id,
                color=[float(c) for c in random_color(rng)],
                size=size,
                texture=str(rng.choice(TEXTURE_PATTERNS)) if rng.random() < 0.5 else None,
                mass=float(400.0 * size**3 * rng.uniform(0.5, 2.0)),
                friction=float(rng.uniform(0.5, 0.9)),
                restitution=float(rng.uniform(0.05, 0.3)),
                position=[float(c) for c in position],
                orientation=[float(c) for c in random_quaternion(rng)],
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
        distance_range=(0.6, 0.95),
        gaze_spread=0.05,
        gaze_height=0.08,
    )
    spec = SceneSpec(
        objects=objects,
        ground_pattern=str(rng.choice(GROUND_PATTERNS)),
        ground_colors=[[float(c) for c in col] for col in ground],
        light_direction=[
            float(np.cos(light_elevation) * np.cos(light_azimuth)),
            float(np.cos(light_elevation) * np.sin(light_azimuth)),
            float(np.sin(light_elevation)),
        ],
        light_color=[float(c) for c in rng.uniform(0.8, 1.0, 3)],
        ambient=float(rng.uniform(0.4, 0.7)),
        diffuse=float(rng.uniform(0.35, 0.6)),
        specular=float(rng.uniform(0.05, 0.25)),
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


def _heap_position(rng, placed, pile: float, radius: float, tries: int = 30) -> np.ndarray:
    """A start position in the pile; when it is full, on top of what is there (they fall in)."""
    for _ in range(tries):
        r, a = pile * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        pos = np.array([r * np.cos(a), r * np.sin(a), radius + rng.uniform(0.0, 0.05)])
        if all(np.linalg.norm(pos - c) > radius + rc for c, rc in placed):
            return pos
    near = [c[2] + rc for c, rc in placed if np.linalg.norm(c[:2] - pos[:2]) < radius + rc]
    return np.array([pos[0], pos[1], max(near, default=0.0) + radius + 0.01])


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
