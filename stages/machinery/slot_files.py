"""The files an export of slots is (export-slots and infer write the same layout).

- :class:`ZarrWriter` / :class:`NpzWriter`: rows arrive in order, one frame axis; a zarr group
  is written a chunk at a time under a temporary name, an ``.npz`` through the atomic writer.
- :func:`read_export_meta`: the ``egoslots_export`` attrs (or npz ``meta``) of an earlier
  export, to tell whether it is the same one.
- Where OUT may be (:func:`check_output_location`: never inside a feature store or a run's
  checkpoints) and what may be replaced (:func:`check_replaceable`: only an earlier export,
  :func:`remove_export`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from egoslots.cache.location import write_file
from egoslots.stages.machinery.common import StageError

ATTRS_KEY = "egoslots_export"


class ZarrWriter:
    """Rows arrive in order; they are buffered and written a whole chunk at a time."""

    def __init__(self, path: Path, chunk_rows: int = 256):
        import zarr

        self.group = zarr.open_group(str(path), mode="w", zarr_format=3)
        self.chunk_rows = chunk_rows
        self.buffer: dict[str, list] = {}
        self.start = 0  # first row not yet written
        self.total = 0

    def write(self, row: int, total: int, arrays: dict) -> None:
        self.total = total
        for name, values in arrays.items():
            if name not in self.group:
                self.group.create_array(
                    name,
                    shape=(total, *values.shape[1:]),
                    dtype=values.dtype,
                    chunks=(min(total, self.chunk_rows), *values.shape[1:]),
                    fill_value=0,
                )
            self.buffer.setdefault(name, []).append(values)
        buffered = sum(len(v) for v in next(iter(self.buffer.values())))
        if buffered >= self.chunk_rows:
            self.flush(whole_chunks=True)

    def flush(self, whole_chunks: bool = False) -> None:
        """Write the buffered rows (only whole chunks, keeping the rest, when ``whole_chunks``)."""
        if not self.buffer:
            return
        merged = {name: np.concatenate(parts) for name, parts in self.buffer.items()}
        count = len(next(iter(merged.values())))
        if whole_chunks:
            count -= count % self.chunk_rows
        for name, values in merged.items():
            self.group[name][self.start : self.start + count] = values[:count]
        self.buffer = {
            name: [values[count:]] for name, values in merged.items() if len(values) > count
        }
        self.start += count

    def shape(self, name: str) -> tuple:
        return tuple(self.group[name].shape)

    def names(self) -> list[str]:
        return sorted(name for name, _ in self.group.arrays())

    def finish(self, table: dict, meta: dict) -> None:
        self.flush()
        for name, values in table.items():
            if values.dtype.kind == "U":
                self.group.create_array(name, shape=values.shape, dtype=str, fill_value="")
            else:
                self.group.create_array(name, shape=values.shape, dtype=values.dtype, fill_value=0)
            self.group[name][:] = values
        self.group.attrs[ATTRS_KEY] = json.loads(json.dumps(meta, default=str))


class NpzWriter:
    """Rows are kept in memory and written as one .npz file, whole or not at all."""

    def __init__(self, path: Path):
        self.path = path
        self.parts: dict[str, list] = {}

    def write(self, row: int, total: int, arrays: dict) -> None:
        for name, values in arrays.items():
            self.parts.setdefault(name, []).append(values)

    def shape(self, name: str) -> tuple:
        parts = self.parts[name]
        return (sum(len(p) for p in parts), *parts[0].shape[1:])

    def names(self) -> list[str]:
        return sorted(self.parts)

    def finish(self, table: dict, meta: dict) -> None:
        arrays = {name: np.concatenate(parts) for name, parts in self.parts.items()}
        arrays.update(table)
        arrays["meta"] = np.asarray(json.dumps(meta, default=str))
        write_file(self.path, lambda f: np.savez(f, **arrays))  # a file object: no .npz suffix


def read_export_meta(path: Path) -> dict | None:
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                return json.loads(str(data["meta"]))
        import zarr

        return dict(zarr.open_group(str(path), mode="r").attrs[ATTRS_KEY])
    except Exception:
        return None


# What an export folder holds at its top: zarr's own file and the arrays written above.
EXPORT_ENTRIES = frozenset(
    {"zarr.json", "slots", "masks", "attention_masks", "labels", "tokens", "segments"}
    | {"video_ids", "video_first", "video_length"}
)


def partial_path(out: Path) -> Path:
    """Where a zarr export is written before it is renamed to ``out``."""
    return out.with_name(out.name + ".partial")


def check_output_location(out: Path) -> None:
    """Refuse an OUT equal to or inside a feature store (the export would land among its arrays,
    and ``cache rm`` / ``--overwrite`` would delete it with the store) or a run's checkpoints
    folder. Links are followed: a path that leads into a store is inside it."""
    from egoslots.cache.store import ATTRS_KEY
    from egoslots.stages.machinery.rundirs import RUN_MARKER

    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    real = Path(os.path.realpath(existing)) / out.relative_to(existing)
    for folder in (real, *real.parents):
        if _is_feature_store(folder, ATTRS_KEY):
            raise StageError(
                f"OUT={out} is {'a' if folder == real else 'inside the'} feature store {folder}: "
                "an export never goes into a store (deleting or re-extracting the store would "
                f"delete it too); choose a path outside it, e.g. {folder.parent / out.name}"
            )
        if folder.name == "checkpoints" and (
            (folder.parent / RUN_MARKER).exists() or any(folder.glob("*.ckpt"))
        ):
            raise StageError(
                f"OUT={out} is {'the' if folder == real else 'inside the'} checkpoints folder "
                f"{folder} of a run: choose a path outside it, e.g. {folder.parent / out.name}"
            )


def _is_feature_store(folder: Path, key: str) -> bool:
    """True if ``folder`` is a zarr group with egoslots feature-store attrs (read from its
    zarr.json directly: cheap, and never creates anything)."""
    try:
        meta = json.loads((folder / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and key in (meta.get("attributes") or {})


def check_replaceable(out: Path) -> None:
    """Refuse, before any work, an OUT (or its ``.partial``) that egoslots did not write: only an
    earlier export (``egoslots_export`` attrs or an npz's meta, and nothing else in the folder)
    may be replaced, whatever ``--overwrite`` says. ``.``, ``~`` or a folder of user files never."""
    for path in (out, partial_path(out)):
        if not path.exists() and not path.is_symlink():
            continue
        if path.is_symlink():
            why = "it is a symbolic link"
        elif path == out and read_export_meta(path) is None:
            why = "it is not an egoslots export"
        elif path.is_dir() and not (path / "zarr.json").is_file():
            why = "it is not a zarr folder egoslots started"
        else:
            foreign = sorted(set(os.listdir(path)) - EXPORT_ENTRIES) if path.is_dir() else []
            if not foreign:
                continue
            why = f"it holds files an export never writes ({', '.join(foreign[:4])})"
        raise StageError(
            f"refusing to replace {path}: {why}; choose another OUT (egoslots only replaces "
            "what it wrote)"
        )


def remove_export(path: Path) -> None:
    """Delete an earlier export or its ``.partial`` (:func:`check_replaceable` said it is ours)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def finish_export(writer, meta: dict, ids: list, firsts: list, lengths: list) -> None:
    """Close an export: the video table (ids, first rows, lengths) and the meta, completed with
    the counts, shapes and array names of what ``writer`` holds."""
    slots_shape = writer.shape("slots")
    meta.update(
        {
            "num_videos": len(ids),
            "num_frames": int(sum(lengths)),
            "num_slots": slots_shape[1],
            "slot_dim": slots_shape[2],
            "arrays": writer.names(),
        }
    )
    writer.finish(
        {
            "video_ids": np.asarray(ids, dtype=str),
            "video_first": np.asarray(firsts, dtype=np.int64),
            "video_length": np.asarray(lengths, dtype=np.int64),
        },
        meta,
    )
