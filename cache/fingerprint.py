"""The extraction fingerprint: what identifies a store, and how two stores' inputs differ.

The fingerprint names a store (``<work_dir>/stores/<fingerprint>.zarr``) and changes exactly
when the bytes extraction would write change: the video table (ids, lengths, splits and each
video's files by relative path and size: never their mtime, see below), preprocessing, the
backbone's ``describe()`` (name, checkpoint sha256, block, final norm, input size, mean/std),
compute and storage dtypes, horizontal-flip caching, frame size and the store format version.
Batch size, workers, device and progress are not inputs. It is 16 hex characters of the
SHA-256 of the inputs as canonical JSON; the inputs themselves are recorded in the store's
attrs so that a mismatch can be explained key by key.

Why (path, size) and not mtime or contents: an mtime changes when nothing extraction reads
changed (``touch``, ``cp`` without ``-p``, a restore from backup, a sync tool), and a new
fingerprint then means a new store, hours of re-extraction and later stages refusing the old
runs; hashing contents would read every byte of the dataset (terabytes for SAYCam) each time a
store is looked for. A re-encoded or edited frame almost always changes its size; an edit that
keeps every byte count is not noticed: re-extract with ``extract-features --overwrite``.

Later stages never rebuild the backbone or rescan the data to find their store: they match
the extraction *settings* (:func:`extraction_settings`, the config keys that feed the
fingerprint) that every store records (``egoslots.cache.catalog.store_for_config``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

from egoslots.cache.store import FORMAT_VERSION
from egoslots.pipeline.config import section_dict

FINGERPRINT_CHARS = 16


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace: one text per value, whatever the dict order."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def video_table_inputs(videos: Iterable) -> list[list]:
    """[[id, num_frames, split, files digest], ...] from a source's ``VideoInfo`` rows.

    A video's files (relative path, size, and a content digest where a source has one: see
    :class:`~egoslots.pipeline.data.base.FileIdentity`) are folded into one digest per video, so the
    recorded inputs stay small for frame folders with millions of files.
    """
    rows = []
    for v in videos:
        files = [[f.path, int(f.size), int(f.content)] for f in v.files]
        rows.append([v.video_id, int(v.num_frames), v.split, _digest(files)[:16]])
    return rows


def fingerprint_inputs(
    *,
    videos: Iterable,
    preprocessing: dict,
    backbone: dict,
    compute_dtype: str,
    storage_dtype: str,
    hflip: str,
    frame_size: int,
) -> dict:
    """Everything that changes the bytes of a store, as one JSON-able dict."""
    return {
        "format_version": FORMAT_VERSION,
        "videos": video_table_inputs(videos),
        "preprocessing": preprocessing,
        "backbone": backbone,
        "compute_dtype": compute_dtype,
        "storage_dtype": storage_dtype,
        "hflip": hflip,
        "frame_size": int(frame_size),
    }


def fingerprint_of(inputs: dict) -> str:
    return _digest(inputs)[:FINGERPRINT_CHARS]


def describe_differences(recorded: dict, current: dict) -> list[str]:
    """Human-readable lines saying how two fingerprint-input dicts differ."""
    lines = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if canonical_json(a) == canonical_json(b):
            continue
        if key == "videos":
            lines.append("video table: " + _video_differences(a or [], b or []))
        elif isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if canonical_json(a.get(sub)) != canonical_json(b.get(sub)):
                    lines.append(
                        f"{key}.{sub}: store has {a.get(sub)!r}, config gives {b.get(sub)!r}"
                    )
        else:
            lines.append(f"{key}: store has {a!r}, config gives {b!r}")
    return lines


def _video_differences(old: list, new: list) -> str:
    old_by_id = {row[0]: row for row in old}
    new_by_id = {row[0]: row for row in new}
    added = [v for v in new_by_id if v not in old_by_id]
    removed = [v for v in old_by_id if v not in new_by_id]
    changed = [v for v in new_by_id if v in old_by_id and old_by_id[v] != new_by_id[v]]
    parts = []
    for what, ids in (
        ("added", added),
        ("removed", removed),
        ("changed (length, split or files)", changed),
    ):
        if ids:
            parts.append(f"{len(ids)} {what}: {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}")
    if not parts:
        parts.append("same videos in a different order")
    return "; ".join(parts)


# ---------------------------------------------------------------------------- settings
def extraction_settings(cfg) -> dict:
    """The config keys that feed the fingerprint (what ``resolve_store`` matches on)."""
    data = section_dict(cfg, "dataset")
    dataset = {
        "source": data["source"],
        "path": os.path.abspath(os.path.expanduser(str(data["path"]))),
        "fps": data["fps"],
        "max_videos": data["max_videos"],
        "split": data["split"],
    }
    if data["source"] in ("hdf5", "synthetic"):  # the source's own settings
        dataset[data["source"]] = data[data["source"]]
    return {
        "dataset": dataset,
        "backbone": section_dict(cfg, "backbone"),
        "dtype": cfg.extract.dtype,
        "compute": cfg.extract.compute,
        "frame_size": int(cfg.extract.frame_size),
        "hflip": cfg.augment.hflip,
    }


def settings_mismatch(recorded: dict, wanted: dict) -> list[str]:
    """Keys where a store's recorded settings differ from a config's (``compute: auto`` matches any)."""
    diffs = []
    for key in sorted(set(recorded) | set(wanted)):
        a, b = recorded.get(key), wanted.get(key)
        if key == "compute" and b == "auto":
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"{key}.{k}"
                for k in sorted(set(a) | set(b))
                if canonical_json(a.get(k)) != canonical_json(b.get(k))
            ]
        elif canonical_json(a) != canonical_json(b):
            diffs.append(key)
    return diffs
