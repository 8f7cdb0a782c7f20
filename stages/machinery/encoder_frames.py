"""The frames `pretrain-encoder` trains on: decoded once into a uint8 array in its run directory.

Stage 0 cannot read the feature store's cached frames: a store is named by a fingerprint that
includes the encoder, which is what stage 0 is about to train. It reads the source instead
(``egoslots.pipeline.data.make_source``: the same video table and splits as every stage) and keeps the
train videos' frames, every ``frame_step``-th, resized to ``image_size`` exactly as stage 1
resizes them (shorter side, centre crop). DINO draws thousands of random frames per minute, and
decoding a PNG or seeking in a video for each would cost more than the training step on a
small ViT, so the frames are decoded once into ``frames/frames.npy`` (N, S, S, 3) uint8 (a numpy
file: ``np.load(..., mmap_mode="r")``) and memory-mapped while training.

Writing is resumable: segments of at most ``SEGMENT`` frames are decoded by DataLoader workers
and written in order; ``frames/frames.json`` records how many segments are on disk (after they
are flushed), so a rerun after a kill continues with the next segment and writes the same bytes.
A cache whose video table, size or frame step no longer matches the config is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from egoslots.cache.fingerprint import canonical_json, video_table_inputs
from egoslots.pipeline.data.base import SourceError
from egoslots.pipeline.preprocess import describe_preprocessing, resize_rgb
from egoslots.pipeline.records import DamagedFile, read_json
from egoslots.stages.machinery.rundirs import write_json

log = logging.getLogger("egoslots")

SEGMENT = 256  # frames per unit of work and resume


@dataclass(frozen=True)
class CachedVideo:
    video_id: str
    first: int  # first row in frames.npy
    count: int  # rows (frames 0, step, 2*step, ... of the video)


def training_videos(source) -> list:
    """The source's train-split videos; all videos (with a warning) if that split is empty."""
    videos = source.videos()
    train = [v for v in videos if v.split == "train"]
    if not train:
        log.warning(
            "no train-split videos in %s: the encoder trains on all %d", source.root, len(videos)
        )
        train = videos
    return train


def plan_rows(videos, frame_step: int) -> list[CachedVideo]:
    rows, first = [], 0
    for v in videos:
        count = math.ceil(int(v.num_frames) / frame_step)
        rows.append(CachedVideo(v.video_id, first, count))
        first += count
    return rows


def cache_identity(videos, size: int, frame_step: int) -> dict:
    """What the cached bytes depend on: the videos (ids, lengths, splits, files), the resize and
    the frame step."""
    return {
        "videos": hashlib.sha256(canonical_json(video_table_inputs(videos)).encode()).hexdigest()[
            :16
        ],
        "preprocessing": describe_preprocessing(size, size),
        "frame_step": int(frame_step),
    }


class _Segments(Dataset):
    """Item i = segment i: (first row, (n, S, S, 3) uint8 frames, error message or None)."""

    def __init__(
        self, source, rows: list[CachedVideo], segments: list[tuple], size: int, step: int
    ):
        self.source, self.rows, self.segments = source, rows, segments
        self.size, self.step = size, step

    def __len__(self) -> int:
        return len(self.segments)

    def __getitem__(self, i: int):
        video_index, lo, hi = self.segments[i]  # rows lo..hi-1 of one video
        video = self.rows[video_index]
        out = np.empty((hi - lo, self.size, self.size, 3), np.uint8)
        try:
            start, stop = (lo - video.first) * self.step, (hi - video.first - 1) * self.step + 1
            frames = self.source.read_frames(video.video_id, start, stop)
            for j, frame in enumerate(f for k, f in enumerate(frames) if k % self.step == 0):
                out[j] = resize_rgb(frame.rgb, self.size).permute(1, 2, 0).numpy()
        except SourceError as err:
            return lo, out, str(err)
        return lo, out, None


def _segments(rows: list[CachedVideo]) -> list[tuple[int, int, int]]:
    out = []
    for i, v in enumerate(rows):
        for lo in range(v.first, v.first + v.count, SEGMENT):
            out.append((i, lo, min(lo + SEGMENT, v.first + v.count)))
    return out


def _cache_record(path: Path) -> dict | None:
    """The frame cache's ``frames.json`` (None when absent or damaged: the cache is rebuilt)."""
    try:
        return read_json(path)
    except DamagedFile as err:
        log.warning("%s; rebuilding the frame cache", err)
        return None


def build_frame_cache(
    source, folder: Path, size: int, frame_step: int, num_workers: int = 0
) -> tuple[Path, list[CachedVideo]]:
    """Decode (or finish decoding) the train frames into ``folder/frames.npy``; returns its path
    and the rows of each video."""
    videos = training_videos(source)
    rows = plan_rows(videos, frame_step)
    total = rows[-1].first + rows[-1].count
    identity = cache_identity(videos, size, frame_step)
    folder.mkdir(parents=True, exist_ok=True)
    data, meta_path = folder / "frames.npy", folder / "frames.json"
    meta = _cache_record(meta_path)
    if meta and meta.get("identity") == identity and data.is_file():
        if meta.get("complete"):
            return data, rows
        array = np.lib.format.open_memmap(data, mode="r+")
        done = int(meta["segments_done"])
    else:
        if meta:
            log.info("the frames in %s are of other videos or settings: decoding again", folder)
        array = np.lib.format.open_memmap(
            data, mode="w+", dtype=np.uint8, shape=(total, size, size, 3)
        )
        done = 0
    meta = {
        "identity": identity,
        "rows": total,
        "size": size,
        "segments_done": done,
        "complete": False,
    }
    meta["videos"] = [[v.video_id, v.first, v.count] for v in rows]
    write_json(meta_path, meta)

    segments = _segments(rows)
    loader = DataLoader(
        _Segments(source, rows, segments[done:], size, frame_step),
        batch_size=None,
        num_workers=num_workers,
    )
    log.info(
        "decoding %d train frames at %d px into %s (%.1f MB)", total, size, data, array.nbytes / 1e6
    )
    with tqdm(
        total=total,
        initial=sum(s[2] - s[1] for s in segments[:done]),
        unit="frame",
        desc="frames for pretrain-encoder",
        dynamic_ncols=True,
    ) as bar:
        for i, (lo, frames, error) in enumerate(loader, start=done):
            if error:
                raise SourceError(f"{error}; frames decoded so far are kept: rerun to resume")
            array[lo : lo + len(frames)] = frames
            if i + 1 == len(segments) or (i + 1) % 8 == 0:
                array.flush()
                meta["segments_done"] = i + 1
                write_json(meta_path, meta)
            bar.update(len(frames))
    array.flush()
    meta.update(segments_done=len(segments), complete=True)
    write_json(meta_path, meta)
    del array
    return data, rows


def wait_for_frame_cache(
    source, folder: Path, size: int, frame_step: int, timeout_s: float = 24 * 3600
) -> tuple[Path, list[CachedVideo]]:
    """Other DDP ranks: wait until rank 0 has finished :func:`build_frame_cache` (one writer)."""
    videos = training_videos(source)
    identity = cache_identity(videos, size, frame_step)
    meta_path, deadline = folder / "frames.json", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        meta = _cache_record(meta_path) or {}
        if meta.get("complete") and meta.get("identity") == identity:
            return folder / "frames.npy", plan_rows(videos, frame_step)
        time.sleep(2.0)
    raise TimeoutError(f"rank 0 did not finish decoding the frames into {folder} in {timeout_s} s")


def open_frames(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")
