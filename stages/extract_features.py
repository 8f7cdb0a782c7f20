"""Stage 1, `egoslots extract-features`: run the frozen backbone once over every frame and
cache patch features, resized frames and masks in a feature store.

Three things run at once so the model never waits: DataLoader workers decode and preprocess
one store chunk per item (``ChunkFrames``), the main thread runs batched inference under
``torch.inference_mode`` (bf16 autocast where native: ``stages/machinery/runtime.py``), and a writer
thread (``ChunkWriter``, bounded queue) writes each finished chunk and only then flags it done
(both in ``stages/machinery/extract_chunks.py``).

Work is split in store chunks: a chunk is the unit of resume (a rerun redoes exactly the
chunks not flagged done) and of sharding (shard i of k owns chunks c with c % k == i). Every
chunk is cut into model batches the same way in every run (batches never straddle chunks),
so a resumed or sharded extraction writes the same bytes as an uninterrupted one.

Unreadable videos stop the job with an error naming the file, keeping every finished chunk.
With ``--skip-bad`` (or ``dataset.skip_bad``) a bad video's rows in the failing chunk are
written as zeros, the chunk records the video as skipped, and when the store completes the
video's rows (original and flipped) are dropped from the video table, so no reader sees them.
The store keeps its original row layout; the dropped rows are simply unreferenced.

Shards: every process computes the same fingerprint and path; the first to finish creating
the store (``egoslots.cache.catalog.open_or_create``: a temporary folder renamed into place, which is
atomic) wins and the others open it. ``--overwrite`` replaces a store of other settings; with several shards only shard 0
removes it and the others wait for the new one (to redo a store that *matches*, remove it
first with ``egoslots cache rm``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import click
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from egoslots.cache.catalog import NewStore, extraction_target, open_or_create
from egoslots.cache.fingerprint import extraction_settings, fingerprint_inputs, fingerprint_of
from egoslots.cache.location import Location
from egoslots.cache.store import FORMAT_VERSION, FeatureStore, StoreError, chunk_bounds
from egoslots.pipeline.backbones import build_backbone
from egoslots.pipeline.config import ConfigError, resolve, to_yaml
from egoslots.pipeline.data import make_source
from egoslots.pipeline.data.base import SourceError
from egoslots.pipeline.preprocess import describe_preprocessing
from egoslots.stages.machinery.batch_memory import check_extraction
from egoslots.stages.machinery.common import config_command
from egoslots.stages.machinery.extract_chunks import (
    ChunkFrames,
    ChunkWriter,
    extract_worker,
    start_storage_copy,
    stop_on_signals,
    stopped_extraction,
    video_rows,
)
from egoslots.stages.machinery.locks import check_unlocked
from egoslots.stages.machinery.runtime import (
    configure_threads,
    extraction_compute,
    pick_device,
)

log = logging.getLogger("egoslots")


# ---------------------------------------------------------------------------- shards
def shard_identity(num_shards: int | None = None, shard_id: int | None = None) -> tuple[int, int]:
    """(shard_id, num_shards): the flags, else torchrun's RANK/WORLD_SIZE, else SLURM's, else (0, 1)."""
    if num_shards is None and shard_id is None:
        for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank_var in os.environ and size_var in os.environ:
                shard_id, num_shards = int(os.environ[rank_var]), int(os.environ[size_var])
                break
        else:
            return 0, 1
    num_shards = 1 if num_shards is None else int(num_shards)
    shard_id = 0 if shard_id is None else int(shard_id)
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ConfigError(f"--shard-id {shard_id} must be in [0, --num-shards {num_shards})")
    return shard_id, num_shards


# ---------------------------------------------------------------------------- the stage
def _egoslots_version() -> str:
    try:
        return metadata.version("egoslots")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class ExtractionPlan:
    """What one extraction will write, worked out before any store is touched."""

    source: object
    backbone: torch.nn.Module
    device: torch.device
    compute: str  # fp32 | bf16, as resolved on this machine
    store: NewStore  # where, fingerprint and its inputs, layout, video table, attrs, config

    @property
    def fingerprint(self) -> str:
        return self.store.fingerprint

    @property
    def path(self) -> Location:  # a local Path, or an fsspec URL
        return self.store.path


def plan_extraction(cfg: DictConfig, source=None, skip_bad: bool = False) -> ExtractionPlan:
    """Source, backbone, compute dtype, fingerprint and store layout for a config.

    ``source`` overrides ``egoslots.pipeline.data.make_source(cfg)`` (programmatic use and tests). With
    ``skip_bad`` the source leaves out videos it cannot even list (they never enter the store).
    """
    device = pick_device(cfg.extract.device, "extract.device")  # before any work
    if source is None:
        source = make_source(cfg, skip_bad=skip_bad)
    videos = list(source.videos())
    if cfg.dataset.max_videos:
        videos = videos[: int(cfg.dataset.max_videos)]
    if not videos:
        raise SourceError(
            f"no videos found in {cfg.dataset.path} (dataset.source={cfg.dataset.source})"
        )

    configure_threads(cfg.num_threads, busy_workers=int(cfg.extract.num_workers))  # decoders
    compute = extraction_compute(cfg.extract.compute, device)
    if cfg.backbone.name == "self":  # the encoder of a pretrain-encoder run: not while it trains
        check_unlocked(
            Path(cfg.backbone.encoder_run),
            "extract-features would read its encoder.pth before that command has finished it",
        )
    backbone = build_backbone(cfg.backbone).to(device)
    frames = sum(v.num_frames for v in videos) * (2 if cfg.augment.hflip == "cache" else 1)
    check_extraction(cfg, backbone, device.type == "cuda", frames)  # before any chunk
    described = backbone.describe()
    frame_size, dtype, hflip = (
        int(cfg.extract.frame_size),
        str(cfg.extract.dtype),
        str(cfg.augment.hflip),
    )
    preprocessing = describe_preprocessing(backbone.input_size, frame_size)
    inputs = fingerprint_inputs(
        videos=videos,
        preprocessing=preprocessing,
        backbone=described,
        compute_dtype=compute,
        storage_dtype=dtype,
        hflip=hflip,
        frame_size=frame_size,
    )
    fingerprint = fingerprint_of(inputs)
    path = extraction_target(cfg, fingerprint)
    attrs = {
        "fingerprint_inputs": inputs,
        "settings": extraction_settings(cfg),
        "backbone": described,
        "preprocessing": preprocessing,
        "normalisation": {
            "input": "RGB scaled to [0, 1], then (x - mean) / std inside the backbone",
            "mean": described.get("mean"),
            "std": described.get("std"),
        },
        "compute_dtype": compute,
        "hflip": hflip,
        "source": {
            "kind": cfg.dataset.source,
            "root": str(getattr(source, "root", cfg.dataset.path)),
            "skipped_at_listing": [
                {"id": vid, "error": why} for vid, why in getattr(source, "skipped", [])
            ],
        },
        "versions": {
            "egoslots": _egoslots_version(),
            "torch": torch.__version__,
            "zarr": metadata.version("zarr"),
            "store_format": FORMAT_VERSION,
        },
        "config": resolve(cfg),
    }
    create_kwargs = dict(
        videos=video_rows(videos, hflip),
        num_tokens=backbone.num_tokens,
        feature_dim=backbone.feature_dim,
        grid=tuple(backbone.grid),
        frame_size=frame_size,
        feature_dtype=dtype,
        has_masks=bool(source.has_masks),
        chunk_len=int(cfg.extract.frames_per_chunk),
        compressor=str(cfg.extract.compressor),
        inner_chunk_len=int(cfg.extract.inner_chunk),
        attrs=attrs,
    )
    new = NewStore(path, fingerprint, inputs, create_kwargs, to_yaml(cfg))
    return ExtractionPlan(source, backbone, device, compute, new)


def extract(
    cfg: DictConfig,
    overwrite: bool = False,
    num_shards: int | None = None,
    shard_id: int | None = None,
    skip_bad: bool = False,
    *,
    source=None,
) -> Location:
    """Extract (or finish extracting) the store this config describes; returns its path.

    ``source`` overrides ``egoslots.pipeline.data.make_source(cfg)`` (programmatic use and tests).
    """
    shard_id, num_shards = shard_identity(num_shards, shard_id)
    skip_bad = bool(skip_bad or cfg.dataset.skip_bad)
    plan = plan_extraction(cfg, source, skip_bad)
    store = open_or_create(plan.store, overwrite, shard_id)
    fingerprint = plan.fingerprint
    if store.complete:
        click.echo(f"store {store.path} is complete (fingerprint {fingerprint}); nothing to do")
        click.echo(f"later stages: store={fingerprint}")
        return store.path

    pending = store.pending_chunks(shard_id, num_shards)
    with stop_on_signals() as stop:
        try:
            _run_chunks(
                store,
                plan.backbone,
                plan.source,
                pending,
                plan.device,
                plan.compute,
                int(cfg.extract.batch_size),
                int(cfg.extract.num_workers),
                skip_bad,
                shard=(shard_id, num_shards),
            )
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM by stop_on_signals: chunks are whole
            raise stopped_extraction(store, stop.signum) from None

    try:
        finished = store.mark_complete_if_done()
    except OSError as err:
        raise StoreError(
            f"every chunk of {store.path} is written but marking it complete failed ({err}); "
            "rerun the same command to finish"
        ) from err
    if finished:
        store.remove_partial_files()
        skipped = store.meta.get("skipped_videos") or []
        if skipped:
            click.echo(
                f"skipped {len(skipped)} unreadable video row(s): "
                + ", ".join(sorted({r["id"] for r in skipped})[:5])
            )
        click.echo(f"store complete: {store.path}")
        click.echo(f"later stages: store={fingerprint}   (or store={store.path})")
    else:
        done, total = store.progress()
        click.echo(
            f"shard {shard_id}/{num_shards} finished its chunks; store {store.path} has {done}/{total} "
            "chunks done and completes when every shard has finished"
        )
    return store.path


def _run_chunks(
    store: FeatureStore,
    backbone,
    source,
    chunks: list[int],
    device: torch.device,
    compute: str,
    batch_size: int,
    num_workers: int,
    skip_bad: bool,
    shard: tuple[int, int],
) -> None:
    """Decode, encode and write ``chunks``; finished chunks are kept whatever goes wrong."""
    if not chunks:
        return
    meta = store.meta
    dataset = ChunkFrames(
        source,
        store.videos,
        chunks,
        store.chunk_len,
        store.num_frames,
        backbone.input_size,
        store.frame_size,
        store.has_masks,
        skip_bad,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=extract_worker if num_workers else None,
        prefetch_factor=4 if num_workers else None,
    )
    bounds = [chunk_bounds(c, store.chunk_len, store.num_frames) for c in chunks]
    total = sum(hi - lo for lo, hi in bounds)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute == "bf16")
    writer = ChunkWriter(store)
    bar = tqdm(
        total=int(total),
        unit="frame",
        unit_scale=True,
        dynamic_ncols=True,
        smoothing=0.05,
        desc=f"extract {store.fingerprint}"
        + (f" shard {shard[0]}/{shard[1]}" if shard[1] > 1 else ""),
    )
    batches = None
    try:
        with torch.inference_mode(), autocast:
            batches = iter(loader)
            for item in batches:
                if item["error"]:
                    raise SourceError(
                        item["error"] + "; finished chunks are kept (rerun to resume, or pass "
                        "--skip-bad to skip unreadable videos)"
                    )
                images = item["images"]  # (n, 3, I, I) uint8
                feats = []
                for lo in range(
                    0, len(images), batch_size
                ):  # chunk-relative batches: same in every run
                    batch = (
                        images[lo : lo + batch_size]
                        .to(device, non_blocking=True)
                        .float()
                        .div_(255.0)
                    )
                    feats.append(backbone(batch))  # (b, N, D)
                features = start_storage_copy(torch.cat(feats), meta["feature_dtype"])  # (n, N, D)
                arrays = {"frames": item["frames"].numpy()}
                if item["masks"] is not None:
                    arrays["masks"] = item["masks"].numpy()
                writer.put(item["chunk"], features, arrays, item["skipped"])
                bar.update(len(images))
    finally:
        # Workers ignore SIGTERM (extract_worker), so multiprocessing's exit handler, which
        # stops them with it and then waits, would hang: stop them here, whatever ended the loop.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        bar.close()
        writer.close()  # writes what is queued, then raises a write error if there was one


@config_command(
    "extract-features",
    example="egoslots extract-features configs/base.yaml dataset.path=/data/saycam",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a store at the target path that was made with other settings.",
)
@click.option(
    "--num-shards",
    type=click.IntRange(min=1),
    default=None,
    help="Split the work over this many processes (default: torchrun/SLURM, else 1).",
)
@click.option(
    "--shard-id",
    type=click.IntRange(min=0),
    default=None,
    help="Which shard this process is (0-based).",
)
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Skip unreadable videos (dropped from the video table) instead of stopping.",
)
def extract_features(
    cfg: DictConfig, overwrite: bool, num_shards: int | None, shard_id: int | None, skip_bad: bool
):
    """Stage 1: run the frozen backbone over every frame once and cache its patch features,
    resized frames and masks in <work_dir>/stores/<fingerprint>.zarr.

    Interrupted? Rerun the same command: it resumes with the chunks not yet written. Several
    processes (--num-shards/--shard-id, torchrun or SLURM) write disjoint chunks of one store.
    """
    extract(cfg, overwrite=overwrite, num_shards=num_shards, shard_id=shard_id, skip_bad=skip_bad)
