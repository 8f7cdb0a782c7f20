"""`egoslots infer RUN VIDEO_OR_FOLDER`: a trained run on new video, without building a store.

New footage goes straight from the file to slots: frames are decoded by the project's own
sources (a video file, a folder of video files, or a folder of frames / of frame folders, as
``dataset.source: video | frames`` read them), preprocessed as extraction does, encoded by the
frozen encoder the run's store was extracted with (its recorded ``backbone`` settings, checked
against the store's encoder description), rounded to the store's feature dtype, and streamed in
windows through the same inference as ``export-slots`` (``infer_windows``: slots carried across
windows, the same seed per video). So on frames the store holds, ``infer`` gives export-slots'
slots. Nothing is cached: a long video never sits in memory as features.

Written to OUT (default ``RUN/infer/<input name>``):

    slots.npz | slots.zarr    export-slots' layout (slots, masks, attention_masks, labels,
                              video table, meta), so the same reader code works on both
    <video>.gif | .mp4        each frame beside its slot masks (colours fixed per slot)
    <video>.timeline.png      each slot's area per frame over the whole video (switches show)

Rerunning with the same run, input and settings returns at once; different settings need
``--overwrite`` (only an earlier infer/export output is ever replaced).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from egoslots.pipeline.data.base import SourceError
from egoslots.stages.machinery.common import (
    StageError,
    output_writes,
    setup_logging,
    user_errors,
)
from egoslots.stages.machinery.inference import (
    checkpoint_identity,
    infer_windows,
    load_trained,
    window_length,
)
from egoslots.stages.machinery.new_footage import encoded_windows, source_for, store_encoder
from egoslots.stages.machinery.pictures import OverlayVideo, masks_overlay, slot_areas, timeline
from egoslots.stages.machinery.run_options import DEFAULT_TRACK, restarts_option, track_option
from egoslots.stages.machinery.runtime import pick_device
from egoslots.stages.machinery.slot_files import (
    NpzWriter,
    ZarrWriter,
    check_replaceable,
    finish_export,
    partial_path,
    read_export_meta,
    remove_export,
)

log = logging.getLogger("egoslots")


def safe_name(video_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in video_id)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def infer_run(
    run_dir: str | Path,
    inputs: str | Path,
    out: str | Path | None = None,
    checkpoint: str = "last",
    restarts: int | None = None,
    track: str = DEFAULT_TRACK,
    batch_size: int = 32,
    fps: float | None = None,
    export_format: str = "npz",
    overlay: str = "gif",
    backbone_checkpoint: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Slots, masks and pictures of every video in ``inputs``; returns the output folder.

    ``fps``: sample video files at this rate (None: the rate the run's store was extracted at,
    ``dataset.fps``, else every frame). ``restarts`` and ``track`` as export-slots' (default
    "match": tied slots renamed to keep their regions, names following regions that move whole,
    ``tracking.SlotTracker``;
    "off": the model's raw order).
    """
    run_dir, inputs = Path(run_dir), Path(inputs).expanduser().absolute()
    if export_format not in ("npz", "zarr"):
        raise StageError(f"--format {export_format}: choose npz or zarr")
    if overlay not in ("gif", "mp4", "none"):
        raise StageError(f"--overlay {overlay}: choose gif, mp4 or none")
    out = Path(out) if out is not None else run_dir / "infer" / safe_name(inputs.name)
    export = out / f"slots.{export_format}"
    check_replaceable(export)
    ident = checkpoint_identity(run_dir, checkpoint)
    model, cfg, store, _ = load_trained(run_dir, checkpoint, restarts=restarts)
    if fps is None:
        recorded = (store.meta.get("config", {}).get("dataset") or {}).get("fps")
        fps = None if recorded is None else float(recorded)
    source = source_for(inputs, fps)
    videos = source.videos()
    if not videos:
        raise StageError(f"{inputs}: no videos found")
    meta = {
        "run": str(run_dir),
        "input": str(inputs),
        "videos_in": [v.video_id for v in videos],
        "store": store.fingerprint,  # the encoder and preprocessing of the features
        "tokens": None,
        "checkpoint": ident,
        "checkpoint_step": ident.get("step"),
        "grid": list(store.grid),
        "fps": fps,
        "restarts": int(model.config.restarts),
        "track": track,
        "overlay": overlay,
    }
    if export.exists() and not overwrite:
        previous = read_export_meta(export) or {}
        if {k: previous.get(k) for k in meta} == meta:
            click.echo(f"already inferred: {export}")
            return out
        raise StageError(
            f"{export} exists and holds other results; pass --overwrite or another --out"
        )

    device = pick_device()
    model = model.to(device).eval()
    encoder, compute = store_encoder(store, backbone_checkpoint, device)
    window = window_length(cfg)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(v.num_frames for v in videos)
    tmp = partial_path(export)
    remove_export(tmp)
    writer = NpzWriter(export) if export_format == "npz" else ZarrWriter(tmp)
    row, ids, firsts, lengths = 0, [], [], []
    bar = tqdm(total=total, unit="frame", desc="infer", dynamic_ncols=True)
    job = _Job(model, source, encoder, compute, store, window, batch_size, track)
    job.out, job.overlay, job.bar = out, overlay, bar
    try:
        for video in videos:
            ids.append(video.video_id)
            firsts.append(row)
            row = _infer_one(job, video, writer, row, total)
            lengths.append(row - firsts[-1])
    except SourceError as err:
        raise StageError(str(err)) from err
    finally:
        bar.close()
    finish_export(writer, meta, ids, firsts, lengths)
    if export_format == "zarr":
        remove_export(export)
        os.replace(tmp, export)
    click.echo(f"inferred {len(ids)} video(s), {row} frames: {out}")
    return out


