"""`egoslots evaluate RUN`: object-discovery metrics of a trained run, with baselines.

The trained model runs over every whole video of the split (never only training-length clips):
the video is cut into windows of the training clip length and the slots are carried from one
window to the next (``stages/machinery/inference.py``), so slot identities persist over the whole video
as they would online. The masks are scored against the store's ground truth with
``egoslots.pipeline.metrics``:

- ``model_decoder``: the feature decoder's alpha masks. **Primary** (SlotContrast reports these).
- ``model_attention``: slot-attention masks of the corrector.
- ``model_steve``: the STEVE decoder's masks on the token grid (runs with a dVAE only).
- baselines on the same videos: ``kmeans_frame``, ``kmeans_video`` (K = number of slots, on
  the cached features), ``colour_kmeans_video`` (K = number of slots, on the pixel colours of
  the cached frames, per video: the bar a slot model must clear to show it found more than
  colour, see docs/discovery.md) and ``grid`` (a fixed K-cell partition).
- ``*_refined`` (``evaluate.refine``, on by default): the same masks taken from the token grid to
  pixels with the video's colours (``pipeline/refine.py``), for the model's masks and for
  k-means per video, so the table shows what refinement alone buys. The raw rows stay.
- ``*_parts`` and ``*_parts_refined`` (``evaluate.split_parts``, on by default): the same masks with
  every connected part of a slot made a segment of its own and tracked over the video
  (``pipeline/components.py``), raw and refined; colour k-means gets the same split
  (``colour_kmeans_video_parts``), so splitting is never credited to the slots alone.

The model's masks are scored as the product outputs them: by default (``--track match``) with
slots the model cannot tell apart renamed to keep their regions (``tracking.SlotTracker``), as visualize,
export-slots and infer give them; ``--track off`` scores the raw model order. Per-frame metrics
do not depend on slot names; video metrics and the identity numbers do (docs/real-video.md).

Label-free numbers (``pipeline/label_free.py``, docs/label-free.md) for every store, with or
without masks: slot identity stability over time, slot usage, the feature reconstruction error
and, where the store holds flipped rows (``augment.hflip: cache``), agreement under a horizontal
flip; for the model's masks, k-means per frame and per video and the grid. On a store without
ground-truth masks they are all that is scored.

Writes ``<run>/metrics.json`` (means, stds, counts, per-video values, the ``label_free`` section,
property probe) and ``<run>/metrics.md`` (the tables, every method shown, best per column in
bold) and prints them. It returns at once when metrics.json exists for the same checkpoint,
split and store. Videos are streamed: one whole video in memory at a time.

One job, scoring a run and reporting the scores (the windowed inference is
``stages/machinery/inference.py``, the metrics and probe ``pipeline/``); the table is most of its length.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from egoslots.cache.location import write_text
from egoslots.pipeline import baselines, metrics
from egoslots.pipeline import label_free as lf
from egoslots.pipeline import probe as probe_lib
from egoslots.pipeline.components import split_components
from egoslots.pipeline.data import make_source
from egoslots.pipeline.refine import refine_masks
from egoslots.pipeline.slots import GEOMETRY_DIMS
from egoslots.stages.machinery.common import StageError, setup_logging
from egoslots.stages.machinery.inference import (
    available_split,
    checkpoint_identity,
    infer_video,
    iter_videos,
    load_trained,
    model_device,
    split_size,
    window_length,
)
from egoslots.stages.machinery.run_options import (
    DEFAULT_TRACK,
    TRACK_MODES,
    restarts_option,
    split_options,
    track_option,
)
from egoslots.stages.machinery.runtime import configure_threads, pick_device

log = logging.getLogger("egoslots")

PRIMARY = "model_decoder"
METHOD_LABELS = {
    "model_decoder": "slots: decoder masks (primary)",
    "model_attention": "slots: attention masks",
    "model_steve": "slots: STEVE decoder masks",
    "model_decoder_refined": "slots: decoder masks, colour-refined",
    "model_attention_refined": "slots: attention masks, colour-refined",
    "model_steve_refined": "slots: STEVE decoder masks, colour-refined",
    "kmeans_frame": "k-means per frame",
    "kmeans_video": "k-means per video",
    "kmeans_video_refined": "k-means per video, colour-refined",
    "model_decoder_parts": "slots: decoder masks, split into parts",
    "model_attention_parts": "slots: attention masks, split into parts",
    "model_steve_parts": "slots: STEVE decoder masks, split into parts",
    "model_decoder_parts_refined": "slots: decoder masks, split into parts, colour-refined",
    "model_attention_parts_refined": "slots: attention masks, split into parts, colour-refined",
    "model_steve_parts_refined": "slots: STEVE decoder masks, split into parts, colour-refined",
    "kmeans_video_parts": "k-means per video, split into parts",
    "kmeans_video_parts_refined": "k-means per video, split into parts, colour-refined",
    "colour_kmeans_video": "colour k-means per video (pixels)",
    "colour_kmeans_video_parts": "colour k-means per video (pixels), split into parts",
    "grid": "fixed grid",
}
METRIC_LABELS = {
    "video_fg_ari": "video FG-ARI",
    "video_mbo": "video mBO",
    "video_miou": "video mIoU (Hungarian)",
    "frame_fg_ari": "frame FG-ARI",
    "frame_mbo": "frame mBO",
    "video_ari": "video ARI (with bg)",
    "frame_ari": "frame ARI (with bg)",
}
LABEL_FREE_VERSION = 2  # in metrics.json's key: older files (before --track) are redone
LABEL_FREE_METHODS = (  # in table order; the model's rows come first, those it outputs
    "model_decoder",
    "model_attention",
    "model_steve",
    "kmeans_frame",
    "kmeans_video",
    "grid",
)
LABEL_FREE_LABELS = {
    "token_stability": "token stability",
    "identity_best": "identity best",
    "run_length": "run length (frames)",
    "active_slots": "active slots",
    "mask_entropy": "mask entropy (/log K)",
    "feature_rec_rel": "feature rec. error (rel.)",
    "flip_agreement": "flip agreement (ARI)",
}
HIGHER_IS_BETTER = {"token_stability", "identity_best", "run_length", "flip_agreement"}
LOWER_IS_BETTER = {"feature_rec_rel"}


# ---------------------------------------------------------------------------------- evaluation
def baseline_masks(
    features: torch.Tensor, num_slots: int, grid: tuple[int, int], seed: int = 0
) -> dict[str, torch.Tensor]:
    """The feature baselines' masks (T, K, N) of one video, computed once for both the masked
    metrics and the label-free numbers: k-means per frame and per video, the fixed grid."""
    return {
        "kmeans_frame": baselines.kmeans_masks(features, num_slots, "frame", seed=seed),
        "kmeans_video": baselines.kmeans_masks(features, num_slots, "video", seed=seed),
        "grid": baselines.grid_masks(features.shape[0], num_slots, grid),
    }


def score_video(
    item: dict,
    result: dict,
    num_slots: int,
    grid: tuple[int, int],
    seed: int = 0,
    with_baselines: bool = True,
    refine: bool = False,
    baseline: dict[str, torch.Tensor] | None = None,
    parts: bool = False,
) -> dict[str, dict]:
    """{method: video_metrics} of the model's masks and the baselines on one video.

    ``refine``: also score every token-grid mask refined to pixels with the video's colours
    (needs ``item["frames"]``), under ``<method>_refined``. ``baseline``: the feature baselines'
    masks when already computed (:func:`baseline_masks`). ``parts``: also score the masks with
    each slot's connected parts as segments of their own (``pipeline/components.py``), under
    ``<method>_parts`` (and ``<method>_parts_refined`` with ``refine``); colour k-means too."""
    true = item["masks"].long()  # (T, H, W)
    frames = item.get("frames") if refine else None  # (T, H, W, 3) uint8
    scores = {}

    # Attention mixing makes the decoder's masks the attention masks: score and refine them once.
    scored: list[tuple[str, torch.Tensor]] = []  # (name, masks) already scored

    def score(name: str, masks: torch.Tensor, mask_grid: tuple[int, int] | None) -> None:
        for other, other_masks in scored:
            if torch.equal(other_masks, masks):  # False for different shapes too
                for suffix in ("", "_refined", "_parts", "_parts_refined"):
                    if f"{other}{suffix}" in scores:
                        scores[f"{name}{suffix}"] = scores[f"{other}{suffix}"]
                return
        scored.append((name, masks))
        token_grid = metrics.infer_grid(masks.shape[-1], mask_grid)
        variants = {name: masks}
        if parts:
            variants[f"{name}_parts"] = split_components(masks, token_grid)
        for variant, variant_masks in variants.items():
            scores[variant] = metrics.evaluate_masks(variant_masks, true, token_grid)
            if frames is not None:
                fine = refine_masks(variant_masks, frames, token_grid)
                scores[f"{variant}_refined"] = metrics.evaluate_masks(
                    fine, true, tuple(frames.shape[1:3])
                )

    for name, masks in result["masks"].items():
        score(name, masks, grid if masks.shape[-1] == grid[0] * grid[1] else None)
    if with_baselines:
        if baseline is None:
            baseline = baseline_masks(item["features"], num_slots, grid, seed)
        scores["kmeans_frame"] = metrics.evaluate_masks(baseline["kmeans_frame"], true, grid)
        score("kmeans_video", baseline["kmeans_video"], grid)
        if "frames" in item:  # (T, S, S, 3) uint8, the label maps' resolution
            colour = baselines.colour_kmeans_masks(item["frames"], num_slots, seed=seed)
            scores["colour_kmeans_video"] = metrics.evaluate_masks(colour, true)
            if parts:  # parts smaller than one token are speckle, not objects
                pixels = tuple(item["frames"].shape[1:3])
                token_area = (pixels[0] // grid[0]) * (pixels[1] // grid[1])
                colour_parts = split_components(colour, pixels, min_size=max(1, token_area))
                scores["colour_kmeans_video_parts"] = metrics.evaluate_masks(colour_parts, true)
        scores["grid"] = metrics.evaluate_masks(baseline["grid"], true, grid)
    return scores


@torch.no_grad()
def model_reconstruction(model, result: dict, window: int) -> torch.Tensor:
    """The feature decoder's reconstruction (T, N, D) of one video from its slots (T, K, D; with
    Invariant Slot Attention, (T, K, D + 4): each vector and its geometry), a window at a time (the decoder reads each frame's slots alone, so windows change nothing)."""
    device = model_device(model)
    slots, geometry = result["slots"], None
    if getattr(model.decoder, "relative", False):  # Invariant Slot Attention: vector, geometry
        slots, geometry = (
            slots[..., :-GEOMETRY_DIMS],
            slots[..., -GEOMETRY_DIMS:],
        )
    attention = result["masks"].get("model_attention")
    mixing_attention = getattr(model.decoder, "mixing", "alpha") == "attention"
    parts = []
    for s in range(0, slots.shape[0], window):
        att = attention[s : s + window][None].to(device) if mixing_attention else None
        geo = None if geometry is None else geometry[s : s + window][None].to(device)
        recon, _ = model.decoder(slots[s : s + window][None].to(device), att, geo)
        parts.append(recon[0].float().cpu())
    return torch.cat(parts)


def label_free_video(
    item: dict,
    result: dict,
    baseline: dict[str, torch.Tensor],
    grid: tuple[int, int],
    reconstruction: torch.Tensor | None = None,
    flipped: dict[str, torch.Tensor] | None = None,
    track: str = DEFAULT_TRACK,
) -> dict[str, dict[str, float]]:
    """{method: label-free numbers} of one video (``pipeline/label_free.py``).

    ``result``: the model's masks; ``baseline``: :func:`baseline_masks`; ``reconstruction``: the
    model's decoded features (T, N, D), scored on the ``model_decoder`` row; ``flipped``:
    {method: masks (T, K, N)} of the same methods on the horizontally flipped frames.
    ``track``: how ``result`` was inferred; "match" labels tokens as its pictures and exports
    do (``label_free.sticky_labels``: a near-tie keeps the token's slot of the frame before; the
    one-hot baselines are unchanged by it), "off" by the plain arg-max."""

    def labels(m: torch.Tensor) -> torch.Tensor:
        return lf.sticky_labels(m) if track == "match" else lf.labels_of(m)

    feats = item["features"]
    flipped = flipped or {}
    masks = {**result["masks"], **baseline}
    out = {}
    for method in LABEL_FREE_METHODS:
        if method not in masks:
            continue
        m = masks[method]
        on_features = m.shape[-1] == feats.shape[1]
        rec = {}
        if method == "model_decoder" and reconstruction is not None:
            rec = {"features": feats, "reconstruction": reconstruction}
        elif method in baseline and on_features:
            rec = {"features": feats}  # a partition: each token's cluster mean
        flip = {}
        if method in flipped:
            token_grid = tuple(item["tokens"].shape[-2:]) if "tokens" in item else None
            mask_grid = grid if on_features else token_grid or metrics.infer_grid(m.shape[-1])
            flip = {
                "flipped_masks": flipped[method],
                "flipped_labels": labels(flipped[method]),
                "grid": mask_grid,
            }
        out[method] = lf.video_numbers(m, **rec, **flip, labels=labels(m))
    return out


def flipped_masks(
    model,
    store,
    record,
    tokens_hash: str | None,
    window: int,
    num_slots: int,
    seed: int,
    track: str = DEFAULT_TRACK,
) -> dict[str, torch.Tensor]:
    """{method: masks (T, K, N)} of the model and k-means on a video's flipped rows, masks left
    at the flipped positions (:func:`egoslots.pipeline.label_free.flip_agreement` mirrors back)."""
    feats = torch.from_numpy(store.read_features(record.first, record.stop))
    tokens = None
    if tokens_hash:
        ids = store.tokens(tokens_hash)[record.first : record.stop]
        tokens = torch.from_numpy(np.asarray(ids).astype(np.int64))
    out = dict(infer_video(model, feats, tokens, window, track=track)["masks"])
    out["kmeans_frame"] = baselines.kmeans_masks(feats, num_slots, "frame", seed=seed)
    out["kmeans_video"] = baselines.kmeans_masks(feats, num_slots, "video", seed=seed)
    return out


def evaluate_model(
    model,
    cfg,
    store,
    tokens_hash: str | None,
    split: str = "test",
    max_videos: int | None = None,
    keep: Callable[[dict, dict], None] | None = None,
    seed: int = 0,
    refine: bool = False,
    label_free: bool = True,
    track: str = DEFAULT_TRACK,
    parts: bool = False,
) -> dict:
    """Per-video scores of a model and the baselines on a split, one video in memory at a time:
    {"video_ids", "per_video", "label_free"} (``label_free``: {method: {number: [per video]}}).

    Without ground-truth masks in the store, ``per_video`` is empty and only the label-free
    numbers are computed. ``keep(item, result)`` is called for every video (the property probe
    collects slots with it). ``refine``: add the colour-refined rows, ``parts``: the rows with
    each slot's connected parts as segments (``score_video``).
    ``label_free``: compute the label-free numbers (``label_free_video``). The model's first
    slots are the best of ``model.config.restarts`` draws (``load_trained(restarts=)``)).
    ``track``: the model's masks as the product outputs them by default ("match": slots the model
    cannot tell apart renamed to keep their regions, ``tracking.SlotTracker``) or raw ("off"). Every
    score sees the same masks: the per-frame metrics, mask entropy and reconstruction error do
    not depend on it; the video metrics, the identity numbers and, through the tracker's tie
    rule, active slots do (docs/real-video.md).
    """
    if track not in TRACK_MODES:
        raise StageError(f"track={track!r}: choose one of {', '.join(TRACK_MODES)}")
    if not store.has_masks and not label_free:
        raise StageError(
            f"store {store.path} has no ground-truth masks: nothing to evaluate "
            "against (export-slots and visualize still work)"
        )
    window = window_length(cfg)
    num_slots = int(cfg.model.num_slots)
    grid = tuple(store.grid)
    per_video: dict[str, dict[str, list]] = {}
    free: dict[str, dict[str, list]] = {}
    ids = []
    total = split_size(store, split, max_videos)
    if total == 0:
        raise StageError(f"store {store.path} has no videos in split '{split}'")
    flips = {v.id: v for v in store.videos_in(split, hflip=True)} if label_free else {}
    fields = ("features",) + (("masks", "frames") if store.has_masks else ())
    for item in tqdm(
        iter_videos(store, split, tokens_hash, max_videos, fields=fields),
        total=total,
        desc=f"evaluate {split}",
        unit="video",
    ):
        result = infer_video(model, item["features"], item.get("tokens"), window, track=track)
        baseline = baseline_masks(item["features"], num_slots, grid, seed)
        ids.append(item["video_id"])
        if store.has_masks:
            scores = score_video(
                item,
                result,
                num_slots,
                grid,
                seed=seed,
                refine=refine,
                baseline=baseline,
                parts=parts,
            )
            for method, values in scores.items():
                for key, value in values.items():
                    per_video.setdefault(method, {}).setdefault(key, []).append(value)
        if label_free:
            flipped = None
            if item["video_id"] in flips:
                flipped = flipped_masks(
                    model,
                    store,
                    flips[item["video_id"]],
                    tokens_hash,
                    window,
                    num_slots,
                    seed,
                    track,
                )
            recon = model_reconstruction(model, result, window)
            numbers = label_free_video(item, result, baseline, grid, recon, flipped, track)
            for method, values in numbers.items():
                for key in lf.NUMBERS:  # every video has every key: lists stay aligned with ids
                    free.setdefault(method, {}).setdefault(key, []).append(
                        values.get(key, float("nan"))
                    )
        if keep is not None:
            keep(item, result)
    return {"video_ids": ids, "per_video": per_video, "label_free": free}


def summarize_scores(per_video: dict) -> dict:
    """{method: {metric: {mean, std, n}}}: video metrics over videos, frame metrics over all
    frames (``egoslots.pipeline.metrics.summarize_videos``); NaN values (e.g. no objects) left out."""
    return {method: metrics.summarize_videos(values) for method, values in per_video.items()}


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    checkpoint: str = "last",
    max_videos: int | None = None,
    probe: bool | None = None,
    overwrite: bool = False,
    restarts: int | None = None,
    track: str = DEFAULT_TRACK,
) -> dict:
    """Evaluate a trained run on a split; write metrics.json and metrics.md; return the metrics dict.

    ``restarts``: draws of a Gaussian (or k-means) initializer's first slots per video, the best kept
    (None: the run's ``inference.restarts``). ``track``: score the masks with slots renamed
    to keep their regions ("match", what visualize, export-slots and infer output by default)
    or the model's raw order ("off"); see :func:`evaluate_model`."""
    if track not in TRACK_MODES:
        raise StageError(f"track={track!r}: choose one of {', '.join(TRACK_MODES)}")
    run_dir = Path(run_dir)
    out_json = run_dir / "metrics.json"
    ident = checkpoint_identity(run_dir, checkpoint)
    model, cfg, store, tokens_hash = load_trained(run_dir, checkpoint, restarts=restarts)
    if max_videos is None:
        max_videos = cfg.evaluate.max_videos
    if probe is None:
        probe = bool(cfg.evaluate.probe)
    refine = bool(cfg.evaluate.get("refine", True))
    split_parts = bool(cfg.evaluate.get("split_parts", True))
    key = {
        "split": split,
        "checkpoint": ident,
        "store": store.fingerprint,
        "tokens": tokens_hash,
        "max_videos": max_videos,
        "probe": probe,
        "refine": refine,
        "split_parts": split_parts,
        "restarts": int(model.config.restarts),
        "track": track,
        "label_free": LABEL_FREE_VERSION,
    }
    if out_json.exists() and not overwrite:
        try:
            previous = json.loads(out_json.read_text())
            if previous.get("key") == key:
                log.info("metrics for this checkpoint and split already in %s", out_json)
                return previous
        except (OSError, json.JSONDecodeError):
            pass  # unreadable: recompute
    requested, split = split, available_split(store, split)
    if split != requested:
        log.warning(
            "store %s has no '%s' videos; evaluating the '%s' split instead",
            store.path,
            requested,
            split,
        )
    configure_threads(cfg.num_threads)
    device = pick_device()
    model = model.to(device).eval()
    seed = int(cfg.seed)
    started = time.perf_counter()

    has_masks = store.has_masks
    if not has_masks:
        log.warning(
            "store %s has no ground-truth masks (the source had none): label-free numbers only "
            "(docs/label-free.md)",
            store.path,
        )
    collector = None
    if probe and has_masks:
        collector = probe_lib.SampleCollector(
            attribute_reader(cfg, store), int(cfg.model.num_slots)
        )
    scored = evaluate_model(
        model,
        cfg,
        store,
        tokens_hash,
        split,
        max_videos,
        keep=None if collector is None else collector.test,
        seed=seed,
        refine=refine,
        track=track,
        parts=split_parts,
    )
    probe_result = {"skipped": "disabled (evaluate.probe=false)"}
    if not has_masks:
        probe_result = {"skipped": "no ground-truth masks to match slots to objects"}
    if collector is not None:
        probe_result = run_probe(model, cfg, store, tokens_hash, collector, split, seed, track)

    result = {
        "key": key,
        "run": str(run_dir),
        "split": split,
        "requested_split": requested,
        "num_videos": len(scored["video_ids"]),
        "checkpoint_step": ident.get("step"),
        "store": store.fingerprint,
        "tokens": tokens_hash,
        "primary": PRIMARY,
        "track": track,
        "scale": "fractions in [0, 1]; metrics.md shows x100 (the label-free table as is)",
        "methods": summarize_scores(scored["per_video"]),
        "video_ids": scored["video_ids"],
        "per_video": scored["per_video"],
        "label_free": {
            "methods": summarize_label_free(scored["label_free"]),
            "per_video": scored["label_free"],
            "active_share": lf.ACTIVE_SHARE,
            "flip": flip_note(store, split),
        },
        "probe": probe_result,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_text(out_json, json.dumps(_finite(result), indent=1))
    write_text(run_dir / "metrics.md", format_table(result) + "\n")
    return result


def summarize_label_free(per_video: dict) -> dict:
    """{method: {number: {mean, std, n}}} over videos, NaN values (undefined numbers) left out."""
    return {
        method: {key: metrics.summarize(values) for key, values in numbers.items()}
        for method, numbers in per_video.items()
    }


def flip_note(store, split: str) -> str:
    """How flip agreement was measured on this store, or why it is n/a."""
    if store.videos_in(split, hflip=True):
        return "the store's horizontally flipped rows (augment.hflip: cache), mirrored back"
    return (
        "n/a: the store has no flipped rows (extract with augment.hflip=cache); cached features "
        "are not flip-equivariant and the decoder's positional embedding fixes the token grid, "
        "so no flip or crop can be made from the cached features alone"
    )


def run_probe(
    model, cfg, store, tokens_hash, collector, split: str, seed: int, track: str = DEFAULT_TRACK
) -> dict:
    """Collect slots of the train videos (the test ones are in ``collector``) and fit the probes."""
    if not collector.has_attributes:
        return {"skipped": "no per-object attributes in this dataset (meta.json 'objects')"}
    if split == "train":
        return {
            "skipped": "the probe is fit on train videos; evaluate the val or test split to score it"
        }
    window = window_length(cfg)
    train_split = "train"
    limit = cfg.evaluate.probe_train_videos
    total = split_size(store, train_split, limit)
    if total == 0:
        return {"skipped": f"no '{train_split}' videos to fit the probe on"}
    for item in tqdm(
        iter_videos(store, train_split, tokens_hash, limit),
        total=total,
        desc="probe: train slots",
        unit="video",
    ):
        result = infer_video(model, item["features"], item.get("tokens"), window, track=track)
        collector.train(item, result)
    train, test = collector.samples["train"], collector.samples["test"]
    out = probe_lib.fit_and_score(train, test, seed=seed)
    if getattr(model.processor.corrector, "invariant", False) and out.get("attributes"):
        # Invariant Slot Attention: each slot ends with its (y, x, scale_y, scale_x); say what
        # the vector alone carries, so a position read from the geometry is not taken for it
        alone = probe_lib.fit_and_score(
            probe_lib.without_geometry(train), probe_lib.without_geometry(test), seed=seed
        )
        for name, row in (alone.get("attributes") or {}).items():
            if name in out["attributes"]:
                out["attributes"][name]["score_vector_only"] = row["score"]
    return out


def attribute_reader(cfg, store) -> Callable[[str], dict | None]:
    """video id -> per-video attributes dict (with 'objects') or None.

    Uses the data source of the run's config (``egoslots.pipeline.data.make_source``) when available,
    else ``<dataset.path>/<video>/meta.json`` (the frame-folder / make-synthetic layout).
    """
    source = None
    try:
        source = make_source(cfg)
    except Exception as err:  # noqa: BLE001 - the data moved or cannot be listed: meta.json files
        log.debug("no data source for attributes (%s); reading meta.json files", err)
    root = Path(str(cfg.dataset.path))

    def read(video_id: str) -> dict | None:
        if source is not None:
            try:
                attrs = source.attributes(video_id)
                if attrs is not None:
                    return attrs
            except Exception:
                pass
        meta = root / video_id / "meta.json"
        if meta.is_file():
            try:
                return json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError) as err:
                log.warning("could not read %s: %s", meta, err)
        return None

    return read


