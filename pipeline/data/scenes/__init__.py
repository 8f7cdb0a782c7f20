"""Scene families of the synthetic generator, chosen by name (``make-synthetic --scene``,
``dataset.synthetic.scene``).

Each family is a module with ``sample(rng, frames, fps, min_objects, max_objects)`` returning
a :class:`~.spec.SceneSpec`, ``OBJECTS`` (its default object-count range) and a docstring that
says what it draws. Every family is rendered by the same ``Simulation`` (``..synthetic``) and
writes the same files: frames, uint8 instance masks (0 = background) and meta.json.
"""

from __future__ import annotations

import numpy as np

from . import clutter, room, tabletop
from .tabletop import DEFAULT_FPS

SCENES = {"tabletop": tabletop, "room": room, "clutter": clutter}
DEFAULT_SCENE = "tabletop"


def family(scene: str):
    """The module of scene family ``scene``; ValueError naming the choices if there is none."""
    try:
        return SCENES[scene]
    except (KeyError, TypeError):
        raise ValueError(f"unknown scene {scene!r}: choose one of {', '.join(SCENES)}") from None


def object_range(
    scene: str, min_objects: int | None = None, max_objects: int | None = None
) -> tuple[int, int]:
    """(min, max) objects per video: the given bounds, the family's default where None."""
    lo, hi = family(scene).OBJECTS
    return (lo if min_objects is None else int(min_objects)), (
        hi if max_objects is None else int(max_objects)
    )


def sample_scene(
    rng: np.random.Generator,
    frames: int,
    fps: float = DEFAULT_FPS,
    min_objects: int | None = None,
    max_objects: int | None = None,
    scene: str = DEFAULT_SCENE,
):
    """Draw one scene of family ``scene`` (every random draw of the video happens here)."""
    lo, hi = object_range(scene, min_objects, max_objects)
    return family(scene).sample(rng, frames, fps, lo, hi)
