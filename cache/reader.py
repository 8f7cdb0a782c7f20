"""A torch Dataset of clips read from a feature store (stages 2 and 3 read only this).

Item ``i`` is one clip (video row, start) from a deterministic index over the store's video
table; random sampling is the DataLoader's job (a seeded sampler), so a resumed run can replay
the same order. The zarr handle is opened lazily in each process, which makes the dataset safe
for DataLoader workers under both fork and spawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cache.store import FeatureStore, StoreError, VideoRecord
from pipeline.data.clips import Clip, build_clip_index, span

FIELDS = ("features", "frames", "masks", "tokens")


class ClipDataset(Dataset):
    """Clips of ``clip_length`` frames from one split of a store.

    Returns dicts with, per requested field: ``features`` (T, N, D) float32, ``frames``
    (T, S, S, 3) uint8, ``masks`` (T, S, S) uint8 (if the store has them), ``tokens``
    (T, h, w) int64 (if ``tokens`` names a dVAE hash), plus ``video_id``, ``start``, ``hflip``.
    ``clip_length=None`` makes each item one whole video (evaluation).
    ``feature_dtype="stored"`` returns float16 / bfloat16 features as stored (half the bytes
    through the DataLoader; widen on the GPU); int8 stores are always dequantised to float32.
    """

    def __init__(
        self,
        store: FeatureStore | str | Path,
        split: str | None = "train",
        clip_length: int | None = 4,
        stride: int = 1,
        frame_step: int = 1,
        fields: Sequence[str] = ("features",),
        tokens: str | None = None,
        include_flipped: bool = True,
        video_ids: Sequence[str] | None = None,
        feature_dtype: str = "float32",
    ):
        self._store = store if isinstance(store, FeatureStore) else None
        self.path = str(store.path if isinstance(store, FeatureStore) else store)
        st = self.store
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; choose from {FIELDS}")
        if "masks" in fields and not st.has_masks:
            raise StoreError(f"{self.path} has no ground-truth masks (the source had none)")
        if "tokens" in fields:
            if tokens is None:
                raise ValueError("fields include 'tokens' but no dVAE hash was given (tokens=...)")
            st.tokens(tokens)  # raises a clear StoreError if missing or incomplete
        if feature_dtype not in ("float32", "stored"):
            raise ValueError(f"feature_dtype must be 'float32' or 'stored', got {feature_dtype!r}")
        self.feature_dtype = feature_dtype
        self.fields = tuple(fields)
        self.tokens_hash = tokens
        self.clip_length = clip_length
        self.frame_step = frame_step
        self.videos: list[VideoRecord] = [
            v
            for v in st.videos
            if (split is None or v.split == split)
            and (include_flipped or not v.hflip)
            and (video_ids is None or v.id in video_ids)
        ]
        if clip_length is None:
            self.clips = [Clip(row, 0) for row in range(len(self.videos))]
        else:
            self.clips = build_clip_index(
                [v.length for v in self.videos],
                clip_length,
                stride,
                frame_step,
                names=[v.id for v in self.videos],
            )

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            self._store = FeatureStore.open(self.path)
        return self._store

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None  # reopened in the worker process
        return state

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        clip = self.clips[index]
        video = self.videos[clip.video]
        if self.clip_length is None:
            lo, hi, step = video.first, video.stop, 1
        else:
            lo = video.first + clip.start
            hi = lo + span(self.clip_length, self.frame_step)
            step = self.frame_step
        st = self.store
        item: dict = {"video_id": video.id, "start": clip.start, "hflip": video.hflip}
        for name in self.fields:
            if name == "features":
                item[name] = self._features(st, lo, hi, step)
            elif name == "tokens":
                ids = st.read_rows(f"tokens/{self.tokens_hash}/ids", lo, hi)[::step]
                item[name] = torch.from_numpy(ids.astype(np.int64))
            else:
                item[name] = torch.from_numpy(
                    np.ascontiguousarray(st.read_rows(name, lo, hi)[::step])
                )
        return item

    def _features(self, st: FeatureStore, lo: int, hi: int, step: int) -> torch.Tensor:
        stored = st.meta["feature_dtype"]
        if self.feature_dtype == "stored" and stored in ("float16", "bfloat16"):
            raw = torch.from_numpy(np.ascontiguousarray(st.read_rows("features", lo, hi)[::step]))
            return (
                raw.view(torch.bfloat16) if stored == "bfloat16" else raw
            )  # uint16 bits -> bfloat16
        return torch.from_numpy(np.ascontiguousarray(st.read_features(lo, hi)[::step]))
