"""Video files (mp4, avi, mkv, webm, mov) decoded with PyAV, optionally subsampled in time.

The video id is the file's path relative to ``dataset.path`` (with ``/``); files are found
recursively and listed in natural order.

Frame-rate subsampling (``dataset.fps``): frames are chosen by presentation time, measured from
the first frame. For every instant ``k / fps`` (k = 0, 1, 2, ...) up to the last frame's time,
the frame whose timestamp is nearest that instant is kept (ties go to the earlier frame; a frame
chosen for two instants is kept once). A 30 fps file at ``fps=5`` keeps frames 0, 6, 12, ...;
variable-frame-rate files and timestamps rounded to milliseconds give the same regular result.
With ``fps`` unset, or not below the file's own rate, every frame is kept.

``num_frames`` is exact: listing demuxes each file once (packets only, no decoding; about as
fast as reading the file) and keeps the kept frames' timestamps in memory, nothing on disk.
Reading seeks to the keyframe before the first wanted frame and decodes forward, matching
frames by timestamp; reading on from where the last call stopped reuses the open decoder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from natsort import natsorted, ns

from egoslots.pipeline.data import ListedSource
from egoslots.pipeline.data.base import (
    FileIdentity,
    Frame,
    SourceError,
    VideoInfo,
    check_same_size,
    frame_range,
    refuse_special,
)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
_AV_ERRORS = (av.FFmpegError, OSError, ValueError, IndexError)
_INHERITED: list = []  # decoders a forked child got from its parent, kept alive and untouched


@dataclass(frozen=True)
class _Timeline:
    """What listing learnt about one file."""

    path: Path
    pts: np.ndarray | None  # kept frames' timestamps (stream time base), or None: match by order
    ranks: np.ndarray  # kept frames' positions among all frames, in presentation order
    height: int
    width: int


def subsample(times: np.ndarray, fps: float | None) -> np.ndarray:
    """Indices of the frames to keep, given every frame's time in seconds (sorted, from 0).

    See the module docstring for the rule.
    """
    n = len(times)
    if fps is None or n == 0:
        return np.arange(n)
    if fps <= 0:
        raise SourceError(f"dataset.fps must be > 0, got {fps}")
    instants = np.arange(int(np.floor(times[-1] * fps + 1e-9)) + 1) / fps
    after = np.clip(np.searchsorted(times, instants, side="left"), 0, n - 1)
    before = np.clip(after - 1, 0, n - 1)
    nearest = np.where(
        np.abs(times[before] - instants) <= np.abs(times[after] - instants), before, after
    )
    return np.unique(nearest)


class VideoFileSource(ListedSource):
    """Video files under ``root`` (or one file), decoded with PyAV; see the module docstring."""

    kind = "video"

    def __init__(self, root: str | Path, fps: float | None = None, **common):
        super().__init__(root, **common)
        if fps is not None and fps <= 0:
            raise SourceError(f"dataset.fps must be > 0, got {fps}")
        self.fps = fps
        self._timelines: dict[str, _Timeline] = {}
        self._open_cursor = None  # (pid, video id, container, frame iterator, next index)

    # -- listing ------------------------------------------------------------------------------
    def _candidates(self) -> Iterator[tuple[str, Path]]:
        if self.root.is_file():
            yield self.root.name, self.root
            return
        paths = []
        for p in self.root.rglob("*"):
            if p.suffix.lower() not in VIDEO_SUFFIXES or any(
                part.startswith(".") for part in p.relative_to(self.root).parts
            ):
                continue
            if not p.is_file() and p.exists() and not p.is_dir():  # a FIFO would block PyAV
                refuse_special(p, p.stat().st_mode)
            if p.is_file():
                paths.append(p)
        for path in natsorted(
            paths, key=lambda p: p.relative_to(self.root).as_posix(), alg=ns.PATH
        ):
            yield path.relative_to(self.root).as_posix(), path

    def _describe(self, video_id: str, path: Path) -> VideoInfo:
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise SourceError(f"{path}: no video stream in this file")
                stream = container.streams.video[0]
                time_base, rate = stream.time_base, stream.average_rate or stream.guessed_rate
                height, width = stream.codec_context.height, stream.codec_context.width
                pts = [p.pts for p in container.demux(stream) if p.size and not p.is_discard]
        except _AV_ERRORS as err:
            raise SourceError(f"{path}: cannot read video ({err})") from err
        if not pts:
            raise SourceError(f"{path}: the video stream holds no frames")
        if None not in pts and len(set(pts)) == len(pts) and time_base is not None:
            stamps = np.sort(np.asarray(pts, dtype=np.int64))
            times = (stamps - stamps[0]) * float(time_base)
        elif rate:  # no usable timestamps: frames in order at the nominal rate
            stamps, times = None, np.arange(len(pts)) / float(rate)
        else:
            raise SourceError(f"{path}: frames have no timestamps and the stream no frame rate")
        native = float(rate) if rate else None
        keep_all = self.fps is None or (native is not None and self.fps >= native)
        ranks = np.arange(len(pts)) if keep_all else subsample(times, self.fps)
        self._timelines[video_id] = _Timeline(
            path, None if stamps is None else stamps[ranks], ranks, height, width
        )
        stat = path.stat()
        ident = FileIdentity(video_id if self.root.is_dir() else path.name, stat.st_size)
        return VideoInfo(
            video_id,
            len(ranks),
            self.split_for(video_id),
            (ident,),
            native if keep_all else float(self.fps),
        )

    # -- reading ------------------------------------------------------------------------------
    def _timeline(self, video_id: str) -> _Timeline:
        if video_id not in self._timelines:
            self.videos()
        if video_id not in self._timelines:
            raise SourceError(f"no video '{video_id}' in {self.root}")
        return self._timelines[video_id]

    def read_frames(
        self, video_id: str, start: int = 0, stop: int | None = None
    ) -> Iterator[Frame]:
        tl = self._timeline(video_id)
        n = len(tl.ranks)
        stop = frame_range(video_id, start, stop, n)
        if start == stop:
            return
        cursor = self._take_cursor(video_id, start)
        if cursor is None and tl.pts is not None and start > 0:
            cursor = self._open_at(tl, seek_to=int(tl.pts[start]))
            try:
                first = next(cursor[1], None)
            except _AV_ERRORS:
                first = None
            if first is None or first[0] > int(
                tl.pts[start]
            ):  # seek overshot: decode from the start
                cursor[0].close()
                cursor = None
            else:
                cursor = (cursor[0], _chain(first, cursor[1]))
        if cursor is None:
            cursor = self._open_at(tl, seek_to=None)
        container, frames = cursor
        done = False
        try:
            yield from self._match(video_id, tl, frames, start, stop)
            done = True
        finally:
            if done and stop < n:
                self._open_cursor = (os.getpid(), video_id, container, frames, stop)
            else:
                container.close()

    def _match(self, video_id, tl: _Timeline, frames, start: int, stop: int) -> Iterator[Frame]:
        """Pick frames ``start..stop-1`` out of decoded (timestamp or order, frame) pairs."""
        i = start
        try:
            for key, frame in frames:
                wanted = int(tl.pts[i]) if tl.pts is not None else int(tl.ranks[i])
                if key < wanted:
                    continue
                if key > wanted:
                    raise SourceError(
                        f"{tl.path}: frame {i} of video '{video_id}' could not be decoded "
                        "(missing from the stream; the file may be corrupt)"
                    )
                where = f"{tl.path}: frame {i} of video '{video_id}'"
                rgb = frame.to_ndarray(format="rgb24")
                check_same_size(rgb.shape, (tl.height, tl.width), where)
                yield Frame(video_id, i, rgb)
                i += 1
                if i == stop:
                    return
        except _AV_ERRORS as err:
            raise SourceError(
                f"{tl.path}: frame {i} of video '{video_id}': cannot decode ({err})"
            ) from err
        raise SourceError(
            f"{tl.path}: video '{video_id}' ended at frame {i} of {len(tl.ranks)} "
            "(truncated or corrupt file?)"
        )

    def _open_at(self, tl: _Timeline, seek_to: int | None):
        """An open container and an iterator of (timestamp or order, frame) in presentation order."""
        try:
            container = av.open(str(tl.path))
            stream = container.streams.video[0]
            stream.thread_type = (
                "AUTO"  # frame + slice threads: several times faster on large frames
            )
            if seek_to is not None:
                container.seek(seek_to, stream=stream, backward=True, any_frame=False)
        except _AV_ERRORS as err:
            raise SourceError(f"{tl.path}: cannot open video ({err})") from err
        if tl.pts is not None:
            frames = ((f.pts if f.pts is not None else -1, f) for f in container.decode(stream))
        else:
            frames = enumerate(container.decode(stream))
        return container, frames

    def _take_cursor(self, video_id: str, start: int):
        """The decoder left open by the previous read if it stopped right before ``start``."""
        cursor, self._open_cursor = self._open_cursor, None
        if cursor is None:
            return None
        pid, vid, container, frames, next_index = cursor
        if pid == os.getpid() and vid == video_id and next_index == start:
            return container, frames
        if pid == os.getpid():
            container.close()
        else:  # inherited across fork: never close or free it here (its decoder threads live in the parent)
            _INHERITED.append(cursor)
        return None


def _chain(first, rest):
    yield first
    yield from rest
