"""Stage 1, `egoslots extract-features`: run the frozen backbone once over every frame and
cache patch features, resized frames and masks in a feature store.

Three things run at once so the model never waits: DataLoader workers decode and preprocess
one store chunk per item (:class:`ChunkFrames`), the main thread runs batched inference under
``torch.inference_mode`` (bf16 autocast where the hardware has it), and a writer thread
(:class:`ChunkWriter`, bounded queue) writes each finished chunk and only then flags it done.

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
the store (in a temporary folder renamed into place, which is atomic) wins and the others open
it. ``--overwrite`` replaces a store of other settings; with several shards only shard 0
removes it and the others wait for the new one (to redo a store that *matches*, remove it
first with ``egoslots cache rm``).
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import click
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cache.fingerprint import (
    config_stores_dir,
    describe_differences,
    extraction_settings,
    fingerprint_inputs,
    fingerprint_of,
    store_location,
)
from cache.location import Location, is_remote, remove, store_exists, write_text
from cache.store import (
    FORMAT_VERSION,
    FeatureStore,
    StoreError,
    StoreUnreachable,
    VideoRecord,
    chunk_bounds,
    config_path,
    store_path,
)
from pipeline.config import ConfigError, resolve, to_yaml
from pipeline.data.base import SourceError
from pipeline.preprocess import describe_preprocessing, preprocess_frame
from stages.common import config_command

log = logging.getLogger("egoslots")

COMPUTE_CHOICES = ("auto", "fp32", "bf16")
CREATE_TIMEOUT_S = 600.0  # how long a shard waits for another shard to replace a store
REMOTE_CREATE_TIMEOUT_S = (
    6 * 3600.0
)  # ... for shard 0 to create a remote store (job arrays start late)


# ---------------------------------------------------------------------------- shards, device, dtype
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


def pick_device(name: str) -> torch.device:
    """``auto``: this process's GPU (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        )
    return torch.device("cpu")


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_compute(requested: str, device: torch.device) -> str:
    """``auto|fp32|bf16`` -> the dtype actually used: bf16 only where a tiny probe runs it natively."""
    if requested not in COMPUTE_CHOICES:
        raise ConfigError(
            f"extract.compute={requested!r}: choose one of {', '.join(COMPUTE_CHOICES)}"
        )
    if requested == "fp32":
        return "fp32"
    if device.type == "cuda":
        native, why = torch.cuda.is_bf16_supported(), "this GPU has no native bf16"
    elif device.type == "cpu":
        native, why = _cpu_has_fast_bf16(), "this CPU has neither AVX-512 BF16 nor AMX"
    else:
        native, why = False, f"bf16 autocast is not used on {device.type}"
    if native:
        try:
            ones = torch.ones(4, 4, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                probe = ones @ ones
            native = probe.dtype == torch.bfloat16 and float(probe[0, 0]) == 4.0
            why = "the bf16 probe gave a wrong result"
        except Exception as err:  # noqa: BLE001 - any failure means "don't use it"
            native, why = False, f"the bf16 probe failed ({err})"
    if native:
        return "bf16"
    if requested == "bf16":
        log.warning("extract.compute=bf16 requested but %s: computing in fp32", why)
    return "fp32"


# ---------------------------------------------------------------------------- row layout
def video_rows(videos, hflip: str) -> list[VideoRecord]:
    """The store's video table: each video's rows, followed by its flipped rows if cached."""
    if hflip not in ("none", "cache"):
        raise ConfigError(f"augment.hflip={hflip!r}: choose none or cache")
    rows, first = [], 0
    for v in videos:
        for flipped in (False, True) if hflip == "cache" else (False,):
            rows.append(VideoRecord(v.video_id, first, int(v.num_frames), v.split, flipped))
            first += int(v.num_frames)
    return rows


@dataclass(frozen=True)
class Segment:
    """The part of one video row that falls in one chunk."""

    record: VideoRecord
    start: int  # frame index within the video
    stop: int


def chunk_segments(
    records: list[VideoRecord], firsts: list[int], lo: int, hi: int
) -> list[Segment]:
    """Video segments covering store rows [lo, hi), in row order."""
    segments = []
    i = max(0, bisect.bisect_right(firsts, lo) - 1)
    while i < len(records) and records[i].first < hi:
        r = records[i]
        a, b = max(lo, r.first), min(hi, r.stop)
        if a < b:
            segments.append(Segment(r, a - r.first, b - r.first))
        i += 1
    return segments


# ---------------------------------------------------------------------------- decoding
class ChunkFrames(Dataset):
    """Item i = store chunk ``chunks[i]``, decoded and preprocessed (runs in DataLoader workers).

    Returns ``chunk``, ``images`` (n, 3, I, I) uint8 (ViT input), ``frames`` (n, S, S, 3) uint8,
    ``masks`` (n, S, S) uint8 or None, ``skipped`` [{id, hflip, error}] and ``error`` (a message
    naming the file, or None). Errors are returned rather than raised so the main process can
    stop cleanly after writing what is finished.
    """

    def __init__(
        self,
        source,
        records: list[VideoRecord],
        chunks: list[int],
        chunk_len: int,
        num_frames: int,
        input_size: int,
        frame_size: int,
        has_masks: bool,
        skip_bad: bool,
    ):
        self.source = source
        self.records = records
        self.firsts = [r.first for r in records]
        self.chunks = chunks
        self.chunk_len = chunk_len
        self.num_frames = num_frames
        self.input_size = input_size
        self.frame_size = frame_size
        self.has_masks = has_masks
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        chunk = self.chunks[i]
        lo, hi = chunk_bounds(chunk, self.chunk_len, self.num_frames)
        n, s, inp = hi - lo, self.frame_size, self.input_size
        images = torch.zeros(n, 3, inp, inp, dtype=torch.uint8)
        frames = torch.zeros(n, s, s, 3, dtype=torch.uint8)
        masks = torch.zeros(n, s, s, dtype=torch.uint8) if self.has_masks else None
        item = {
            "chunk": chunk,
            "images": images,
            "frames": frames,
            "masks": masks,
            "skipped": [],
            "error": None,
        }
        for seg in chunk_segments(self.records, self.firsts, lo, hi):
            row = seg.record.first + seg.start - lo
            try:
                self._decode(seg, images, frames, masks, row)
            except Exception as err:  # noqa: BLE001 - reported with the video and chunk
                message = (
                    str(err) if isinstance(err, SourceError) else f"{type(err).__name__}: {err}"
                )
                where = f"video '{seg.record.id}' frames {seg.start}..{seg.stop - 1} (store chunk {chunk})"
                if not self.skip_bad:
                    item["error"] = f"{where}: {message}"
                    return item
                log.warning("skipping unreadable %s: %s", where, message)
                count = seg.stop - seg.start
                for array in (images, frames, masks):
                    if array is not None:
                        array[row : row + count] = 0
                item["skipped"].append(
                    {"id": seg.record.id, "hflip": seg.record.hflip, "error": message}
                )
        return item

    def _decode(self, seg: Segment, images, frames, masks, row: int) -> None:
        got = 0
        for frame in self.source.read_frames(seg.record.id, seg.start, seg.stop):
            if got >= seg.stop - seg.start:
                break
            if self.has_masks and frame.mask is None:
                raise SourceError(f"frame {frame.index} has no mask although the source has masks")
            vit, small, mask = preprocess_frame(
                frame.rgb, frame.mask, self.input_size, self.frame_size, hflip=seg.record.hflip
            )
            images[row + got] = vit
            frames[row + got] = small
            if masks is not None:
                masks[row + got] = mask
            got += 1
        if got != seg.stop - seg.start:
            raise SourceError(
                f"expected {seg.stop - seg.start} frames from frame {seg.start}, the source gave {got}"
            )


def _worker_init(_):
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores


# ---------------------------------------------------------------------------- writing
class ChunkWriter:
    """A thread that writes finished chunks (bounded queue) and flags each done after its data."""

    def __init__(self, store: FeatureStore, max_pending: int = 4):
        self.store = store
        self.jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.failed_chunk: int | None = None
        self.thread = threading.Thread(target=self._run, name="egoslots-chunk-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None:
                continue  # drain without writing after a failure
            chunk, (host, event), arrays, skipped = job
            try:
                arrays.update(
                    finish_storage(host, event, self.store.meta["feature_dtype"], self.store)
                )
                self.store.record_skipped(chunk, skipped)
                self.store.write_chunk(chunk, arrays)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                self.error, self.failed_chunk = err, chunk

    def put(self, chunk: int, features: tuple, arrays: dict, skipped: list) -> None:
        """Queue one chunk: ``features`` from :func:`start_storage_copy`, the other arrays as numpy."""
        self.raise_if_failed()
        self.jobs.put((chunk, features, arrays, skipped))

    def close(self) -> None:
        """Wait until every queued chunk is written; then raise the first write error, if any."""
        self.jobs.put(None)
        self.thread.join()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.error is None:
            return
        err, path = self.error, self.store.path
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise StoreError(
                f"disk full while writing chunk {self.failed_chunk} of {path} ({err}); finished chunks are kept: "
                "free some space and rerun the same command to resume"
            ) from err
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise StoreError(
                f"cannot write chunk {self.failed_chunk} of {path}: {err}; the store's folder must be writable "
                "(a read-only mount, or another user's folder): make it writable or set work_dir / store_dir to a "
                "writable place; finished chunks are kept, rerun the same command to resume"
            ) from err
        if isinstance(err, OSError):
            raise StoreError(
                f"cannot write chunk {self.failed_chunk} of {path}: {err}; "
                "rerun the same command to resume"
            ) from err
        raise err


def start_storage_copy(
    feats: torch.Tensor, dtype: str
) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Convert model output (n, N, D) to the storage dtype on its device and start copying it
    to the host. On a GPU the copy is asynchronous (pinned memory + an event), so the model
    goes on with the next chunk while the writer thread waits for the copy."""
    if dtype == "float16":
        out = feats.to(torch.float16)
    elif dtype == "bfloat16":  # the bits of a bfloat16, round-to-nearest-even like encode_features
        out = feats.to(torch.bfloat16).view(torch.int16)
    else:  # float32, and int8 (quantised on the host by FeatureStore.encode_features)
        out = feats.float()
    if out.device.type != "cuda":
        return out, None
    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    host.copy_(out, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def finish_storage(
    host: torch.Tensor, event, dtype: str, store: FeatureStore
) -> dict[str, np.ndarray]:
    """Wait for :func:`start_storage_copy`'s copy; the store's storage arrays as numpy."""
    if event is not None:
        event.synchronize()
    values = host.numpy()
    if dtype == "bfloat16":
        return {"features": values.view(np.uint16)}
    if dtype == "int8":
        return store.encode_features(values)
    return {"features": values}


def to_storage(feats: torch.Tensor, dtype: str, store: FeatureStore) -> dict[str, np.ndarray]:
    """Model output (n, N, D) -> the store's storage arrays (synchronously)."""
    return finish_storage(*start_storage_copy(feats, dtype), dtype, store)


# ---------------------------------------------------------------------------- store creation
def _egoslots_version() -> str:
    try:
        return metadata.version("egoslots")
    except metadata.PackageNotFoundError:
        return "unknown"


def open_or_create_store(
    path: Location,
    fingerprint: str,
    inputs: dict,
    create_kwargs: dict,
    cfg: DictConfig,
    overwrite: bool,
    shard_id: int,
) -> FeatureStore:
    """Open the store at ``path`` if it matches, else create it (race-safe across shards).

    Creation happens in a temporary folder that is renamed into place: rename is atomic, so
    when several shards race exactly one store appears and the losers open it. Object stores
    have no rename: see :func:`open_or_create_remote_store`.
    """
    if is_remote(path):
        return open_or_create_remote_store(
            path, fingerprint, inputs, create_kwargs, cfg, overwrite, shard_id
        )
    deadline = time.monotonic() + CREATE_TIMEOUT_S
    while True:
        if path.exists():
            store = _matching_store(path, fingerprint, inputs, overwrite)
            if store is not None:
                return store
            if shard_id != 0:  # shard 0 replaces it; wait for the new one
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"shard {shard_id}: timed out waiting for shard 0 to replace {path}"
                    )
                time.sleep(1.0)
                continue
            trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:8]}")
            os.rename(path, trash)
            shutil.rmtree(trash)
            config_path(path).unlink(missing_ok=True)
            overwrite = False  # replaced once; a store appearing now is another shard's fresh one
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            FeatureStore.create(tmp, fingerprint=fingerprint, **create_kwargs)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"cannot create the store {path}: {err}") from err
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another shard created it first
            if time.monotonic() > deadline:
                raise StoreError(f"could not create or open {path}") from None
            continue
        log.info("created store %s", path)
        try:
            write_text(config_path(path), to_yaml(cfg))
        except OSError as err:  # the store is fine without it; say so rather than fail or hide it
            log.warning(
                "could not write %s (%s); the store's attrs hold the same config",
                config_path(path),
                err,
            )
        if time.monotonic() > deadline:
            raise StoreError(f"could not create or open {path}")


