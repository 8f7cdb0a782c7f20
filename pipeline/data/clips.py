"""Clips are sampled at read time from the video table, so clip length is an ablation that
never needs re-extraction.

A clip is (video, start): frames start, start+step, ..., start+(T-1)*step. Starts advance by
``stride``. A video shorter than (T-1)*step+1 frames gives no clip.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Clip:
    video: int  # row index into the video table the index was built from
    start: int  # first frame, relative to the video

    def frames(self, length: int, step: int) -> range:
        return range(self.start, self.start + (length - 1) * step + 1, step)


def span(length: int, step: int) -> int:
    """Frames a clip of ``length`` frames with ``step`` covers."""
    return (length - 1) * step + 1


def clip_starts(num_frames: int, length: int, stride: int = 1, step: int = 1) -> list[int]:
    """Start frames of every full clip of one video (empty if the video is too short)."""
    if length < 1 or stride < 1 or step < 1:
        raise ValueError(
            f"clip length, stride and frame step must be >= 1 (got {length}, {stride}, {step})"
        )
    last = num_frames - span(length, step)
    return list(range(0, last + 1, stride)) if last >= 0 else []


def build_clip_index(
    lengths: Sequence[int],
    length: int,
    stride: int = 1,
    step: int = 1,
    names: Sequence[str] | None = None,
) -> list[Clip]:
    """Every clip of every video; videos too short for one clip are counted and reported once."""
    clips: list[Clip] = []
    too_short = []
    for row, n in enumerate(lengths):
        starts = clip_starts(n, length, stride, step)
        if not starts:
            too_short.append(names[row] if names else str(row))
        clips.extend(Clip(row, s) for s in starts)
    if too_short:
        log.warning(
            "%d video(s) shorter than %d frames give no training clip of length %d (step %d): %s%s",
            len(too_short),
            span(length, step),
            length,
            step,
            ", ".join(too_short[:5]),
            " ..." if len(too_short) > 5 else "",
        )
    return clips