@dataclass
class _Job:
    """What every video of one ``infer`` shares."""

    model: torch.nn.Module
    source: object
    encoder: torch.nn.Module
    compute: str  # fp32 | bf16, as the store was extracted
    store: object
    window: int
    batch_size: int
    track: str
    out: Path = Path(".")
    overlay: str = "gif"
    bar: object = None


def _infer_one(job: _Job, video, writer, row: int, total: int) -> int:
    """One video: windows through the model, rows to ``writer`` from ``row`` on, pictures to
    ``job.out``; returns the next free row."""
    store = job.store
    pending: list[np.ndarray] = []  # each window's frames, handed back beside its result

    def windows():
        for feats, frames in encoded_windows(
            job.source,
            video.video_id,
            job.encoder,
            job.compute,
            store.meta["feature_dtype"],
            store.frame_size,
            job.window,
            job.batch_size,
            job.bar,
        ):
            pending.append(frames)
            yield feats, None

    name = safe_name(video.video_id)
    movie = None
    if job.overlay != "none":
        movie = OverlayVideo(job.out / f"{name}.{job.overlay}", video.fps or 6.0)
    areas, starts, first = [], [], row
    torch.manual_seed(0)  # a Gaussian initializer's first slots: as export-slots' and evaluate's
    for result in infer_windows(job.model, windows(), job.track):
        frames = pending.pop(0)
        masks = result["masks"]
        arrays = {"slots": result["slots"].numpy().astype(np.float32)}
        if "model_decoder" in masks:
            arrays["masks"] = masks["model_decoder"].numpy().astype(np.float16)
        if "model_attention" in masks:
            arrays["attention_masks"] = masks["model_attention"].numpy().astype(np.float16)
            arrays.setdefault("masks", arrays["attention_masks"])
        labels = result["labels"].numpy()
        arrays["labels"] = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)
        writer.write(row, total, arrays)
        starts.append(row - first)
        row += len(arrays["slots"])
        shown = masks.get("model_decoder", masks.get("model_attention"))
        areas.append(slot_areas(shown, result["labels"]))
        if movie is not None:
            grid = tuple(store.grid) if shown.shape[-1] == store.grid[0] * store.grid[1] else None
            ties = job.track == "match"
            picture = masks_overlay(frames, shown, grid, ties=ties, labels=result["labels"])
            movie.add(np.concatenate([frames, picture], axis=2))
    if movie is not None:
        movie.close()
    picture = timeline(np.concatenate(areas), ticks=starts, title=video.video_id)
    import imageio.v2 as imageio

    imageio.imwrite(job.out / f"{name}.timeline.png", picture)
    return row


@click.command(
    name="infer",
    epilog="\b\nExamples:\n  egoslots infer egoslots-work/runs/slots walk.mp4\n"
    "  egoslots infer egoslots-work/runs/slots /data/new_frames --format zarr --overlay mp4",
)
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.argument("video_or_folder", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder (default: RUN/infer/<input name>).",
)
@click.option(
    "--checkpoint", default="last", show_default=True, help="Checkpoint name under RUN/checkpoints."
)
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["npz", "zarr"]),
    default="npz",
    show_default=True,
    help="Slots and masks as one .npz file or a zarr folder (export-slots' layout).",
)
@click.option(
    "--overlay",
    type=click.Choice(["gif", "mp4", "none"]),
    default="gif",
    show_default=True,
    help="Each frame beside its slot masks, per video (mp4 suits long videos).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Frames per encoder batch.",
)
@click.option(
    "--fps",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Sample video files at this rate (default: the rate the run's store used).",
)
@click.option(
    "--backbone-checkpoint",
    default=None,
    help="Encoder weights, if they moved since the run's store was extracted.",
)
@restarts_option
@track_option
@click.option("--overwrite", is_flag=True, help="Replace earlier results in the output folder.")
def infer(run: Path, video_or_folder: Path, **options):
    """Run a trained train-slots RUN on new video (a file, a folder of videos or of frames)
    without building a store: slots and masks (export-slots' layout), an overlay video and a
    slot timeline per video."""
    setup_logging()
    out = options.get("out") or run / "infer"
    try:
        with output_writes(Path(out), kept="Finished outputs are kept", resume="then rerun"):
            infer_run(run, video_or_folder, **options)
    except user_errors() as err:  # unreadable video, missing encoder weights, bad store: one line
        raise StageError(str(err)) from err
