"""MOVi-like synthetic videos with ground-truth masks, rendered on the CPU with pybullet.

Real egocentric data (SAYCam) and MOVi cannot be downloaded everywhere, yet quality claims must
be checkable, so egoslots can make its own data: 3-10 objects (pybullet_data's meshes: cube,
sphere, duck, teddy, mug, ... and its 1000 procedurally generated ``random_urdfs`` blobs) with
random colours, textures and sizes are dropped and pushed onto a textured ground, where they
fall, roll, collide and occlude one another, filmed by a camera that moves like a head-mounted
one (smooth random pan, tilt, roll and bob while looking roughly at the objects).

Everything random is drawn from one seeded ``numpy.random.Generator`` per video (derived from
the dataset seed and the video index), so the same arguments give the same bytes, and any
video can be (re)made on its own. pybullet runs in its own ``DIRECT`` client per video
(``physicsClientId`` on every call), which keeps generators in tests and worker processes
independent.

One job, the generator: scenes (:func:`sample_scene`), their simulation and pictures
(:func:`render_video`) and what a video shows (:func:`video_meta`). Writing videos as a dataset
on disk is the ``make-synthetic`` stage's (``stages/make_synthetic.py``): nothing here writes an
output (pybullet reads its textures from a temporary folder that is deleted after the video).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("egoslots")

# Bump whenever the same arguments would give different pictures: it is recorded in
# dataset.json, and a rerun into a folder made by another version refuses to mix them.
GENERATOR_VERSION = 1

DEFAULT_FPS = 12.0  # MOVi: 24 frames at 12 fps
PHYSICS_HZ = 240.0  # pybullet's default time step; substeps per frame = PHYSICS_HZ / fps

SCENE_RADIUS = 0.45  # objects start within this distance (m) of the scene centre
GROUND_HALF_SIZE = 6.0  # the textured ground square spans +-6 m
GROUND_TILE = 0.5  # metres covered by one copy of the ground texture
TEXTURE_SIZE = 64  # pixels per side of generated textures

# (name, visual .obj, collision .obj or None = same) under pybullet_data.getDataPath().
# The ``random_urdfs`` blobs follow, named blob_000..blob_999; a mesh's id is its index here.
NAMED_MESHES: tuple[tuple[str, str, str | None], ...] = (
    ("cube", "cube.obj", None),
    ("sphere", "textured_sphere_smooth.obj", None),
    ("cylinder", "toys/cylinder.obj", None),
    ("prism", "toys/prism.obj", None),
    ("torus", "torus/torus_textured.obj", None),
    ("duck", "duck.obj", "duck_vhacd.obj"),
    ("teddy", "teddy2_VHACD_CHs.obj", None),
    ("mug", "objects/mug.obj", "objects/mug_col.obj"),
    ("bunny", "bunny.obj", None),
    ("lego", "lego/lego.obj", None),
    ("soccerball", "soccerball.obj", None),
)
POKES_PER_SECOND = 0.5  # after the first second, objects get nudged at this average rate
NUM_BLOBS = 1000
NAMED_MESH_PROBABILITY = 0.5  # else one of the random blobs
TEXTURE_PATTERNS = ("checker", "stripes", "dots", "noise")
GROUND_PATTERNS = ("tiles", "planks", "noise", "checker")


# ---------------------------------------------------------------------------------------------
# Meshes


@dataclass(frozen=True)
class Mesh:
    """One entry of the mesh catalogue, with its bounding box read from the .obj file."""

    id: int
    name: str
    visual: str  # absolute path of the visual .obj
    collision: str  # absolute path of the collision .obj
    has_uv: bool  # texture coordinates present: only then can a texture show
    center: tuple[float, float, float]  # bounding-box centre in .obj units
    extent: float  # largest bounding-box side in .obj units


def _data_path() -> Path:
    import pybullet_data

    return Path(pybullet_data.getDataPath())


def num_meshes() -> int:
    return len(NAMED_MESHES) + NUM_BLOBS


@cache
def mesh(mesh_id: int) -> Mesh:
    """The catalogue entry ``mesh_id`` (named meshes first, then blob_000..blob_999)."""
    root = _data_path()
    if mesh_id < len(NAMED_MESHES):
        name, visual, collision = NAMED_MESHES[mesh_id]
    elif mesh_id < num_meshes():
        k = mesh_id - len(NAMED_MESHES)
        name, visual, collision = f"blob_{k:03d}", f"random_urdfs/{k:03d}/{k:03d}.obj", None
    else:
        raise ValueError(f"mesh id {mesh_id} is outside the catalogue (0..{num_meshes() - 1})")
    path = root / visual
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: pybullet_data lacks this mesh (is pybullet installed fully?)"
        )
    vertices, has_uv = _read_obj(path)
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    return Mesh(
        mesh_id,
        name,
        str(path),
        str(root / (collision or visual)),
        has_uv,
        tuple(float(c) for c in (lo + hi) / 2),
        float((hi - lo).max()),
    )


def _read_obj(path: Path) -> tuple[np.ndarray, bool]:
    """Vertex positions (V, 3) of a Wavefront .obj and whether it has texture coordinates."""
    vertices, has_uv = [], False
    with open(path) as f:
        for line in f:
            if line.startswith("v "):
                vertices.append(line.split()[1:4])
            elif line.startswith("vt "):
                has_uv = True
    return np.asarray(vertices, dtype=np.float64), has_uv


# ---------------------------------------------------------------------------------------------
# Scene description: every random draw happens here, before pybullet is touched


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


def video_rng(seed: int, video_index: int) -> np.random.Generator:
    """The generator for one video: independent of every other video and of the run order."""
    return np.random.default_rng(np.random.SeedSequence([seed, video_index]))


def sample_scene(
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
        if rng.random() < NAMED_MESH_PROBABILITY:
            mesh_id = int(rng.integers(len(NAMED_MESHES)))
        else:
            mesh_id = len(NAMED_MESHES) + int(rng.integers(NUM_BLOBS))
        size = float(np.exp(rng.uniform(np.log(0.12), np.log(0.35))))
        position = _free_position(rng, placed, radius=0.5 * np.sqrt(3) * size)
        placed.append((position, 0.5 * np.sqrt(3) * size))
        pushed = rng.random() < 0.6
        toward_centre = -position[:2] / (np.linalg.norm(position[:2]) + 1e-6)
        heading = _rotate2d(toward_centre, rng.normal(0.0, 0.6))
        speed = rng.uniform(0.4, 1.6) if pushed else 0.0
        objects.append(
            ObjectSpec(
                mesh_id=mesh_id,
                color=[float(c) for c in _random_color(rng)],
                size=size,
                texture=str(rng.choice(TEXTURE_PATTERNS)) if rng.random() < 0.5 else None,
                mass=float(400.0 * size**3 * rng.uniform(0.5, 2.0)),
                friction=float(rng.uniform(0.3, 0.9)),
                restitution=float(rng.uniform(0.1, 0.5)),
                position=[float(c) for c in position],
                orientation=[float(c) for c in _random_quaternion(rng)],
                linear_velocity=[float(heading[0] * speed), float(heading[1] * speed), 0.0],
                angular_velocity=[float(c) for c in rng.normal(0.0, 2.0, 3)],
            )
        )
    ground = [_random_color(rng, saturation=(0.1, 0.5), value=(0.35, 0.8)) for _ in range(2)]
    light_azimuth, light_elevation = rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(40, 80))
    spec = SceneSpec(
        objects=objects,
        ground_pattern=str(rng.choice(GROUND_PATTERNS)),
        ground_colors=[[float(c) for c in col] for col in ground],
        light_direction=[
            float(np.cos(light_elevation) * np.cos(light_azimuth)),
            float(np.cos(light_elevation) * np.sin(light_azimuth)),
            float(np.sin(light_elevation)),
        ],
        light_color=[float(c) for c in rng.uniform(0.85, 1.0, 3)],
        ambient=float(rng.uniform(0.45, 0.65)),
        diffuse=float(rng.uniform(0.4, 0.6)),
        specular=float(rng.uniform(0.05, 0.2)),
        camera=sample_camera_path(rng, frames, fps),
        texture_seed=int(rng.integers(2**31)),
    )
    spec.texture_tints = [[float(c) for c in _random_color(rng)] for _ in objects]
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


def _rotate2d(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _random_quaternion(rng) -> np.ndarray:
    q = rng.normal(size=4)
    return q / np.linalg.norm(q)


def _random_color(rng, saturation=(0.5, 1.0), value=(0.5, 1.0)) -> np.ndarray:
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


def sample_camera_path(rng, frames: int, fps: float) -> CameraPath:
    """Eye and gaze of a person looking at the objects from standing or sitting height."""
    dt = 1.0 / fps
    azimuth = smooth_walk(rng, frames, dt, rng.uniform(0, 2 * np.pi), 0.5, 1.5)
    elevation = np.radians(smooth_walk(rng, frames, dt, rng.uniform(35, 55), 6.0, 1.0))
    distance = smooth_walk(rng, frames, dt, rng.uniform(0.95, 1.35), 0.1, 1.5)
    gaze = np.concatenate(
        [
            smooth_walk(rng, frames, dt, [0.0, 0.0], 0.12, 0.8),  # pan/tilt: where it looks
            smooth_walk(rng, frames, dt, [0.05], 0.02, 0.8),
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


# ---------------------------------------------------------------------------------------------
# Textures


def texture_image(
    pattern: str, colors, rng: np.random.Generator, size: int = TEXTURE_SIZE
) -> np.ndarray:
    """A small (size, size, 3) uint8 texture: a pattern blending two colours."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    if pattern in ("checker", "tiles"):
        k = int(rng.integers(2, 6))
        weight = ((np.floor(xx * k) + np.floor(yy * k)) % 2).astype(np.float64)
        if pattern == "tiles":  # grout lines between tiles
            edge = np.minimum((xx * k) % 1, (yy * k) % 1) < 0.06
            weight = np.where(edge, 0.5, 0.15 + 0.2 * weight)
    elif pattern == "stripes":
        k, angle = int(rng.integers(2, 7)), rng.uniform(0, np.pi)
        weight = ((np.cos(angle) * xx + np.sin(angle) * yy) * k * 2 % 2 < 1).astype(np.float64)
    elif pattern == "planks":
        k = int(rng.integers(3, 8))
        row = np.floor(yy * k)
        grain = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * rng.uniform(1, 3) + row * 0.37) + 6 * yy)
        weight = 0.6 * grain + 0.4 * ((row * 0.618) % 1) + 0.6 * ((yy * k) % 1 < 0.05)
    elif pattern == "dots":
        k = int(rng.integers(2, 6))
        d = np.hypot((xx * k) % 1 - 0.5, (yy * k) % 1 - 0.5)
        weight = (d < rng.uniform(0.2, 0.4)).astype(np.float64)
    elif pattern == "noise":
        coarse = rng.random((8, 8))
        weight = (
            np.asarray(
                Image.fromarray((coarse * 255).astype(np.uint8)).resize(
                    (size, size), Image.BICUBIC
                ),
                dtype=np.float64,
            )
            / 255.0
        )
    else:
        raise ValueError(f"unknown texture pattern {pattern!r}")
    weight = np.clip(weight, 0.0, 1.0)[..., None]
    a, b = np.asarray(colors[0]), np.asarray(colors[1])
    return np.clip((a * (1 - weight) + b * weight) * 255 + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Simulation and rendering


class Simulation:
    """One scene in its own pybullet DIRECT client: step the physics, render frames and masks.

    Objects get labels 1..n in the order of ``spec.objects``; the ground and empty pixels are 0.
    Use as a context manager (or call :meth:`close`) to free the client.
    """

    def __init__(
        self, spec: SceneSpec, size: int, fps: float = DEFAULT_FPS, texture_dir: str | None = None
    ):
        import pybullet as p

        self.p, self.spec, self.size, self.fps = p, spec, size, fps
        self.substeps = max(1, int(round(PHYSICS_HZ / fps)))
        self.client = p.connect(p.DIRECT)
        if self.client < 0:
            raise RuntimeError("pybullet could not start a DIRECT physics client")
        self._own_dir = texture_dir is None
        self.texture_dir = texture_dir or tempfile.mkdtemp(prefix="egoslots-textures-")
        try:
            p.setGravity(0, 0, -9.81, physicsClientId=self.client)
            p.setTimeStep(1.0 / PHYSICS_HZ, physicsClientId=self.client)
            rng = np.random.default_rng(spec.texture_seed)
            self.ground = self._make_ground(rng)
            self.bodies = [self._make_object(i, obj, rng) for i, obj in enumerate(spec.objects)]
            # Segmentation values are body ids; this table turns them into labels 1..n.
            self._labels = np.zeros(max(self.bodies + [self.ground]) + 1, dtype=np.uint8)
            self._labels[self.bodies] = np.arange(1, len(self.bodies) + 1, dtype=np.uint8)
            self.projection = p.computeProjectionMatrixFOV(spec.camera.fov, 1.0, 0.05, 30.0)
        except BaseException:
            self.close()
            raise

    def _texture(self, name: str, image: np.ndarray) -> int:
        path = os.path.join(self.texture_dir, f"{name}.png")
        Image.fromarray(image).save(path)
        return self.p.loadTexture(path, physicsClientId=self.client)

    def _make_ground(self, rng) -> int:
        p, c, h = self.p, self.client, GROUND_HALF_SIZE
        reps = 2 * h / GROUND_TILE
        vertices = [[-h, -h, 0], [h, -h, 0], [h, h, 0], [-h, h, 0]]
        uvs = [[0, 0], [reps, 0], [reps, reps], [0, reps]]
        visual = p.createVisualShape(
            p.GEOM_MESH,
            vertices=vertices,
            indices=[0, 1, 2, 0, 2, 3],
            uvs=uvs,
            normals=[[0, 0, 1]] * 4,
            physicsClientId=c,
        )
        collision = p.createCollisionShape(p.GEOM_PLANE, physicsClientId=c)
        body = p.createMultiBody(0, collision, visual, physicsClientId=c)
        image = texture_image(self.spec.ground_pattern, self.spec.ground_colors, rng, size=128)
        p.changeVisualShape(
            body,
            -1,
            textureUniqueId=self._texture("ground", image),
            rgbaColor=[1, 1, 1, 1],
            physicsClientId=c,
        )
        p.changeDynamics(body, -1, lateralFriction=0.8, restitution=0.3, physicsClientId=c)
        return body

    def _make_object(self, index: int, obj: ObjectSpec, rng) -> int:
        p, c, m = self.p, self.client, mesh(obj.mesh_id)
        scale = obj.size / m.extent
        offset = [-scale * x for x in m.center]  # put the bounding-box centre at the body origin
        collision = p.createCollisionShape(
            p.GEOM_MESH,
            fileName=m.collision,
            meshScale=[scale] * 3,
            collisionFramePosition=offset,
            physicsClientId=c,
        )
        visual = p.createVisualShape(
            p.GEOM_MESH,
            fileName=m.visual,
            meshScale=[scale] * 3,
            visualFramePosition=offset,
            rgbaColor=obj.color + [1.0],
            specularColor=[0.3, 0.3, 0.3],
            physicsClientId=c,
        )
        body = p.createMultiBody(
            obj.mass,
            collision,
            visual,
            basePosition=obj.position,
            baseOrientation=obj.orientation,
            physicsClientId=c,
        )
        if obj.texture is not None and m.has_uv:
            # The texture is multiplied by rgbaColor: keep it light so the object keeps its colour.
            colors = [[1.0, 1.0, 1.0], [0.35 + 0.65 * x for x in self.spec.texture_tints[index]]]
            texture = self._texture(f"object{index}", texture_image(obj.texture, colors, rng))
            p.changeVisualShape(body, -1, textureUniqueId=texture, physicsClientId=c)
        p.changeDynamics(
            body,
            -1,
            lateralFriction=obj.friction,
            restitution=obj.restitution,
            rollingFriction=0.001,
            spinningFriction=0.001,
            physicsClientId=c,
        )
        p.resetBaseVelocity(body, obj.linear_velocity, obj.angular_velocity, physicsClientId=c)
        return body

    def step(self, frame: int) -> None:
        """Advance the physics from frame ``frame - 1`` to ``frame`` (applying its pokes first)."""
        for poke in self.spec.pokes:
            if poke.frame == frame:
                self._poke(poke)
        for _ in range(self.substeps):
            self.p.stepSimulation(physicsClientId=self.client)

    def _poke(self, poke: Poke) -> None:
        p, c, body = self.p, self.client, self.bodies[poke.object]
        position = np.asarray(p.getBasePositionAndOrientation(body, physicsClientId=c)[0])
        toward_centre = -position[:2] / (np.linalg.norm(position[:2]) + 1e-6)
        heading = _rotate2d(toward_centre, poke.turn) * poke.speed
        p.resetBaseVelocity(
            body, [float(heading[0]), float(heading[1]), poke.lift], poke.spin, physicsClientId=c
        )

    def render(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame ``t`` of the camera path: RGB (S, S, 3) uint8 and labels (S, S) uint8."""
        p, cam, spec = self.p, self.spec.camera, self.spec
        view = p.computeViewMatrix(cam.eye[t].tolist(), cam.target[t].tolist(), cam.up[t].tolist())
        _, _, rgba, _, seg = p.getCameraImage(
            self.size,
            self.size,
            view,
            self.projection,
            renderer=p.ER_TINY_RENDERER,
            flags=p.ER_SEGMENTATION_MASK_OBJECT_AND_LINKINDEX,
            shadow=1,
            lightDirection=spec.light_direction,
            lightColor=spec.light_color,
            lightDistance=10.0,
            lightAmbientCoeff=spec.ambient,
            lightDiffuseCoeff=spec.diffuse,
            lightSpecularCoeff=spec.specular,
            physicsClientId=self.client,
        )
        rgb = np.ascontiguousarray(
            np.reshape(rgba, (self.size, self.size, 4))[:, :, :3], dtype=np.uint8
        )
        seg = np.reshape(seg, (self.size, self.size)).astype(np.int64)
        # With this flag a pixel holds body id + ((link index + 1) << 24); -1 where nothing is.
        body = np.where(seg >= 0, seg & ((1 << 24) - 1), 0)
        labels = self._labels[np.minimum(body, len(self._labels) - 1)]
        return rgb, labels

    def poses(self) -> tuple[np.ndarray, np.ndarray]:
        """Object positions (n, 3) and quaternions (n, 4), in label order."""
        states = [
            self.p.getBasePositionAndOrientation(b, physicsClientId=self.client)
            for b in self.bodies
        ]
        return (
            np.array([s[0] for s in states], dtype=np.float64).reshape(-1, 3),
            np.array([s[1] for s in states], dtype=np.float64).reshape(-1, 4),
        )

    def hide(self, label: int) -> None:
        """Move object ``label`` far away (for checking masks against renders)."""
        self.p.resetBasePositionAndOrientation(
            self.bodies[label - 1],
            [100.0, 100.0, -100.0],
            [0, 0, 0, 1],
            physicsClientId=self.client,
        )

    def close(self) -> None:
        if getattr(self, "client", None) is not None:
            try:
                self.p.disconnect(physicsClientId=self.client)
            except Exception:  # already gone
                pass
            self.client = None
        if self._own_dir:
            shutil.rmtree(self.texture_dir, ignore_errors=True)

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Timings:
    """Where the time of one video went (seconds)."""

    setup: float = 0.0
    physics: float = 0.0
    render: float = 0.0
    write: float = 0.0
    frames: int = 0

    def add(self, other: Timings) -> None:
        for k in ("setup", "physics", "render", "write", "frames"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @property
    def total(self) -> float:
        return self.setup + self.physics + self.render + self.write


def render_video(
    spec: SceneSpec,
    frames: int,
    size: int,
    fps: float = DEFAULT_FPS,
    timings: Timings | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Simulate and render a scene: yields (rgb, labels, positions (n, 3), quaternions (n, 4))
    per frame. Frame 0 shows the initial state; each later frame is 1/fps seconds on."""
    timings = timings if timings is not None else Timings()
    start = time.perf_counter()
    with Simulation(spec, size, fps) as sim:
        timings.setup += time.perf_counter() - start
        for t in range(frames):
            start = time.perf_counter()
            if t > 0:
                sim.step(t)
            positions, quaternions = sim.poses()
            middle = time.perf_counter()
            rgb, labels = sim.render(t)
            timings.physics += middle - start
            timings.render += time.perf_counter() - middle
            timings.frames += 1
            yield rgb, labels, positions, quaternions


# ---------------------------------------------------------------------------------------------
# What a video shows, as recorded in its meta.json


def _round(a: np.ndarray, digits: int = 5) -> list:
    return np.round(np.asarray(a, dtype=np.float64), digits).tolist()


def video_meta(
    spec: SceneSpec,
    index: int,
    seed: int,
    frames: int,
    size: int,
    fps: float,
    positions: np.ndarray,
    quaternions: np.ndarray,
) -> dict:
    """meta.json of one video. positions (n, T, 3), quaternions (n, T, 4) in label order."""
    objects = []
    for k, obj in enumerate(spec.objects):
        m = mesh(obj.mesh_id)
        objects.append(
            {
                "id": k + 1,  # the object's label in masks/*.png
                "mesh": {"name": m.name, "id": m.id},
                "color": _round(obj.color, 4),
                "size": round(obj.size, 5),  # largest bounding-box side, metres
                "scale": round(obj.size / m.extent, 6),  # pybullet mesh scale that gives that size
                "texture": obj.texture if m.has_uv else None,
                "mass": round(obj.mass, 5),
                "positions": _round(positions[k]),  # (T, 3) centre of the bounding box, metres
                "quaternions": _round(quaternions[k]),  # (T, 4) x, y, z, w
            }
        )
    cam = spec.camera
    return {
        "fps": fps,
        "num_frames": frames,
        "resolution": [size, size],
        "generator": {
            "name": "egoslots.synthetic",
            "version": GENERATOR_VERSION,
            "seed": seed,
            "index": index,
        },
        "camera": {
            "fov": round(cam.fov, 4),
            "eye": _round(cam.eye),
            "target": _round(cam.target),
            "up": _round(cam.up),
        },
        "light": {
            "direction": _round(spec.light_direction),
            "color": _round(spec.light_color),
            "ambient": round(spec.ambient, 4),
            "diffuse": round(spec.diffuse, 4),
            "specular": round(spec.specular, 4),
        },
        "ground": {
            "pattern": spec.ground_pattern,
            "colors": [_round(c, 4) for c in spec.ground_colors],
        },
        "objects": objects,
        # later pushes: before frame `frame`, object `object` got `speed` m/s sideways, `lift` up
        "pokes": [
            {
                "frame": k.frame,
                "object": k.object + 1,
                "speed": round(k.speed, 4),
                "lift": round(k.lift, 4),
            }
            for k in spec.pokes
        ],
    }
