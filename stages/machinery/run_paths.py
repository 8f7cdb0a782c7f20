"""Where a run's files point: the paths run files record, and the store a run read.

Run files (``inputs.json``, ``dvae.json``) record the store and dVAE run they name relative to
the run directory, and a run looks for its store in its own work directory first: a work
directory copied or moved elsewhere goes on with its own stores and runs, and a copy never reads
or writes the original's.
"""

from __future__ import annotations

import os
from pathlib import Path

from egoslots.cache.catalog import find_recorded_store
from egoslots.stages.machinery.rundirs import saved_config


def path_for_run_file(run_dir: Path, path) -> str:
    """How a run file records a path it names (a store, a dVAE run): relative to the run
    directory when both are local, so a work directory copied or moved elsewhere reads its own
    stores and runs; a URL (``s3://...``) as it is."""
    text = str(path)
    if "://" in text:
        return text
    return os.path.relpath(Path(text).resolve(), Path(run_dir).resolve())


def path_from_run_file(run_dir: Path, recorded: str | None) -> str | None:
    """A path a run file recorded, as a usable path: relative ones against the run directory
    (what :func:`path_for_run_file` writes), absolute ones and URLs (older runs) as they are."""
    if not recorded:
        return None
    if "://" in recorded or Path(recorded).is_absolute():
        return recorded
    return os.path.normpath(Path(run_dir).absolute() / recorded)


def store_of_run(run_dir: Path, fingerprint: str, recorded: list[str | None]):
    """Where the store of fingerprint ``fingerprint`` that a run read is now, or None.

    The run's own work directory comes first (``<work_dir>/stores/<fingerprint>.zarr`` beside
    ``<work_dir>/runs/``): a copied work directory uses its own copy of the store, never the
    original's, even where an older run file recorded an absolute path. Then the ``recorded``
    paths, then the stores folder of the run's saved ``work_dir`` / ``store_dir``."""
    run_dir = Path(run_dir)
    candidates = []
    if run_dir.absolute().parent.name == "runs":
        own = run_dir.absolute().parent.parent / "stores" / f"{fingerprint}.zarr"
        candidates.append(str(own))
    candidates += [path_from_run_file(run_dir, r) for r in recorded]
    saved = saved_config(run_dir) or {}
    return find_recorded_store(
        fingerprint, candidates, saved.get("work_dir"), saved.get("store_dir")
    )
