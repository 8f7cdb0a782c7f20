"""What a scene is, as data: every random draw of a video happens while filling these classes
(in a scene family's ``sample``), before pybullet is touched, so a scene can be recorded,
compared and re-rendered. Also the small random helpers the families share."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .assets import TEXTURE_PATTERNS


@dataclass
class ObjectSpec:
    mesh_id: int
    color: list[float]  # RGB in [0, 1]
    size: float  # largest bounding-box side in metres
    texture: str | None  # pattern name, or None for a plain colour
    mass: float  # kg
    friction: float
    restitution: float
    position: list[float]  # initial centre (m)
    orientation: list[float]  # initial quaternion (x, y, z, w)
    linear_velocity: list[float]  # m/s
    angular_velocity: list[float]  # rad/s


@dataclass
class Poke:
    """A later push, as if a hand nudged the object, so longer videos keep moving."""

    frame: int  # applied just before the physics steps into this frame
    object: int  # index into SceneSpec.objects
    speed: float  # horizontal m/s, roughly towards the scene centre
    turn: float  # radians away from the direction to the centre
    lift: float  # upward m/s
    spin: list[float]  # angular velocity, rad/s


@dataclass
class CameraPath:
    fov: float  # vertical field of view, degrees
    eye: np.ndarray  # (T, 3)
    target: np.ndarray  # (T, 3)
    up: np.ndarray  # (T, 3), includes the head's roll


@dataclass
class StaticSpec:
    """A fixed piece of background (wall, table top, shelf board, sofa block): a box or an
    upright cylinder, labelled 0 in the masks. Its texture repeats every ``tile`` metres."""

    name: str  # what it is part of: "wall", "table", "shelf", ...
    shape: str  # "box" | "cylinder"
    half_extents: list[float]  # box: half sides (x, y, z); cylinder: (radius, radius, half height)
    position: list[float]  # centre (m)
    yaw: float  # rotation about z, radians
    color: list[float]  # RGB in [0, 1]; multiplies the texture
    pattern: str | None = None  # texture pattern, or None for a plain colour
    pattern_colors: list[list[float]] = field(default_factory=list)  # the two it blends
    tile: float = 0.5  # metres covered by one copy of the texture


@dataclass
class SceneSpec:
    objects: list[ObjectSpec]
    ground_pattern: str
    ground_colors: list[list[float]]  # two RGB colours the ground pattern blends
    light_direction: list[float]
    light_color: list[float]
    ambient: float
    diffuse: float
    specular: float
    camera: CameraPath
    texture_seed: int  # seeds the texture images, drawn with the rest of the scene
    texture_tints: list[list[float]] = field(default_factory=list)  # per object: RGB of its pattern
    pokes: list[Poke] = field(default_factory=list)
    # Other families (tabletop leaves these at their defaults):
    scene: str = "tabletop"
    statics: list[StaticSpec] = field(default_factory=list)  # background geometry, label 0
    center: list[float] | None = None  # (x, y) pokes push towards; None = the origin
    ground_tile: float = 0.5  # metres covered by one copy of the ground texture
    extra: dict = field(default_factory=dict)  # family-specific facts for meta.json


def video_rng(seed: int, video_index: int) -> np.random.Generator:
    """The generator for one video: independent of every other video and of the run order."""
    return np.random.default_rng(np.random.SeedSequence([seed, video_index]))


def rotate2d(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def random_quaternion(rng) -> np.ndarray:
    q = rng.normal(size=4)
    return q / np.linalg.norm(q)


def random_surface(rng, size: float, texture_probability: float, friction, restitution) -> dict:
    """An object's colour, texture (one of ``TEXTURE_PATTERNS`` with ``texture_probability``),
    mass (density varied around 400 kg/m^3 of its ``size``), friction and restitution drawn
    from the given ranges: the ObjectSpec keyword arguments, drawn in this order."""
    return dict(
        color=[float(c) for c in random_color(rng)],
        size=size,
        texture=str(rng.choice(TEXTURE_PATTERNS)) if rng.random() < texture_probability else None,
        mass=float(400.0 * size**3 * rng.uniform(0.5, 2.0)),
        friction=float(rng.uniform(*friction)),
        restitution=float(rng.uniform(*restitution)),
    )


def light_direction(azimuth: float, elevation: float) -> list[float]:
    """The unit vector towards a light at ``azimuth`` / ``elevation`` (radians)."""
    return [
        float(np.cos(elevation) * np.cos(azimuth)),
        float(np.cos(elevation) * np.sin(azimuth)),
        float(np.sin(elevation)),
    ]


def random_light(rng, color_low: float, ambient, diffuse, specular) -> dict:
    """A light's colour (each channel in [color_low, 1)) and its ambient / diffuse / specular
    strengths drawn from the given ranges: the SceneSpec keyword arguments, drawn in this order."""
    return dict(
        light_color=[float(c) for c in rng.uniform(color_low, 1.0, 3)],
        ambient=float(rng.uniform(*ambient)),
        diffuse=float(rng.uniform(*diffuse)),
        specular=float(rng.uniform(*specular)),
    )


def random_color(rng, saturation=(0.5, 1.0), value=(0.5, 1.0)) -> np.ndarray:
    """A random RGB colour drawn in HSV, so that colours are vivid rather than muddy."""
    h, s, v = rng.random(), rng.uniform(*saturation), rng.uniform(*value)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p_, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p_), (q, v, p_), (p_, v, t), (p_, q, v), (t, p_, v), (v, p_, q)][i])


# ---------------------------------------------------------------------------------------------
# The head-mounted camera


def smooth_walk(rng, n: int, dt: float, mean, spread: float, timescale: float) -> np.ndarray:
    """A smooth random walk (n,) or (n, d) around ``mean``: a critically damped spring driven
    by white noise, whose stationary spread is ``spread`` and whose motions last about
    ``timescale`` seconds. Unlike a plain random walk it has velocity, so it looks like a head
    turning rather than a camera shaking."""
    mean = np.asarray(mean, dtype=np.float64)
    omega = 1.0 / timescale
    sigma = spread * 2.0 * omega**1.5  # stationary std of x'' + 2w x' + w^2 x = sigma * noise
    x = mean + rng.normal(0.0, spread, mean.shape)
    v = rng.normal(0.0, spread * omega, mean.shape)
    out = np.empty((n,) + mean.shape)
    for t in range(n):
        out[t] = x
        accel = -(omega**2) * (x - mean) - 2.0 * omega * v
        v = v + accel * dt + sigma * np.sqrt(dt) * rng.normal(size=mean.shape)
        x = x + v * dt
    return out
