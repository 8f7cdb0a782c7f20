"""`egoslots export-slots RUN OUT`: per-frame slots, masks and tokens for downstream use.

The trained model runs over every whole video of a split (slots carried across windows, as in
``evaluate``) and the results are written as flat arrays over one frame axis plus a video
table, to a zarr v3 group (any OUT not ending in ``.npz``) or a single ``.npz`` file:

    slots            (F, K, D) float32  the slot vectors per frame (processor.state)
    masks            (F, K, N) float16  decoder masks (primary, as SlotContrast), N = h*w
    attention_masks  (F, K, N) float16  slot-attention masks
    labels           (F, N)    uint8    each token's slot, as visualize and infer draw it:
                                        with --track match the tracker's (a near-tie keeps the
                                        token's slot of the frame before), else the arg-max
    tokens           (F, h, w) uint16   the cached dVAE token ids (runs with a dVAE only)
    segments         (F, S, S) uint16   with --segments: each pixel's segment, as evaluate's
                                        "split into parts, colour-refined" row scores them:
                                        each slot's connected parts apart, tracked through the
                                        video, refined to the cached frames' pixels; an id is
                                        slot + K * part, so id % K is the slot
    video_ids (V,) str, video_first (V,) int64, video_length (V,) int64: rows of each video
    attrs / meta: run, split, store fingerprint, dVAE hash, checkpoint step, grid, K, D,
                  restarts (draws of a Gaussian (or k-means) initializer's first slots; the best kept),
                  track (match | off: how slots are named over time, below)

By default (``--track match``) slot k of frame t is the model's slot k carried from frame t-1,
except among slots the model cannot tell apart (their masks tie): those are renamed to keep
the regions they had in frame t-1, and a name follows a region that moves whole to another
slot (``tracking.SlotTracker``), so an index follows one region
through the video, as in visualize's and infer's pictures. The slot vectors and masks are the
model's own, only their order per frame changes. ``--track off``
writes the model's raw order, in which collapsed spare slots trade regions back and forth
(docs/real-video.md).

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
    slots = data["slots"][rows]            # (T, K, D); D + 4 if meta["slot_geometry"]
    masks = data["masks"][rows]            # (T, K, N); reshape N to meta["grid"]
    print(meta["store"], meta["tokens"], meta["checkpoint_step"])

The export is written next to OUT under a temporary name and renamed when complete, so an
interrupted export never leaves a half-written OUT; rerunning with the same run, checkpoint
and split returns at once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from egoslots.pipeline.components import segment_ids, split_components
from egoslots.pipeline.metrics import infer_grid
from egoslots.pipeline.refine import refine_masks
from egoslots.stages.machinery.common import StageError, setup_logging
from egoslots.stages.machinery.inference import (
    checkpoint_identity,
    infer_windows,
    load_trained,
    split_size,
    store_windows,
    window_length,
)
from egoslots.stages.machinery.run_options import (
    DEFAULT_TRACK,
    restarts_option,
    split_options,
    track_option,
)
from egoslots.stages.machinery.runtime import pick_device
from egoslots.stages.machinery.slot_files import (
    NpzWriter,
    ZarrWriter,
    check_output_location,
    check_replaceable,
    finish_export,
    partial_path,
    read_export_meta,
    remove_export,
)

log = logging.getLogger("egoslots")


def export_slots_run(
    run_dir: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    checkpoint: str = "last",
    max_videos: int | None = None,
    overwrite: bool = False,
    restarts: int | None = None,
    track: str = DEFAULT_TRACK,
    segments: bool = False,
) -> Path:
    """Export slots, masks and tokens of every video of ``split``; returns the output path.
    ``restarts``: draws of a Gaussian (or k-means) initializer's first slots (None: the run's config);
    ``track``: "match" renames tied slots to keep their regions, "off" keeps the
    model's order (``infer_windows``); ``segments``: also each pixel's segment (the parts split
    and the refinement need the whole video, so a video's rows are held until it is done)."""
    run_dir = Path(run_dir)
    out = Path(out).expanduser().absolute() if out is not None else run_dir / f"slots_{split}.zarr"
    if not out.name:
        raise StageError(f"OUT={out} is not a file or folder name: give e.g. slots.zarr")
    as_npz = out.suffix == ".npz"
    check_output_location(out)
    check_replaceable(out)
    ident = checkpoint_identity(run_dir, checkpoint)
    model, cfg, store, tokens_hash = load_trained(run_dir, checkpoint, restarts=restarts)
    meta = {
        "run": str(run_dir),
        "split": split,
        "store": store.fingerprint,
        "tokens": tokens_hash,
        "checkpoint": ident,
        "checkpoint_step": ident.get("step"),
        "grid": list(store.grid),
        "max_videos": max_videos,
        "restarts": int(model.config.restarts),
        "track": track,
        # Invariant Slot Attention: each slot row is its vector, then these four (grid units
        # in [-1, 1]: centre and spread of its mask)
        "slot_geometry": ["y", "x", "scale_y", "scale_x"] if model.config.invariant else None,
    }
    if segments:  # (absent otherwise, so exports written before the option still match)
        meta["segments"] = "slot + K * part: connected parts apart, refined to pixels"
    if out.exists() and not overwrite:
        previous = read_export_meta(out) or {}
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
    remove_export(tmp)
    writer = NpzWriter(out) if as_npz else ZarrWriter(tmp)
    row, ids, firsts, lengths = 0, [], [], []
    for video in tqdm(videos, desc=f"export {split}", unit="video"):
        first = row
        pending = []  # the token ids of each window, handed back next to the model's result

        def windows(video=video, pending=pending):  # streamed: long videos never sit in memory
            for feats, toks in store_windows(store, video, window, tokens_hash):
                pending.append(toks)
                yield feats, toks

        held = []  # with --segments: the video's rows, written once its segments are known
        torch.manual_seed(0)  # a Gaussian initializer's first slots: as evaluate's (infer_video)
        for result in infer_windows(model, windows(), track):
            toks = pending.pop(0)
            arrays = {"slots": result["slots"].numpy().astype(np.float32)}
            masks = result["masks"]
            if "model_decoder" in masks:
                arrays["masks"] = masks["model_decoder"].numpy().astype(np.float16)
            if "model_attention" in masks:
                arrays["attention_masks"] = masks["model_attention"].numpy().astype(np.float16)
                arrays.setdefault("masks", arrays["attention_masks"])
            labels = result["labels"].numpy()
            arrays["labels"] = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)
            if toks is not None:
                arrays["tokens"] = toks.numpy().astype(np.uint16)
            if segments:  # split and refined from the float32 masks, as evaluate does
                primary = masks.get("model_decoder", masks.get("model_attention"))
                held.append((arrays, primary.float()))
                continue
            writer.write(row, num_frames, arrays)
            row += len(arrays["slots"])
        if held:
            video_masks = torch.cat([m for _, m in held])
            pixels = video_segments(video_masks, store, video, model.config.num_slots)
            for arrays, _ in held:  # the video starts at row `first`
                arrays["segments"] = pixels[row - first : row - first + len(arrays["slots"])]
                writer.write(row, num_frames, arrays)
                row += len(arrays["slots"])
        ids.append(video.id)
        firsts.append(first)
        lengths.append(row - first)
    finish_export(writer, meta, ids, firsts, lengths)
    if not as_npz:  # (an npz file is written atomically in place)
        remove_export(out)
        os.replace(tmp, out)
    click.echo(f"exported {len(ids)} videos ({row} frames) to {out}")
    return out


