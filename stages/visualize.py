"""`egoslots visualize RUN --video ID`: slot masks over a video, as a GIF and a PNG strip.

Each frame shows, side by side: the cached frame, the frame with the slot masks overlaid
(decoder masks, argmax, each slot in its own colour; colours are fixed by slot index, so a
slot keeps its colour over time and a colour change means the object changed slot), the same
masks refined to pixels with the video's colours (``evaluate.refine``, ``pipeline/refine.py``),
drawn in solid slot colours, the refined masks with each slot's connected parts apart
(``evaluate.split_parts``, ``pipeline/components.py``: a slot's first part keeps its colour,
parts split off get the colours after the last slot's), and, for runs with a dVAE, the dVAE's reconstruction of the cached tokens. The GIF has one image
per frame; the PNG strip stacks the same panels as rows with up to ``max_columns`` frames.
Default video: the first test video. Outputs go to ``RUN/viz/<video>.gif|.png``, and beside
them ``<video>.timeline.png``: each slot's area per frame over the whole video in the overlay's
colours, with the inference windows' starts marked (``pictures.timeline``), so an object that
changes slot shows as one slot's lane falling while another's rises. By default
(``--track match``) slots the model cannot tell apart are renamed to keep their regions
(``tracking.SlotTracker``) and pixels two slots share almost equally take the lower slot's
colour (``label_free.tied_argmax``), as export-slots and infer name them; ``--track off`` draws
the model's raw order with a plain arg-max.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
import numpy as np
import torch

from egoslots.cache.location import write_bytes
from egoslots.cache.reader import ClipDataset
from egoslots.pipeline.components import split_components
from egoslots.pipeline.dvae import load_dvae
from egoslots.pipeline.metrics import infer_grid
from egoslots.pipeline.refine import refine_masks
from egoslots.stages.machinery.common import StageError, setup_logging
from egoslots.stages.machinery.inference import (
    infer_video,
    load_trained,
    window_length,
)
from egoslots.stages.machinery.pictures import masks_overlay, slot_areas, timeline
from egoslots.stages.machinery.run_options import DEFAULT_TRACK, restarts_option, track_option
from egoslots.stages.machinery.run_paths import path_from_run_file
from egoslots.stages.machinery.rundirs import read_json
from egoslots.stages.machinery.runtime import pick_device

log = logging.getLogger("egoslots")


def dvae_reconstructions(
    run_dir: Path, tokens_hash: str | None, tokens: torch.Tensor | None, size: int
) -> tuple[np.ndarray | None, str]:
    """Decode cached token ids (T, h, w) with the run's dVAE -> (T, S, S, 3) uint8, or None and why."""
    if tokens_hash is None or tokens is None:
        return None, "the run uses no dVAE"
    dvae_dir = find_dvae_run(run_dir, tokens_hash)
    if dvae_dir is None:
        return None, f"no dVAE run directory with hash {tokens_hash} found"
    try:
        model = load_dvae(dvae_dir).eval()
        device = next(model.parameters()).device
        pictures = []
        with torch.no_grad():
            for part in tokens.long().split(16):  # a few frames at a time: long videos fit
                images = model.decode_ids(part.to(device)).float()  # (t, 3, S', S'), unclamped
                if images.shape[-1] != size:
                    images = torch.nn.functional.interpolate(
                        images, size=(size, size), mode="bilinear", align_corners=False
                    )
                pictures.append(
                    (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
                )
        return np.concatenate(pictures), ""
    except Exception as err:  # noqa: BLE001 - a picture is not worth failing the pipeline for
        log.warning("dVAE reconstructions skipped: %s", err)
        return None, f"dVAE decoding failed: {err}"


def find_dvae_run(run_dir: Path, tokens_hash: str) -> Path | None:
    """The dVAE run directory whose dvae.json hash is ``tokens_hash``: the one the run's
    inputs.json names (``dvae_run``)."""
    inputs = read_json(run_dir / "inputs.json") or {}
    dvae_run = path_from_run_file(run_dir, inputs.get("dvae_run"))
    meta = Path(dvae_run) / "dvae.json" if dvae_run else None
    try:
        if meta and meta.is_file() and json.loads(meta.read_text()).get("hash") == tokens_hash:
            return meta.parent
    except (OSError, json.JSONDecodeError):
        pass
    return None


def visualize_run(
    run_dir: str | Path,
    video_id: str | None = None,
    out: str | Path | None = None,
    checkpoint: str = "last",
    max_columns: int = 16,
    fps: float = 6.0,
    restarts: int | None = None,
    track: str = DEFAULT_TRACK,
) -> Path:
    """Render slot masks over one video; returns the PNG strip's path (the GIF and the slot
    timeline are beside it). ``restarts``: draws of a Gaussian (or k-means) initializer's first slots (None:
    the run's config); ``track``: "match" renames tied slots (``infer_windows``)."""
    run_dir = Path(run_dir)
    model, cfg, store, tokens_hash = load_trained(run_dir, checkpoint, restarts=restarts)
    if video_id is None:
        rows = store.videos_in("test", hflip=False) or store.videos_in(None, hflip=False)
        video_id = rows[0].id
    elif video_id not in {v.id for v in store.videos}:
        raise StageError(f"no video '{video_id}' in store {store.path}")
    fields = ("features", "frames") + (("tokens",) if tokens_hash else ())
    data = ClipDataset(
        store,
        split=None,
        clip_length=None,
        fields=fields,
        tokens=tokens_hash,
        include_flipped=False,
        video_ids=[video_id],
    )
    item = data[0]
    model = model.to(pick_device()).eval()
    window = window_length(cfg)
    result = infer_video(model, item["features"], item.get("tokens"), window, track=track)
    masks = result["masks"].get("model_decoder", result["masks"].get("model_attention"))
    frames = item["frames"].numpy()  # (T, S, S, 3)
    size = frames.shape[1]
    grid = tuple(store.grid) if masks.shape[-1] == store.grid[0] * store.grid[1] else None
    ties = track == "match"  # near-ties keep the token's slot, as the tracker labels them
    labels = result["labels"]  # (T, N): each token's slot, the tracker's with --track match
    panels = [frames, masks_overlay(frames, masks, grid, ties=ties, labels=labels)]
    token_grid = grid or tuple(infer_grid(masks.shape[-1]))
    if cfg.evaluate.get("refine", True):
        fine = refine_masks(masks.detach().float().cpu(), frames, token_grid)
        panels.append(masks_overlay(frames, fine, (size, size), alpha=1.0, ties=ties))
    if cfg.evaluate.get("split_parts", True):  # each slot's connected parts apart, refined
        parts = split_components(masks.detach().float().cpu(), token_grid)
        if cfg.evaluate.get("refine", True):
            parts, part_grid = refine_masks(parts, frames, token_grid), (size, size)
        else:
            part_grid = token_grid
        panels.append(masks_overlay(frames, parts, part_grid, alpha=1.0, ties=ties))
    recon, why = dvae_reconstructions(run_dir, tokens_hash, item.get("tokens"), size)
    if recon is not None:
        panels.append(recon)
    elif tokens_hash is not None:
        log.warning("no dVAE reconstructions in the picture: %s", why)

    out_dir = Path(out) if out is not None else run_dir / "viz"
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in video_id)
    gif_path, png_path = out_dir / f"{safe}.gif", out_dir / f"{safe}.png"
    write_gif(gif_path, np.concatenate(panels, axis=2), fps)
    write_strip(png_path, panels, max_columns)
    timeline_path = out_dir / f"{safe}.timeline.png"
    ticks = list(range(0, len(frames), window))  # where carried slots meet a new window
    areas = slot_areas(masks, labels)
    write_timeline(timeline_path, timeline(areas, ticks=ticks, title=video_id))
    click.echo(f"GIF: {gif_path}\nPNG: {png_path}\ntimeline: {timeline_path}")
    return png_path