def _matching_store(
    path: Location, fingerprint: str, inputs: dict, overwrite: bool
) -> FeatureStore | None:
    """The existing store at ``path`` if it has this fingerprint; None if ``overwrite`` says to
    replace it; else a StoreError listing how its settings differ from this config's."""
    try:
        store = FeatureStore.open(path, require_complete=False, mode="r+")
        found = store.fingerprint
    except StoreUnreachable:
        raise  # a network or credentials error says nothing about the store: never replace it
    except StoreError as err:
        store, found = None, f"unreadable ({err})"
    if found == fingerprint:
        return store
    if overwrite:
        log.info("--overwrite: replacing %s (fingerprint %s)", path, found)
        return None
    recorded = store.meta.get("fingerprint_inputs", {}) if store else {}
    diffs = describe_differences(recorded, inputs) if recorded else [f"store fingerprint {found}"]
    raise StoreError(
        f"{path} holds a store extracted with different settings (fingerprint {found}, this config "
        f"gives {fingerprint}):\n  - "
        + "\n  - ".join(diffs)
        + "\nrerun with --overwrite to replace it, or set store= to another path"
    )


def open_or_create_remote_store(
    url: str,
    fingerprint: str,
    inputs: dict,
    create_kwargs: dict,
    cfg: DictConfig,
    overwrite: bool,
    shard_id: int,
) -> FeatureStore:
    """:func:`open_or_create_store` for an fsspec URL (e.g. ``s3://bucket/stores/x.zarr``).

    Shard 0 alone creates the store, in place: its egoslots attrs are written last, so a
    store without them is an unfinished creation (a kill during ``create``) that shard 0
    redoes. Other shards wait until the finished store appears (job arrays may start shard 0
    late: up to ``REMOTE_CREATE_TIMEOUT_S``).
    """
    started = time.monotonic()
    while True:
        if store_exists(url) and not FeatureStore.unfinished_creation(url):
            store = _matching_store(url, fingerprint, inputs, overwrite)
            if store is not None:
                return store
            if shard_id == 0:
                remove(url)
                overwrite = False
        if shard_id != 0:
            waited = time.monotonic() - started
            if waited > REMOTE_CREATE_TIMEOUT_S:
                raise StoreError(
                    f"shard {shard_id}: shard 0 has not created {url} in {waited / 3600:.1f} h; "
                    "start shard 0 (it alone creates a remote store), then rerun this shard"
                )
            if int(waited) % 60 == 0:
                log.info("shard %d: waiting for shard 0 to create %s", shard_id, url)
            time.sleep(1.0)
            continue
        try:
            store = FeatureStore.create(url, fingerprint=fingerprint, **create_kwargs)
            write_text(config_path(url), to_yaml(cfg))
        except OSError as err:
            raise StoreError(f"cannot create the store {url}: {err}") from err
        log.info("created store %s", url)
        return store


