"""Video sources: frame folders, video files, HDF5 arrays, webdataset tar shards (SlotContrast's
MOVi / YT-VIS) and the synthetic data set.

``make_source(cfg)`` builds the source ``dataset.source`` names; every source meets the
:class:`egoslots.pipeline.data.base.VideoSource` contract. The file-based sources share
:class:`ListedSource` below: the video table is listed once per process on first use (so that
building a source is instant and ``attributes()`` never has to list a SAYCam-sized folder),
``dataset.max_videos`` stops the listing early, and ``dataset.skip_bad`` turns a bad video into a
warning plus an entry in ``source.skipped`` instead of an error.

Where checks happen: listing only looks at names, sizes and headers (one ``stat`` per file, and a
demux pass without decoding for video files), so empty folders, missing masks, bad ``meta.json``,
unopenable videos and HDF5 arrays of the wrong shape are found there. Corrupt pixels are only
found when frames are decoded: ``read_frames`` raises a :class:`SourceError` naming the file and
frame index, and the caller (``extract-features --skip-bad``) decides whether to skip the video.
``egoslots inspect-data CONFIG --check`` decodes everything once to find them up front.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from egoslots.pipeline.data.base import SPLITS, SourceError, VideoInfo, refuse_special, split_of

log = logging.getLogger("egoslots")

SOURCE_KINDS = ("frames", "video", "hdf5", "webdataset", "synthetic")


class ListedSource:
    """Shared by the file-based sources: lazy listing, splits, ``max_videos`` and skip-bad.

    A subclass yields candidates with :meth:`_candidates` (``(video_id, anything)`` in a
    deterministic order) and turns one into a :class:`VideoInfo` with :meth:`_describe`,
    raising :class:`SourceError` for a bad video.
    """

    kind = "files"

    def __init__(
        self,
        root: str | Path,
        *,
        val: float = 0.1,
        test: float = 0.1,
        max_videos: int | None = None,
        skip_bad: bool = False,
    ):
        self.root = Path(root)
        if not (0 <= val and 0 <= test and val + test <= 1):
            raise SourceError(
                f"dataset.split: val ({val}) and test ({test}) must be >= 0 and sum to at most 1"
            )
        if max_videos is not None and max_videos < 1:
            raise SourceError(f"dataset.max_videos must be >= 1 or null, got {max_videos}")
        self.val, self.test = float(val), float(test)
        self.max_videos = max_videos
        self.skip_bad = bool(skip_bad)
        self.skipped: list[tuple[str, str]] = []  # (video id, why) of videos left out by skip-bad
        self._table: list[VideoInfo] | None = None

    # -- the contract -------------------------------------------------------------------------
    def videos(self) -> list[VideoInfo]:
        if self._table is None:
            self._table = self._list()
        return list(self._table)

    @property
    def has_masks(self) -> bool:
        self.videos()
        return self._has_masks()

    def read_frames(self, video_id: str, start: int = 0, stop: int | None = None) -> Iterator:
        raise NotImplementedError

    def attributes(self, video_id: str) -> dict | None:
        return None

    # -- for subclasses -----------------------------------------------------------------------
    def _candidates(self) -> Iterator[tuple[str, object]]:
        raise NotImplementedError

    def _describe(self, video_id: str, candidate) -> VideoInfo:
        raise NotImplementedError

    def _has_masks(self) -> bool:
        return False

    def _check_root(self) -> None:
        if not self.root.exists():
            raise SourceError(f"dataset.path {self.root} does not exist")
        refuse_special(f"dataset.path {self.root}", self.root.stat().st_mode)

    def split_for(self, video_id: str, given: str | None = None, where: str = "") -> str:
        """The split metadata gives, else the deterministic hash split of the id."""
        if given is None:
            return split_of(video_id, self.val, self.test)
        name = {"valid": "val", "validation": "val", "training": "train", "testing": "test"}.get(
            str(given), str(given)
        )
        if name not in SPLITS:
            raise SourceError(
                f"{where or video_id}: split '{given}' is not one of {', '.join(SPLITS)}"
            )
        return name

    def skip_or_raise(self, video_id: str, err: SourceError) -> None:
        """Under skip-bad, warn and remember the video; otherwise raise ``err``."""
        if not self.skip_bad:
            raise err
        log.warning("skipping bad video %s: %s", video_id, err)
        self.skipped.append((video_id, str(err)))

    def _list(self) -> list[VideoInfo]:
        self._check_root()
        rows: list[VideoInfo] = []
        self.skipped = []
        for video_id, candidate in self._candidates():
            if self.max_videos is not None and len(rows) >= self.max_videos:
                break
            try:
                rows.append(self._describe(video_id, candidate))
            except SourceError as err:
                self.skip_or_raise(video_id, err)
        if self.skipped:
            log.warning("skipped %d bad video(s) in %s (skip-bad)", len(self.skipped), self.root)
        if not rows:
            why = f"; {len(self.skipped)} skipped as bad" if self.skipped else ""
            if self.kind == "synthetic":
                why += f"; make them with `egoslots make-synthetic {self.root}` or `egoslots run CONFIG`"
            raise SourceError(f"no videos found in {self.root} (dataset.source={self.kind}){why}")
        return rows

    def __getstate__(self):
        """Open files and decoders stay in the process that opened them (safe across fork/spawn)."""
        state = dict(self.__dict__)
        for key in [k for k in state if k.startswith("_open")]:
            state[key] = None
        return state


def make_source(cfg, skip_bad: bool | None = None):
    """The :class:`VideoSource` for ``cfg.dataset`` (``skip_bad`` adds to ``dataset.skip_bad``)."""
    ds = cfg.dataset
    kind = str(ds.source)
    path = Path(str(ds.path)).expanduser()
    common = dict(
        val=float(ds.split.val),
        test=float(ds.split.test),
        max_videos=None if ds.max_videos is None else int(ds.max_videos),
        skip_bad=bool(skip_bad) or bool(ds.skip_bad),
    )
    if kind in ("frames", "synthetic"):
        from egoslots.pipeline.data.frames import FrameFolderSource

        if kind == "synthetic" and not path.is_dir():
            raise SourceError(
                f"no synthetic data at {path} (dataset.path): make it with `egoslots make-synthetic {path}`, "
                "or run the whole pipeline with `egoslots run CONFIG`, which makes it first"
            )
        source = FrameFolderSource(path, **common)
        source.kind = kind
        return source
    if kind == "video":
        from egoslots.pipeline.data.video import VideoFileSource

        return VideoFileSource(path, fps=None if ds.fps is None else float(ds.fps), **common)
    if kind == "hdf5":
        from egoslots.pipeline.data.hdf5 import Hdf5Source

        h = ds.hdf5
        return Hdf5Source(
            path,
            image_key=str(h.image_key),
            mask_key=None if h.mask_key is None else str(h.mask_key),
            layout=str(h.layout),
            **common,
        )
    if kind == "webdataset":
        from egoslots.pipeline.data.webdataset import WebdatasetSource

        w = ds.webdataset
        return WebdatasetSource(
            str(ds.path) if "://" in str(ds.path) else path,
            {"train": w.train_shards, "val": w.val_shards, "test": w.test_shards},
            video_key=str(w.video_key),
            mask_key=None if w.mask_key is None else str(w.mask_key),
            **common,
        )
    raise SourceError(f"dataset.source '{kind}' is not one of {', '.join(SOURCE_KINDS)}")


__all__ = ["ListedSource", "make_source", "SOURCE_KINDS"]