# ---------------------------------------------------------------------------------- table
def _fmt(stat: dict) -> str:
    if not stat or stat.get("n", 0) == 0 or not np.isfinite(stat.get("mean", float("nan"))):
        return "n/a"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _num(value) -> str:
    """A probe figure; NaN (or null, once read back from JSON) shows as n/a."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _restarts_note(restarts: int | None) -> str:
    if not restarts or restarts <= 1:
        return ""
    return f", first slots the best of {restarts} draws per video"


TRACK_NOTES = {
    "match": "tied slots renamed to keep their regions (--track match, the default: "
    "the masks visualize, export-slots and infer give)",
    "off": "the model's raw slot order and plain arg-max (--track off)",
}


def track_note(result: dict) -> str:
    """Which masks of the model were scored (metrics.json from before ``--track``: none said)."""
    track = result.get("track") or (result.get("key") or {}).get("track")
    return f" Model masks: {TRACK_NOTES[track]}." if track in TRACK_NOTES else ""


def format_table(result: dict) -> str:
    """Markdown: method x metric, mean ± std over videos (x100), best per column in bold; then
    the label-free table (the only one on a store without masks) and the probe."""
    if result.get("skipped"):
        return f"No evaluation of {result.get('run', '?')}: {result['skipped']}."
    methods = result["methods"]
    keys = [k for k in metrics.METRICS if any(k in m for m in methods.values())]
    best = {}
    for k in keys:
        means = [
            m[k]["mean"]
            for m in methods.values()
            if k in m and m[k]["n"] > 0 and np.isfinite(m[k]["mean"])
        ]
        best[k] = max(means) if means else None
    head = (
        f"Evaluation of {result.get('run', '?')} on the '{result['split']}' split"
        + (
            f" (the store has no '{result['requested_split']}' videos)"
            if result.get("requested_split", result["split"]) != result["split"]
            else ""
        )
        + f": {result['num_videos']} video{'' if result['num_videos'] == 1 else 's'}, "
        f"checkpoint step {result.get('checkpoint_step')}"
        + _restarts_note((result.get("key") or {}).get("restarts"))
        + "."
        + track_note(result)
    )
    if not methods:
        lines = [
            head + " The store has no ground-truth masks (the source had none): no FG-ARI or mBO "
            "to score, label-free numbers only.",
        ]
    else:
        lines = [
            head + " Mean ± std, x100: video metrics over videos, "
            "frame metrics over all frames (as SlotContrast); best per column in bold. "
            f"Primary: {METHOD_LABELS.get(result.get('primary', PRIMARY), PRIMARY)}.",
            "",
            "| method | " + " | ".join(METRIC_LABELS[k] for k in keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
    for method, values in methods.items():
        cells = []
        for k in keys:
            text = _fmt(values.get(k, {}))
            if (
                best[k] is not None
                and k in values
                and values[k]["n"] > 0
                and math.isclose(values[k]["mean"], best[k])
            ):
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    lines += label_free_table(result.get("label_free"), result.get("track"))
    probe = result.get("probe") or {}
    if probe.get("attributes"):
        rows = probe["attributes"]
        # Invariant Slot Attention: a slot is its vector and its position and scale; the
        # "vector alone" column says what the vector carries without them
        alone = any("score_vector_only" in row for row in rows.values())
        what = "Hungarian-matched slots" + (
            ": each one's vector with its position and scale, and the vector alone" if alone else ""
        )
        lines += [
            "",
            f"Property probe (linear read-out of {what}; fit on train videos, scored on "
            f"{result['split']} videos):",
            "",
            "| attribute | measure | probe |"
            + (" vector alone |" if alone else "")
            + " chance | train / test samples |",
            "|---|---|---|" + ("---|" if alone else "") + "---|---|",
        ]
        for name, row in rows.items():
            extra = f" {_num(row.get('score_vector_only'))} |" if alone else ""
            lines.append(
                f"| {name} | {row['measure']} | {_num(row.get('score'))} |{extra} "
                f"{_num(row.get('chance'))} | {row['n_train']} / {row['n_test']} |"
            )
    elif probe.get("skipped"):
        lines += ["", f"Property probe skipped: {probe['skipped']}."]
    return "\n".join(lines)


def _lf_cell(stat: dict | None, key: str) -> str:
    if not stat or stat.get("n", 0) == 0 or stat.get("mean") is None:
        return "n/a"
    if not np.isfinite(stat["mean"]):
        return "n/a"
    digits = 1 if key in ("run_length", "active_slots") else 3
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def label_free_table(section: dict | None, track: str | None = None) -> list[str]:
    """The label-free table's lines (none without the section: metrics.json from before it).
    ``track``: how the model's masks were inferred, said in the heading."""
    if not section or not section.get("methods"):
        return []
    share = section.get("active_share", lf.ACTIVE_SHARE)
    tracked = {
        "match": " Slot rows: --track match (slots the model cannot tell apart renamed to keep "
        "their regions; "
        f"where slots' masks are within {lf.TIE_TOLERANCE:g} a token keeps its slot of the frame "
        "before).",
        "off": " Slot rows: --track off (the model's raw slot order, plain arg-max).",
    }.get(track, "")
    lines = [
        "",
        "Label-free numbers (no masks used; docs/label-free.md), mean ± std over videos: "
        "token stability and identity best are shares of consecutive frame pairs, run length "
        f"in frames, a slot active with >= {100 * share:g}% of a frame's tokens, entropy over "
        "slots / log K, reconstruction error relative to the features' spread. No best marked: "
        "a fixed grid is perfectly stable. Flip agreement: "
        f"{section.get('flip', 'n/a')}." + tracked,
        "",
        "| method | " + " | ".join(LABEL_FREE_LABELS.values()) + " |",
        "|---|" + "---|" * len(LABEL_FREE_LABELS),
    ]
    for method, numbers in section["methods"].items():
        cells = [_lf_cell(numbers.get(key), key) for key in LABEL_FREE_LABELS]
        lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return lines


def _finite(value):
    """JSON has no NaN: write null instead."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@click.command(
    name="evaluate",
    epilog="\b\nExample:\n  egoslots evaluate egoslots-work/runs/slots --split test",
)
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@split_options("evaluate")
@click.option("--no-probe", is_flag=True, help="Skip the property probe.")
@restarts_option
@track_option
@click.option(
    "--overwrite", is_flag=True, help="Recompute even if metrics.json matches this checkpoint."
)
def evaluate(
    run: Path,
    split: str,
    checkpoint: str,
    max_videos: int | None,
    no_probe: bool,
    restarts: int | None,
    track: str,
    overwrite: bool,
):
    """FG-ARI, mBO and mIoU of a trained run's slot masks on whole videos, next to k-means and grid
    baselines; writes RUN/metrics.json and RUN/metrics.md and prints the table."""
    setup_logging()
    result = evaluate_run(
        run,
        split=split,
        checkpoint=checkpoint,
        max_videos=max_videos,
        probe=False if no_probe else None,
        overwrite=overwrite,
        restarts=restarts,
        track=track,
    )
    click.echo(format_table(result))
    click.echo(f"\nwritten: {Path(run) / 'metrics.json'}, {Path(run) / 'metrics.md'}")
