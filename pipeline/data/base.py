"""The contract every video source meets, and the helpers sources share.

A source turns some files on disk into a *video table* (:class:`VideoInfo` rows) and reads
frames, masks and object attributes of one video on demand. Everything downstream (feature
extraction, pictures, evaluation) sees only this interface, so a new data format is one new
module in this package.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

SPLITS = ("train", "val", "test")


class SourceError(RuntimeError):
    """Bad input data; the message names the file (and frame) at fault."""


SPECIAL_FILES = (
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def special_file_kind(mode: int) -> str | None:
    """What a file of this ``st_mode`` is if it is no regular file or folder (a FIFO, socket or
    device), else None. Opening one may block forever (a FIFO with no writer), so sources ask
    before opening anything they listed."""
    for test, kind in SPECIAL_FILES:
        if test(mode):
            return kind
    return None


def refuse_special(path: str | os.PathLike, mode: int) -> None:
    """Raise a SourceError naming ``path`` if ``mode`` is a FIFO, socket or device."""
    kind = special_file_kind(mode)
    if kind is not None:
        raise SourceError(
            f"{path}: a {kind}, not a data file; egoslots reads only regular files: remove it "
            "from the dataset folder (or replace it with the file it stands for)"
        )


@dataclass(frozen=True)
class FileIdentity:
    """What the extraction fingerprint hashes about a file: its name and size, never its mtime
    (a `touch` or a copy without `-p` changes nothing extraction writes) and, for files, never
    its contents (reading every byte of a SAYCam-sized dataset to find a store would take hours).
    ``content`` is a digest only where the bytes are at hand anyway (in-memory sources)."""

    path: str  # relative to the source root
    size: int
    content: int = 0


@dataclass(frozen=True)
class VideoInfo:
    """One row of the video table."""

    video_id: str  # stable, unique within the source (e.g. folder path relative to the root)
    num_frames: int
    split: str  # train | val | test
    files: tuple[FileIdentity, ...] = field(default=(), compare=False, repr=False)
    fps: float | None = None


@dataclass
class Frame:
    """One decoded frame: RGB uint8 (H, W, 3) and, where the source has them, a label map."""

    video_id: str
    index: int  # frame index within the video (after any frame-rate subsampling)
    rgb: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None = None  # (H, W) uint8, 0 = background, 1..255 = objects


class VideoSource(Protocol):
    """What a data source offers. Implementations live beside this module."""

    root: Path
    has_masks: bool

    def videos(self) -> list[VideoInfo]:
        """The video table, in a deterministic order."""

    def read_frames(
        self, video_id: str, start: int = 0, stop: int | None = None
    ) -> Iterator[Frame]:
        """Frames ``start..stop-1`` of one video, in order; raises SourceError on bad data."""

    def attributes(self, video_id: str) -> dict | None:
        """Per-object attributes (mesh id, colour, size, positions...) if the source has them."""


def split_of(video_id: str, val: float = 0.1, test: float = 0.1) -> str:
    """Deterministic split by a hash of the video id (80/10/10 by default).

    The hash (not Python's salted ``hash``) keeps splits identical across machines and runs.
    """
    digest = hashlib.sha256(video_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


# A float video whose brightest pixel is at most this is taken to hold [0, 1] values (a little
# overshoot, e.g. from resampling, is common); a [0, 255] video this dark is black either way.
UNIT_RANGE_MAX = 1.5


def float_pixel_scale(video_max: float) -> float:
    """What a float video's pixels are multiplied by to give 0..255, decided ONCE per video from
    its brightest pixel (never per frame: one pixel of 1.02 in a [0, 1] video must not turn its
    frame into a [0, 255] frame, i.e. black)."""
    return 255.0 if not np.isfinite(video_max) or video_max <= UNIT_RANGE_MAX else 1.0


def to_rgb_uint8(image: np.ndarray, where: str, float_scale: float = 255.0) -> np.ndarray:
    """Grayscale, RGBA and other 8-bit layouts to (H, W, 3) uint8 (convert, don't fail).

    Float pixels are multiplied by ``float_scale`` (the video's :func:`float_pixel_scale`) and
    clipped to 0..255 (an overshoot beyond half the range, e.g. a [0, 1000] depth map, is one
    SourceError: clipping it would be silent); other integer types must hold values in 0..255 (one SourceError naming
    the range otherwise: clipping made a 16-bit frame white without a word; 16-bit PNG frames
    are scaled by their reader, from the file's bit depth)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            scaled = np.nan_to_num(arr) * float(float_scale)
            low, high = (float(scaled.min()), float(scaled.max())) if arr.size else (0.0, 0.0)
            if low < -0.5 * 255 or high > UNIT_RANGE_MAX * 255:  # no overshoot: another range
                raise SourceError(
                    f"{where}: {arr.dtype} pixels {low / float_scale:g}..{high / float_scale:g} "
                    "fit neither [0, 1] nor [0, 255] (a little overshoot is clipped, not this); "
                    "egoslots reads colour frames: scale them to [0, 1] or to uint8 0..255"
                )
            arr = np.clip(scaled + (0.5 if float_scale != 1.0 else 0.0), 0, 255).astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.integer):
            low, high = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
            if low < 0 or high > 255:  # clipping would turn a 16-bit frame white, silently
                raise SourceError(
                    f"{where}: {arr.dtype} pixels {low}..{high} do not fit 8-bit colour 0..255; "
                    "egoslots reads 8-bit frames: convert them to uint8 (16-bit: divide by 257), "
                    "or store floats in [0, 1]"
                )
            arr = arr.astype(np.uint8)
        else:
            raise SourceError(f"{where}: unsupported pixel type {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif not (arr.ndim == 3 and arr.shape[2] == 3):
        raise SourceError(f"{where}: expected an image of shape (H, W[, C]), got {arr.shape}")
    return np.ascontiguousarray(arr)


def binary_masks_to_labels(masks: np.ndarray, where: str) -> np.ndarray:
    """(K, H, W) binary per-object masks (slot 0 = background, as in EfficientMORL's files) to
    one (H, W) uint8 label map; later objects win where masks overlap."""
    if masks.ndim != 3:
        raise SourceError(f"{where}: expected binary masks (K, H, W), got shape {masks.shape}")
    if masks.shape[0] > 256:
        raise SourceError(f"{where}: {masks.shape[0]} objects do not fit a uint8 label map")
    labels = np.zeros(masks.shape[1:], dtype=np.uint8)
    for k in range(1, masks.shape[0]):
        labels[np.asarray(masks[k]) > 0] = k
    return labels


def frame_range(video_id: str, start: int, stop: int | None, num_frames: int) -> int:
    """``stop`` (None: the end) after checking ``start..stop`` lies within the video."""
    stop = num_frames if stop is None else stop
    if not 0 <= start <= stop <= num_frames:
        raise SourceError(
            f"video '{video_id}': frames {start}..{stop} out of range (it has {num_frames})"
        )
    return stop


def check_same_size(shape: Sequence[int], expected: Sequence[int], where: str) -> None:
    if tuple(shape[:2]) != tuple(expected[:2]):
        raise SourceError(
            f"{where}: size {tuple(shape[:2])} differs from the video's first frame {tuple(expected[:2])}"
        )
