"""The extraction fingerprint, and finding the store a config means.

The fingerprint names a store (``<work_dir>/stores/<fingerprint>.zarr``) and changes exactly
when the bytes extraction would write change: the video table (ids, lengths, splits and each
video's files by relative path, size and mtime, never their contents), preprocessing, the
backbone's ``describe()`` (name, checkpoint sha256, block, final norm, input size, mean/std),
compute and storage dtypes, horizontal-flip caching, frame size and the store format version.
Batch size, workers, device and progress are not inputs. It is 16 hex characters of the
SHA-256 of the inputs as canonical JSON; the inputs themselves are recorded in the store's
attrs so that a mismatch can be explained key by key.

Later stages never rebuild the backbone or rescan the data to find their store:
:func:`resolve_store` takes ``store=`` (a path or a fingerprint) or else looks for the one
complete store whose recorded extraction *settings* (the config keys that feed the
fingerprint) match the config.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cache.location import Location, as_location, is_remote, name_of, store_exists
from cache.store import (
    FORMAT_VERSION,
    FeatureStore,
    StoreError,
    list_stores,
    store_path,
    stores_dir,
)

FINGERPRINT_CHARS = 16


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace: one text per value, whatever the dict order."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def video_table_inputs(videos: Iterable) -> list[list]:
    """[[id, num_frames, split, files digest], ...] from a source's ``VideoInfo`` rows.

    A video's files (relative path, size, mtime_ns) are folded into one digest per video, so
    the recorded inputs stay small for frame folders with millions of files.
    """
    rows = []
    for v in videos:
        files = [[f.path, int(f.size), int(f.mtime_ns)] for f in v.files]
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


# ---------------------------------------------------------------------------- settings / resolve
def extraction_settings(cfg) -> dict:
    """The config keys that feed the fingerprint (what ``resolve_store`` matches on)."""
    from pipeline.config import section_dict

    data = section_dict(cfg, "dataset")
    dataset = {
        "source": data["source"],
        "path": os.path.abspath(os.path.expanduser(str(data["path"]))),
        "fps": data.get("fps"),
        "max_videos": data.get("max_videos"),
        "split": data.get("split"),
    }
    if data["source"] == "hdf5":
        dataset["hdf5"] = data.get("hdf5")
    if data["source"] == "synthetic":
        dataset["synthetic"] = data.get("synthetic")
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


def config_stores_dir(cfg) -> Location:
    """The stores folder a config means: ``store_dir`` (folder or URL), else work_dir/stores."""
    return stores_dir(cfg.work_dir, cfg.get("store_dir"))


def store_location(cfg, name: str | None = None) -> Location:
    """A ``store=`` value (path, URL or fingerprint) as a location: fingerprints live in the
    config's stores folder (:func:`config_stores_dir`)."""
    name = str(name if name is not None else cfg.store)
    if "://" in name:
        return as_location(name)
    path = Path(name).expanduser()
    if path.exists() or os.sep in name or name.endswith(".zarr"):
        return path
    return store_path(config_stores_dir(cfg), name)


def resolve_store(cfg) -> FeatureStore:
    """The complete store a later stage should read, or a StoreError saying what to run."""
    folder = config_stores_dir(cfg)
    if cfg.get("store"):
        path = store_location(cfg)
        if not _exists(path):
            have = ", ".join(name_of(p) for p in _stores_in(folder)) or "none"
            raise StoreError(
                f"store={cfg.store}: no feature store at {path} (stores in {folder}: {have}); "
                "run `egoslots extract-features CONFIG` with the config you extracted with"
            )
        return FeatureStore.open(path)
    wanted = extraction_settings(cfg)
    complete, incomplete = [], []
    for path in _stores_in(folder):
        try:
            store = FeatureStore.open(path, require_complete=False)
        except StoreError:
            continue
        if settings_mismatch(store.meta.get("settings", {}), wanted):
            continue
        (complete if store.complete else incomplete).append(store)
    if len(complete) == 1:
        return complete[0]
    if len(complete) > 1:
        names = ", ".join(f"{s.fingerprint} (created {s.meta.get('created')})" for s in complete)
        raise StoreError(
            f"several complete stores in {folder} match this config: {names}; "
            "name one with store=FINGERPRINT (see `egoslots cache ls`)"
        )
    if incomplete:
        done, total = incomplete[0].progress()
        raise StoreError(
            f"the store for this config, {incomplete[0].path}, is incomplete ({done}/{total} chunks); "
            "rerun `egoslots extract-features CONFIG` with this config to finish it"
        )
    raise StoreError(
        f"no feature store in {folder} matches this config's extraction settings "
        f"(dataset {wanted['dataset']['path']}, backbone {wanted['backbone'].get('name')}, "
        f"dtype {wanted['dtype']}, frame size {wanted['frame_size']}, hflip {wanted['hflip']}); "
        "run `egoslots extract-features CONFIG` with this config first, or set store=PATH|FINGERPRINT"
    )


def _exists(path: Location) -> bool:
    try:
        return store_exists(path)
    except Exception as err:  # noqa: BLE001 - credentials, endpoint, bucket
        raise StoreError(f"cannot reach {path}: {type(err).__name__}: {err}") from err


def _stores_in(folder: Location) -> list[Location]:
    try:
        return list_stores(folder)
    except Exception as err:  # noqa: BLE001 - credentials, endpoint, bucket
        if not is_remote(folder):
            raise
        raise StoreError(
            f"cannot list the stores in {folder}: {type(err).__name__}: {err}"
        ) from err
