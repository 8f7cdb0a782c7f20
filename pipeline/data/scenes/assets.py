"""The generator's assets: the mesh catalogue (pybullet_data's named meshes and random blobs)
and the procedural textures every scene family paints its objects, floors and walls with."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

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
    sides: tuple[float, float, float] = (1.0, 1.0, 1.0)  # bounding-box sides in .obj units


def _data_path() -> Path:
    import pybullet_data

    return Path(pybullet_data.getDataPath())


def num_meshes() -> int:
    return len(NAMED_MESHES) + NUM_BLOBS


def random_mesh_id(rng) -> int:
    """A mesh for a new object: a named one with ``NAMED_MESH_PROBABILITY``, else a blob."""
    if rng.random() < NAMED_MESH_PROBABILITY:
        return int(rng.integers(len(NAMED_MESHES)))
    return len(NAMED_MESHES) + int(rng.integers(NUM_BLOBS))


def standing_extent(mesh_id: int, size: float) -> tuple[float, float]:
    """(half height, footprint radius) in metres of a mesh scaled to ``size`` standing upright."""
    m = mesh(mesh_id)
    half_height = 0.5 * size * m.sides[2] / m.extent
    radius = 0.5 * size * float(np.hypot(m.sides[0], m.sides[1])) / m.extent
    return half_height, radius


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
        tuple(float(c) for c in hi - lo),
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
