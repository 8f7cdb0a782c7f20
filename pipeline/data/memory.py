"""A video source over arrays in memory: for tests and for programmatic use."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from egoslots.pipeline.data.base import FileIdentity, Frame, SourceError, VideoInfo, split_of


class InMemorySource:
    """``videos``: {video_id: (T, H, W, 3) uint8}; ``masks`` likewise with (T, H, W) uint8."""

    def __init__(
        self,
        videos: dict[str, np.ndarray],
        masks: dict[str, np.ndarray] | None = None,
        attributes: dict[str, dict] | None = None,
        splits: dict[str, str] | None = None,
    ):
        self.root = Path("<memory>")
        self._videos = videos
        self._masks = masks or {}
        self._attributes = attributes or {}
        self._splits = splits or {}
        self.has_masks = bool(self._masks)

    def videos(self) -> list[VideoInfo]:
        rows = []
        for vid, arr in self._videos.items():
            # Identity of in-memory data: its size and a hash of its bytes.
            ident = FileIdentity(
                vid,
                int(arr.nbytes),
                int.from_bytes(hashlib.sha1(arr.tobytes()).digest()[:7], "big"),
            )
            rows.append(
                VideoInfo(vid, int(arr.shape[0]), self._splits.get(vid, split_of(vid)), (ident,))
            )
        return rows

    def read_frames(
        self, video_id: str, start: int = 0, stop: int | None = None
    ) -> Iterator[Frame]:
        if video_id not in self._videos:
            raise SourceError(f"no video '{video_id}' in memory source")
        arr = self._videos[video_id]
        masks = self._masks.get(video_id)
        for i in range(start, arr.shape[0] if stop is None else stop):
            yield Frame(video_id, i, arr[i], None if masks is None else masks[i])

    def attributes(self, video_id: str) -> dict | None:
        return self._attributes.get(video_id)