# ---------------------------------------------------------------------------- the stage
@dataclass
class ExtractionPlan:
    """What one extraction will write, worked out before any store is touched."""

    source: object
    backbone: torch.nn.Module
    device: torch.device
    compute: str  # fp32 | bf16, as resolved on this machine
    inputs: dict  # the fingerprint inputs
    fingerprint: str
    path: Location  # a local Path, or an fsspec URL
    create_kwargs: dict  # FeatureStore.create arguments (layout, video table, attrs)


def plan_extraction(cfg: DictConfig, source=None, skip_bad: bool = False) -> ExtractionPlan:
    """Source, backbone, compute dtype, fingerprint and store layout for a config.

    ``source`` overrides ``pipeline.data.make_source(cfg)`` (programmatic use and tests). With
    ``skip_bad`` the source leaves out videos it cannot even list (they never enter the store).
    """
    from pipeline.backbones import build_backbone

    if source is None:
        from pipeline.data import make_source

        source = make_source(cfg, skip_bad=skip_bad)
    videos = list(source.videos())
    if cfg.dataset.get("max_videos"):
        videos = videos[: int(cfg.dataset.max_videos)]
    if not videos:
        raise SourceError(
            f"no videos found in {cfg.dataset.path} (dataset.source={cfg.dataset.source})"
        )

    device = pick_device(cfg.extract.device)
    compute = resolve_compute(cfg.extract.compute, device)
    backbone = build_backbone(cfg.backbone).to(device)
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
    path = (
        store_location(cfg) if cfg.get("store") else store_path(config_stores_dir(cfg), fingerprint)
    )
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
    return ExtractionPlan(
        source, backbone, device, compute, inputs, fingerprint, path, create_kwargs
    )


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

    ``source`` overrides ``pipeline.data.make_source(cfg)`` (programmatic use and tests).
    """
    shard_id, num_shards = shard_identity(num_shards, shard_id)
    skip_bad = bool(skip_bad or cfg.dataset.get("skip_bad", False))
    plan = plan_extraction(cfg, source, skip_bad)
    store = open_or_create_store(
        plan.path, plan.fingerprint, plan.inputs, plan.create_kwargs, cfg, overwrite, shard_id
    )
    fingerprint = plan.fingerprint
    if store.complete:
        click.echo(f"store {store.path} is complete (fingerprint {fingerprint}); nothing to do")
        click.echo(f"later stages: store={fingerprint}")
        return store.path

    pending = store.pending_chunks(shard_id, num_shards)
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
        worker_init_fn=_worker_init if num_workers else None,
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
    try:
        with torch.inference_mode(), autocast:
            for item in loader:
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
    type=int,
    default=None,
    help="Split the work over this many processes (default: torchrun/SLURM, else 1).",
)
@click.option("--shard-id", type=int, default=None, help="Which shard this process is (0-based).")
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