def write_timeline(path: Path, picture: np.ndarray) -> None:
    """The slot timeline (H, W, 3) uint8 as a PNG."""
    import imageio.v2 as imageio

    imageio.imwrite(path, picture)


def write_gif(path: Path, images: np.ndarray, fps: float) -> None:
    """(T, H, W, 3) uint8 -> looping GIF, one image per frame."""
    import imageio.v2 as imageio

    gif = imageio.mimwrite("<bytes>", list(images), format="GIF", duration=1000.0 / fps, loop=0)
    write_bytes(path, gif)  # encoded first: a failed write leaves no half-flushed encoder


def write_strip(path: Path, panels: list[np.ndarray], max_columns: int, gap: int = 2) -> None:
    """One row per panel kind, one column per frame (evenly spaced when there are too many)."""
    import imageio.v2 as imageio

    t = panels[0].shape[0]
    columns = np.unique(np.linspace(0, t - 1, min(t, max_columns)).round().astype(int))
    h, w = panels[0].shape[1:3]
    canvas = np.full(
        (len(panels) * (h + gap) - gap, len(columns) * (w + gap) - gap, 3), 255, dtype=np.uint8
    )
    for r, panel in enumerate(panels):
        for c, t_index in enumerate(columns):
            canvas[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = panel[
                t_index
            ]
    write_bytes(path, imageio.imwrite("<bytes>", canvas, format="PNG"))


@click.command(
    name="visualize",
    epilog="\b\nExample:\n  egoslots visualize egoslots-work/runs/slots --video video_0003",
)
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--video", "video_id", default=None, help="Video id (default: the first test video).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder (default: RUN/viz).",
)
@click.option(
    "--checkpoint", default="last", show_default=True, help="Checkpoint name under RUN/checkpoints."
)
@restarts_option
@track_option
def visualize(
    run: Path,
    video_id: str | None,
    out: Path | None,
    checkpoint: str,
    restarts: int | None,
    track: str,
):
    """Render a video's slot masks (colours fixed per slot) as a GIF and a PNG strip, with dVAE
    reconstructions of the cached tokens when the run uses a dVAE, and each slot's area per
    frame as a timeline picture."""
    setup_logging()
    visualize_run(
        run, video_id=video_id, out=out, checkpoint=checkpoint, restarts=restarts, track=track
    )
