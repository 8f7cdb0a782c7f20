"""What a video shows, as written to its meta.json: generator, camera, light, ground, pokes
and every object's mesh, colour, size and per-frame pose; the room and clutter families add
their name and background geometry."""

from __future__ import annotations

import numpy as np

from . import DEFAULT_SCENE
from .assets import mesh
from .spec import SceneSpec

# Bump whenever the same arguments would give different pictures: it is recorded in
# dataset.json, and a rerun into a folder made by another version refuses to mix them.
# (New scene families do not bump it: the tabletop videos of version 1 are unchanged.)
GENERATOR_VERSION = 1


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
        **_family_meta(spec),
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


def _family_meta(spec: SceneSpec) -> dict:
    """What the other families add to meta.json (nothing for tabletop, whose files stay those
    of generator version 1): the scene's name, its background geometry and its own facts."""
    if spec.scene == DEFAULT_SCENE:
        return {}
    return {
        "scene": spec.scene,
        **spec.extra,
        "background": [
            {
                "name": piece.name,
                "shape": piece.shape,
                "position": _round(piece.position, 4),
                "half_extents": _round(piece.half_extents, 4),  # cylinder: (r, r, half height)
                "yaw": round(piece.yaw, 4),
                "color": _round(piece.color, 4),
                "texture": piece.pattern,
            }
            for piece in spec.statics
        ],
    }