def video_segments(masks: torch.Tensor, store, video, num_slots: int) -> np.ndarray:
    """(T, S, S) segment ids of one video from its primary masks (T, K, N): split into tracked
    connected parts (``pipeline/components.py``) and refined to the store's cached frames
    (``pipeline/refine.py``), as ``evaluate`` scores them. Like evaluate, it holds the video's
    refined masks, frames x segments x pixels float32 (16 frames of 128 px, 50 segments: 52 MB;
    hours of video at once would not fit: export those in shorter videos)."""
    n = masks.shape[-1]
    grid = tuple(store.grid) if n == store.grid[0] * store.grid[1] else tuple(infer_grid(n))
    frames = store.read_rows("frames", video.first, video.stop)  # (T, S, S, 3) uint8
    parts, slots = split_components(masks, grid, with_slots=True)
    fine = refine_masks(parts, frames, grid)  # (T, K', S * S)
    ids = segment_ids(fine, slots, num_slots).numpy()
    dtype = np.uint16 if ids.max(initial=0) < 2**16 else np.uint32
    return ids.reshape(len(frames), *frames.shape[1:3]).astype(dtype)


@click.command(
    name="export-slots",
    epilog="\b\nExample:\n  egoslots export-slots egoslots-work/runs/slots --split test slots_test.zarr",
)
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@split_options("export")
@restarts_option
@track_option
@click.option(
    "--segments",
    is_flag=True,
    help="Also write each pixel's segment (F, S, S): each slot's connected parts apart, refined "
    "to the cached frames, as evaluate's 'split into parts, colour-refined' row; id % K is the "
    "slot.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it holds a different export.")
def export_slots_command(
    run: Path,
    out: Path,
    split: str,
    checkpoint: str,
    max_videos: int | None,
    restarts: int | None,
    track: str,
    segments: bool,
    overwrite: bool,
):
    """Write per-frame slots (T, K, D), masks (T, K, N) and tokens of every video of a split to OUT
    (zarr, or .npz when OUT ends with .npz), with the run's fingerprint in the attributes. With
    Invariant Slot Attention (grouper.invariant) each slot also holds its position and scale."""
    setup_logging()
    export_slots_run(
        run,
        split=split,
        out=out,
        checkpoint=checkpoint,
        max_videos=max_videos,
        overwrite=overwrite,
        restarts=restarts,
        track=track,
        segments=segments,
    )
