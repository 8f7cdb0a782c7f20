"""Reading the JSON records egoslots wrote (a run's ``inputs.json``, ``dvae.json``,
``encoder.json``, ``metrics.json``): one reader, so a damaged file is one line naming it.

It lives in ``pipeline/`` because ``pipeline.dvae.load_dvae`` reads ``dvae.json`` and
``pipeline/`` imports nothing above it. The writer of these files is the atomic one,
``egoslots.cache.location.write_text``.
"""

from __future__ import annotations

import json
from pathlib import Path


class DamagedFile(ValueError):
    """A file egoslots wrote (a run's JSON record) that no longer reads: one line naming it."""


# How to get a damaged run file back, unless the caller knows better.
REWRITE_HINT = (
    "egoslots rewrites it when the stage that made it runs again (move it away first), "
    "or restore it from a copy"
)


def read_json(location: Path | str, what: str = "", recover: str = REWRITE_HINT) -> dict | None:
    """The JSON object in a file egoslots wrote (``cache.location.write_text``; None when absent).

    The one reader of run files (``inputs.json``, ``dvae.json``, ``encoder.json``,
    ``metrics.json``, ...): a damaged one, or one holding no JSON object, is one
    :class:`DamagedFile` error naming the file, ``what`` it is and how to ``recover``, not
    json's bare JSONDecodeError."""
    label = f"{what} {location}" if what else str(location)
    try:
        if isinstance(location, Path):
            if not location.is_file():
                if location.exists():
                    raise DamagedFile(f"{label} is not a file (a folder?): {recover}")
                return None
            text = location.read_bytes()
        else:
            import fsspec.core

            fs, path = fsspec.core.url_to_fs(location)
            if not fs.exists(path):
                return None
            text = fs.cat_file(path)
        data = json.loads(text)
    except DamagedFile:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise DamagedFile(f"cannot read {label} ({reason}): it is damaged; {recover}") from err
    if not isinstance(data, dict):
        raise DamagedFile(
            f"cannot read {label}: it holds a JSON {type(data).__name__}, not an object: it is "
            f"damaged; {recover}"
        )
    return data
