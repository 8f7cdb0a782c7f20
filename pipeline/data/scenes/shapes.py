"""Triangle meshes of the background's boxes and cylinders, with texture coordinates in metres.

pybullet's own GEOM_BOX / GEOM_CYLINDER visuals stretch one copy of a texture over each face,
so a 5 m wall and a 5 cm table leg would show stripes of very different widths. These meshes
instead repeat the texture every ``tile`` metres, so patterns have the same scale everywhere.
"""

from __future__ import annotations

import numpy as np

# (normal, u axis, v axis) per box face, with u x v = normal so the corners below run
# counter-clockwise seen from outside.
_FACES = (
    ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    ((-1, 0, 0), (0, 0, 1), (0, 1, 0)),
    ((0, 1, 0), (0, 0, 1), (1, 0, 0)),
    ((0, -1, 0), (1, 0, 0), (0, 0, 1)),
    ((0, 0, 1), (1, 0, 0), (0, 1, 0)),
    ((0, 0, -1), (0, 1, 0), (1, 0, 0)),
)
_CORNERS = ((-1, -1), (1, -1), (1, 1), (-1, 1))


def box_mesh(half_extents, tile: float) -> dict:
    """Vertices, indices, uvs and normals (createVisualShape's keywords) of a box centred at
    the origin."""
    h = np.asarray(half_extents, dtype=np.float64)
    vertices, uvs, normals, indices = [], [], [], []
    for normal, u, v in _FACES:
        n, u, v = (np.asarray(a, dtype=np.float64) for a in (normal, u, v))
        hu, hv = float(np.abs(u) @ h), float(np.abs(v) @ h)
        base = len(vertices)
        for a, b in _CORNERS:
            vertices.append((n * h + a * u * h + b * v * h).tolist())
            uvs.append([a * hu / tile, b * hv / tile])
            normals.append(n.tolist())
        indices += [base, base + 1, base + 2, base, base + 2, base + 3]
    return dict(vertices=vertices, indices=indices, uvs=uvs, normals=normals)


def cylinder_mesh(radius: float, half_height: float, tile: float, segments: int = 20) -> dict:
    """An upright cylinder centred at the origin: side quads and two capping fans."""
    vertices, uvs, normals, indices = [], [], [], []
    angles = np.linspace(0.0, 2 * np.pi, segments + 1)
    for i in range(segments):
        base = len(vertices)
        for angle, z in ((angles[i], -1), (angles[i + 1], -1), (angles[i + 1], 1), (angles[i], 1)):
            c, s = float(np.cos(angle)), float(np.sin(angle))
            vertices.append([radius * c, radius * s, z * half_height])
            uvs.append([angle * radius / tile, z * half_height / tile])
            normals.append([c, s, 0.0])
        indices += [base, base + 1, base + 2, base, base + 2, base + 3]
    for z in (-1, 1):
        centre = len(vertices)
        vertices.append([0.0, 0.0, z * half_height])
        uvs.append([0.0, 0.0])
        normals.append([0.0, 0.0, float(z)])
        for i in range(segments):
            for angle in (angles[i], angles[i + 1]):
                c, s = float(np.cos(angle)), float(np.sin(angle))
                vertices.append([radius * c, radius * s, z * half_height])
                uvs.append([radius * c / tile, radius * s / tile])
                normals.append([0.0, 0.0, float(z)])
            a, b = len(vertices) - 2, len(vertices) - 1
            indices += [centre, a, b] if z > 0 else [centre, b, a]
    return dict(vertices=vertices, indices=indices, uvs=uvs, normals=normals)


def yaw_quaternion(yaw: float) -> list[float]:
    """(x, y, z, w) of a rotation by ``yaw`` radians about the vertical axis."""
    return [0.0, 0.0, float(np.sin(yaw / 2)), float(np.cos(yaw / 2))]
