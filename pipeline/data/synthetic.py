"""MOVi-like synthetic videos with ground-truth masks, rendered on the CPU with pybullet.

Real egocentric data (SAYCam) and MOVi cannot be downloaded everywhere, yet quality claims must
be checkable, so egoslots can make its own data, in scene families (:mod:`.scenes`):
``tabletop`` (the default: 3-10 objects dropped and pushed onto a textured ground, filmed by a
head-mounted camera looking down at them), ``room`` (egocentric rooms with walls, furniture and
small objects, filmed by a camera walking at head height) and ``clutter`` (many objects heaped
together, hiding one another). Objects are pybullet_data's meshes (cube, sphere, duck, teddy,
mug, ...) and its 1000 procedurally generated ``random_urdfs`` blobs, with random colours,
textures and sizes.

Everything random is drawn from one seeded ``numpy.random.Generator`` per video (derived from
the dataset seed and the video index), so the same arguments give the same bytes, and any
video can be (re)made on its own. pybullet runs in its own ``DIRECT`` client per video
(``physicsClientId`` on every call), which keeps generators in tests and worker processes
independent.

This module simulates and renders a drawn scene (:class:`Simulation`, :func:`render_video`)
and says what a video shows (:func:`video_meta`); drawing scenes is :mod:`.scenes`'s
(:func:`sample_scene`). Writing videos as a dataset on disk is the ``make-synthetic`` stage's
(``stages/make_synthetic.py``): nothing here writes an output (pybullet reads its textures from
a temporary folder that is deleted after the video).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scenes import DEFAULT_SCENE, SCENES, object_range, sample_scene
from .scenes.assets import NAMED_MESHES, Mesh, mesh, num_meshes, texture_image
from .scenes.meta import GENERATOR_VERSION, video_meta
from .scenes.shapes import box_mesh, cylinder_mesh, yaw_quaternion
from .scenes.spec import (
    CameraPath,
    ObjectSpec,
    Poke,
    SceneSpec,
    StaticSpec,
    rotate2d,
    smooth_walk,
    video_rng,
)
from .scenes.tabletop import DEFAULT_FPS, sample_camera_path

__all__ = [
    "DEFAULT_FPS",
    "DEFAULT_SCENE",
    "GENERATOR_VERSION",
    "NAMED_MESHES",
    "PHYSICS_HZ",
    "SCENES",
    "CameraPath",
    "Mesh",
    "ObjectSpec",
    "Poke",
    "SceneSpec",
    "Simulation",
    "StaticSpec",
    "Timings",
    "mesh",
    "num_meshes",
    "object_range",
    "render_video",
    "sample_camera_path",
    "sample_scene",
    "smooth_walk",
    "texture_image",
    "video_meta",
    "video_rng",
]

PHYSICS_HZ = 240.0  # pybullet's default time step; substeps per frame = PHYSICS_HZ / fps
GROUND_HALF_SIZE = 6.0  # the textured ground square spans +-6 m

# ---------------------------------------------------------------------------------------------
# Simulation and rendering


class Simulation:
    """One scene in its own pybullet DIRECT client: step the physics, render frames and masks.

    Objects get labels 1..n in the order of ``spec.objects``; the ground, the background
    geometry (``spec.statics``: walls, furniture) and empty pixels are 0.
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
            self._textures: dict = {}
            self.statics = [self._make_static(piece, rng) for piece in spec.statics]
            # Segmentation values are body ids; this table turns them into labels 1..n.
            self._labels = np.zeros(
                max(self.bodies + self.statics + [self.ground]) + 1, dtype=np.uint8
            )
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
        reps = 2 * h / self.spec.ground_tile
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

    def _make_static(self, piece: StaticSpec, rng) -> int:
        """A fixed box or cylinder of the background, its texture repeating every ``tile`` m."""
        p, c, h = self.p, self.client, piece.half_extents
        if piece.shape == "box":
            geometry = box_mesh(h, piece.tile)
            collision = p.createCollisionShape(p.GEOM_BOX, halfExtents=h, physicsClientId=c)
        elif piece.shape == "cylinder":
            geometry = cylinder_mesh(h[0], h[2], piece.tile)
            collision = p.createCollisionShape(
                p.GEOM_CYLINDER, radius=h[0], height=2 * h[2], physicsClientId=c
            )
        else:
            raise ValueError(f"unknown static shape {piece.shape!r} (box or cylinder)")
        visual = p.createVisualShape(p.GEOM_MESH, **geometry, physicsClientId=c)
        body = p.createMultiBody(
            0,
            collision,
            visual,
            basePosition=piece.position,
            baseOrientation=yaw_quaternion(piece.yaw),
            physicsClientId=c,
        )
        if piece.pattern is not None:
            key = (piece.pattern, str(piece.pattern_colors))  # pieces of one thing share one
            if key not in self._textures:
                image = texture_image(piece.pattern, piece.pattern_colors, rng, size=128)
                self._textures[key] = self._texture(f"static{len(self._textures)}", image)
            p.changeVisualShape(
                body,
                -1,
                textureUniqueId=self._textures[key],
                rgbaColor=[1, 1, 1, 1],
                physicsClientId=c,
            )
        else:
            p.changeVisualShape(body, -1, rgbaColor=piece.color + [1.0], physicsClientId=c)
        p.changeDynamics(body, -1, lateralFriction=0.7, restitution=0.2, physicsClientId=c)
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
        if self.spec.center is None:
            toward_centre = -position[:2] / (np.linalg.norm(position[:2]) + 1e-6)
        else:
            offset = np.asarray(self.spec.center) - position[:2]
            toward_centre = offset / (np.linalg.norm(offset) + 1e-6)
        heading = rotate2d(toward_centre, poke.turn) * poke.speed
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
