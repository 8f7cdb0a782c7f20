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
from torch.utils.data import Dataset, get_worker_info

from egoslots.cache.store import FeatureStore, StoreError, VideoRecord
from egoslots.pipeline.data.clips import Clip, build_clip_index, span

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

    def _rows(self, index: int) -> tuple[VideoRecord, int, int, int]:
        """Clip ``index``: its video, first row, stop row and frame step in the store."""
        clip = self.clips[index]
        video = self.videos[clip.video]
        if self.clip_length is None:
            return video, video.first, video.stop, 1
        lo = video.first + clip.start
        return video, lo, lo + span(self.clip_length, self.frame_step), self.frame_step

    def __getitem__(self, index: int) -> dict:
        video, lo, hi, step = self._rows(index)
        st = self.store
        item: dict = {"video_id": video.id, "start": self.clips[index].start, "hflip": video.hflip}
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

    def read_batch(self, indices: Sequence[int]) -> dict:
        """Clips ``indices`` as one batch: what stacking their items gives (tensors (B, ...),
        ids / starts / flips as lists), read faster. Read-ahead is asked for every clip first
        (a cold disk reads them in parallel), then rows kept as stored (frames, masks, stored
        float16 / bfloat16 features) are read straight into the batch tensor, which lives in
        shared memory inside a DataLoader worker: no copy between the kernel's and the GPU's.
        """
        if self.clip_length is None:
            raise ValueError("read_batch needs clips of one length (clip_length is None)")
        spans = [self._rows(int(i)) for i in indices]
        st = self.store
        direct = {name: self._direct_dtype(name) for name in self.fields}
        for name, dtype in direct.items():
            if dtype is not None:
                for _, lo, hi, _ in spans:
                    st.advise_rows(name, lo, hi)
        batch: dict = {
            "video_id": [v.id for v, *_ in spans],
            "start": [self.clips[int(i)].start for i in indices],
            "hflip": [v.hflip for v, *_ in spans],
        }
        for name, dtype in direct.items():
            if dtype is None:  # widened or converted per clip (float32 / int8 features, ids)
                batch[name] = torch.stack([self[int(i)][name] for i in indices])
                continue
            shape = (len(spans), self.clip_length, *st.row_shape(name))
            out = batch_tensor(shape, dtype)
            rows = (out.view(torch.uint16) if dtype == torch.bfloat16 else out).numpy()
            for b, (_, lo, hi, step) in enumerate(spans):
                if step == 1:
                    st.read_rows(name, lo, hi, out=rows[b])
                else:
                    for t, row in enumerate(range(lo, hi, step)):
                        st.read_rows(name, row, row + 1, out=rows[b, t : t + 1])
            batch[name] = out
        return batch

    def _direct_dtype(self, name: str) -> torch.dtype | None:
        """The tensor dtype of field ``name`` where its rows go into a batch as stored."""
        if name in ("frames", "masks"):
            return torch.uint8
        if name == "features" and self.feature_dtype == "stored":
            return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
                self.store.meta["feature_dtype"]
            )
        return None


class ClipBatches(ClipDataset):
    """A :class:`ClipDataset` whose DataLoader reads each batch with :meth:`read_batch`
    (``__getitems__``): its collate function receives the finished batch (a dict)."""

    def __getitems__(self, indices: list[int]) -> dict:
        return self.read_batch(indices)


def batch_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in shared memory inside a DataLoader worker (as torch's own
    collate does), so the main process maps it instead of receiving a copy."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))
