"""`egoslots export-slots RUN OUT`: per-frame slots, masks and tokens for downstream use.

The trained model runs over every whole video of a split (slots carried across windows, as in
``evaluate``) and the results are written as flat arrays over one frame axis plus a video
table, to a zarr v3 group (any OUT not ending in ``.npz``) or a single ``.npz`` file:

    slots            (F, K, D) float32  the slot vectors per frame (processor.state)
    masks            (F, K, N) float16  decoder masks (primary, as SlotContrast), N = h*w
    attention_masks  (F, K, N) float16  slot-attention masks
    tokens           (F, h, w) uint16   the cached dVAE token ids (runs with a dVAE only)
    video_ids (V,) str, video_first (V,) int64, video_length (V,) int64: rows of each video
    attrs / meta: run, split, store fingerprint, dVAE hash, checkpoint step, grid, K, D,
                  restarts (draws of a Gaussian initializer's first slots; the best kept)

Reading it back (the same code for zarr and npz)::

    import json, numpy as np, zarr
    out = "slots.zarr"
    if out.endswith(".npz"):
        data = np.load(out)
        meta = json.loads(str(data["meta"]))
    else:
        data = zarr.open_group(out, mode="r")
        meta = dict(data.attrs["egoslots_export"])
    ids = [str(v) for v in data["video_ids"][:]]
    first, length = data["video_first"][:], data["video_length"][:]
    v = ids.index("video_0003")
    rows = slice(int(first[v]), int(first[v] + length[v]))
    slots = data["slots"][rows]            # (T, K, D)
    masks = data["masks"][rows]            # (T, K, N); reshape N to meta["grid"]
    print(meta["store"], meta["tokens"], meta["checkpoint_step"])

The export is written next to OUT under a temporary name and renamed when complete, so an
interrupted export never leaves a half-written OUT; rerunning with the same run, checkpoint
and split returns at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from egoslots.cache.location import write_file
from egoslots.stages.machinery.common import StageError, setup_logging
from egoslots.stages.machinery.inference import (
    checkpoint_identity,
    infer_windows,
    load_trained,
    restarts_option,
    split_size,
    store_windows,
    window_length,
)
from egoslots.stages.machinery.runtime import pick_device

log = logging.getLogger("egoslots")
ATTRS_KEY = "egoslots_export"


def export_slots_run(
    run_dir: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    checkpoint: str = "last",
    max_videos: int | None = None,
    overwrite: bool = False,
    restarts: int | None = None,
) -> Path:
    """Export slots, masks and tokens of every video of ``split``; returns the output path.
    ``restarts``: draws of a Gaussian initializer's first slots (None: the run's config)."""
    run_dir = Path(run_dir)
    out = Path(out).expanduser().absolute() if out is not None else run_dir / f"slots_{split}.zarr"
    if not out.name:
        raise StageError(f"OUT={out} is not a file or folder name: give e.g. slots.zarr")
    as_npz = out.suffix == ".npz"
    check_output_location(out)
    check_replaceable(out)
    ident = checkpoint_identity(run_dir, checkpoint)
    model, cfg, store, tokens_hash = load_trained(run_dir, checkpoint)
    if restarts is None:
        restarts = int(model.config.restarts)
    meta = {
        "run": str(run_dir),
        "split": split,
        "store": store.fingerprint,
        "tokens": tokens_hash,
        "checkpoint": ident,
        "checkpoint_step": ident.get("step"),
        "grid": list(store.grid),
        "max_videos": max_videos,
        "restarts": restarts,
    }
    if out.exists() and not overwrite:
        previous = _read_meta(out) or {}
        if {k: previous.get(k) for k in meta} == meta:
            log.info("export already in %s", out)
            return out
        raise StageError(
            f"{out} exists and holds a different export; pass --overwrite or another OUT"
        )

    model = model.to(pick_device()).eval()
    window = window_length(cfg)
    total = split_size(store, split, max_videos)
    if total == 0:
        raise StageError(f"store {store.path} has no videos in split '{split}'")
    videos = store.videos_in(split, hflip=False)[:total]
    num_frames = sum(v.length for v in videos)

    tmp = partial_path(out)  # a zarr folder is renamed into place when done
    _remove(tmp)
    writer = _NpzWriter(out) if as_npz else _ZarrWriter(tmp)
    row, ids, firsts, lengths = 0, [], [], []
    for video in tqdm(videos, desc=f"export {split}", unit="video"):
        first = row
        pending = []  # the token ids of each window, handed back next to the model's result

        def windows(video=video, pending=pending):  # streamed: long videos never sit in memory
            for feats, toks in store_windows(store, video, window, tokens_hash):
                pending.append(toks)
                yield feats, toks

        torch.manual_seed(0)  # a Gaussian initializer's first slots: as evaluate's (infer_video)
        for result in infer_windows(model, windows(), restarts):
            toks = pending.pop(0)
            arrays = {"slots": result["slots"].numpy().astype(np.float32)}
            masks = result["masks"]
            if "model_decoder" in masks:
                arrays["masks"] = masks["model_decoder"].numpy().astype(np.float16)
            if "model_attention" in masks:
                arrays["attention_masks"] = masks["model_attention"].numpy().astype(np.float16)
                arrays.setdefault("masks", arrays["attention_masks"])
            if toks is not None:
                arrays["tokens"] = toks.numpy().astype(np.uint16)
            writer.write(row, num_frames, arrays)
            row += len(arrays["slots"])
        ids.append(video.id)
        firsts.append(first)
        lengths.append(row - first)
    slots_shape = writer.shape("slots")
    meta.update(
        {
            "num_videos": len(ids),
            "num_frames": row,
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
    if not as_npz:  # (an npz file is written atomically in place)
        _remove(out)
        os.replace(tmp, out)
    click.echo(f"exported {len(ids)} videos ({row} frames) to {out}")
    return out


class _ZarrWriter:
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


class _NpzWriter:
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


def _read_meta(path: Path) -> dict | None:
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
    {"zarr.json", "slots", "masks", "attention_masks", "tokens"}
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
        elif path == out and _read_meta(path) is None:
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


def _remove(path: Path) -> None:
    """Delete an earlier export or its ``.partial`` (:func:`check_replaceable` said it is ours)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@click.command(
    name="export-slots",
    epilog="\b\nExample:\n  egoslots export-slots egoslots-work/runs/slots --split test slots_test.zarr",
)
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--split",
    type=click.Choice(["train", "val", "test"]),
    default="test",
    show_default=True,
    help="Split to export.",
)
@click.option(
    "--checkpoint", default="last", show_default=True, help="Checkpoint name under RUN/checkpoints."
)
@click.option(
    "--max-videos",
    type=click.IntRange(min=1),
    default=None,
    help="Export only the first N videos of the split.",
)
@restarts_option
@click.option("--overwrite", is_flag=True, help="Replace OUT if it holds a different export.")
def export_slots_command(
    run: Path,
    out: Path,
    split: str,
    checkpoint: str,
    max_videos: int | None,
    restarts: int | None,
    overwrite: bool,
):
    """Write per-frame slots (T, K, D), masks (T, K, N) and tokens of every video of a split to OUT
    (zarr, or .npz when OUT ends with .npz), with the run's fingerprint in the attributes."""
    setup_logging()
    export_slots_run(
        run,
        split=split,
        out=out,
        checkpoint=checkpoint,
        max_videos=max_videos,
        overwrite=overwrite,
        restarts=restarts,
    )
