"""The ``tabletop`` family (the generator's first, and the default): 3-10 objects dropped and
pushed onto a textured ground, where they fall, roll, collide and occlude one another, filmed by
a camera that moves like a head-mounted one looking down at them (smooth random pan, tilt, roll
and bob). Its draws are frozen: the same seed gives the same bytes as generator version 1."""

from __future__ import annotations

import numpy as np

from .assets import (
    GROUND_PATTERNS,
    random_mesh_id,
)
from .spec import (
    CameraPath,
    ObjectSpec,
    Poke,
    SceneSpec,
    light_direction,
    random_color,
    random_light,
    random_quaternion,
    random_surface,
    rotate2d,
    smooth_walk,
)

DEFAULT_FPS = 12.0  # MOVi: 24 frames at 12 fps
SCENE_RADIUS = 0.45  # objects start within this distance (m) of the scene centre
POKES_PER_SECOND = 0.5  # after the first second, objects get nudged at this average rate
OBJECTS = (3, 10)  # default (min, max) objects per video


def sample(
    rng: np.random.Generator,
    frames: int,
    fps: float = DEFAULT_FPS,
    min_objects: int = 3,
    max_objects: int = 10,
) -> SceneSpec:
    """Draw one scene: objects with their initial state, ground, light and camera path."""
    n = int(rng.integers(min_objects, max_objects + 1))
    objects, placed = [], []  # placed: (centre, radius) of bounding spheres
    for _ in range(n):
        mesh_id = random_mesh_id(rng)
        size = float(np.exp(rng.uniform(np.log(0.12), np.log(0.35))))
        position = _free_position(rng, placed, radius=0.5 * np.sqrt(3) * size)
        placed.append((position, 0.5 * np.sqrt(3) * size))
        pushed = rng.random() < 0.6
        toward_centre = -position[:2] / (np.linalg.norm(position[:2]) + 1e-6)
        heading = rotate2d(toward_centre, rng.normal(0.0, 0.6))
        speed = rng.uniform(0.4, 1.6) if pushed else 0.0
        objects.append(
            ObjectSpec(
                mesh_id=mesh_id,
                **random_surface(rng, size, 0.5, (0.3, 0.9), (0.1, 0.5)),
                position=[float(c) for c in position],
                orientation=[float(c) for c in random_quaternion(rng)],
                linear_velocity=[float(heading[0] * speed), float(heading[1] * speed), 0.0],
                angular_velocity=[float(c) for c in rng.normal(0.0, 2.0, 3)],
            )
        )
    ground = [random_color(rng, saturation=(0.1, 0.5), value=(0.35, 0.8)) for _ in range(2)]
    light_azimuth, light_elevation = rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(40, 80))
    spec = SceneSpec(
        objects=objects,
        ground_pattern=str(rng.choice(GROUND_PATTERNS)),
        ground_colors=[[float(c) for c in col] for col in ground],
        light_direction=light_direction(light_azimuth, light_elevation),
        **random_light(rng, 0.85, ambient=(0.45, 0.65), diffuse=(0.4, 0.6), specular=(0.05, 0.2)),
        camera=sample_camera_path(rng, frames, fps),
        texture_seed=int(rng.integers(2**31)),
    )
    spec.texture_tints = [[float(c) for c in random_color(rng)] for _ in objects]
    spec.pokes = [
        Poke(
            frame=t,
            object=int(rng.integers(n)),
            speed=float(rng.uniform(0.5, 1.5)),
            turn=float(rng.normal(0.0, 0.5)),
            lift=float(rng.uniform(0.0, 1.0)),
            spin=[float(c) for c in rng.normal(0.0, 2.0, 3)],
        )
        for t in range(int(np.ceil(fps)), frames)
        if rng.random() < POKES_PER_SECOND / fps
    ]
    return spec


def _free_position(rng, placed, radius: float, tries: int = 100) -> np.ndarray:
    """A start position whose bounding sphere misses the others' (stacked higher if crowded)."""
    for _ in range(tries):
        r, a = SCENE_RADIUS * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        z = radius + rng.uniform(0.0, 0.35)
        pos = np.array([r * np.cos(a), r * np.sin(a), z])
        if all(np.linalg.norm(pos - c) > radius + rc for c, rc in placed):
            return pos
    top = max(c[2] + rc for c, rc in placed)
    return np.array([pos[0], pos[1], top + radius + 0.01])


def sample_camera_path(
    rng,
    frames: int,
    fps: float,
    elevation_range: tuple[float, float] = (35, 55),
    distance_range: tuple[float, float] = (0.95, 1.35),
    gaze_spread: float = 0.12,
    gaze_height: float = 0.05,
) -> CameraPath:
    """Eye and gaze of a person looking at the objects from standing or sitting height: the eye
    circles the origin ``distance_range`` metres away, ``elevation_range`` degrees up."""
    dt = 1.0 / fps
    azimuth = smooth_walk(rng, frames, dt, rng.uniform(0, 2 * np.pi), 0.5, 1.5)
    elevation = np.radians(smooth_walk(rng, frames, dt, rng.uniform(*elevation_range), 6.0, 1.0))
    distance = smooth_walk(rng, frames, dt, rng.uniform(*distance_range), 0.1, 1.5)
    gaze = np.concatenate(
        [
            smooth_walk(rng, frames, dt, [0.0, 0.0], gaze_spread, 0.8),  # pan/tilt: where it looks
            smooth_walk(rng, frames, dt, [gaze_height], 0.02, 0.8),
        ],
        axis=1,
    )
    bob = smooth_walk(rng, frames, dt, [0.0, 0.0, 0.0], 0.015, 0.3)  # head bob and sway
    roll = np.radians(smooth_walk(rng, frames, dt, 0.0, 3.0, 0.7))
    eye = (
        np.stack(
            [
                distance * np.cos(elevation) * np.cos(azimuth),
                distance * np.cos(elevation) * np.sin(azimuth),
                distance * np.sin(elevation),
            ],
            axis=1,
        )
        + bob
    )  # (T, 3)
    forward = gaze - eye
    forward /= np.linalg.norm(forward, axis=1, keepdims=True)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    up = np.cross(right, forward)
    up = np.cos(roll)[:, None] * up + np.sin(roll)[:, None] * right
    return CameraPath(fov=float(rng.uniform(50, 65)), eye=eye, target=gaze, up=up)
