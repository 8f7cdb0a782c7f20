"""The feature store: one self-describing zarr v3 group per extraction fingerprint.

Layout (see ``docs/store-format.md``)::

    <work_dir>/stores/<fingerprint>.zarr/
        zarr.json                attrs["egoslots"]: format, fingerprint, backbone, grid, dtypes,
                                 normalisation, resolved config, versions, times, video table
        features   (F, N, D)     float16 | bfloat16 | float32 | int8
        features_scale (F, N)    float32, only for int8 (per-token absmax / 127)
        frames     (F, S, S, 3)  uint8, resized frames for stage 2 and pictures
        masks      (F, S, S)     uint8 label maps, where the source has them
        done       (num_chunks,) uint8, 1 once every array's chunk c is written
        tokens/<dvae-hash>/      written by stage 2: ids (F, h, w) uint16 and its own done

All arrays share one flat frame axis and one chunk length C along it, so "chunk c" means
frames [c*C, (c+1)*C) in every array. A chunk is the unit of work, of resume and of sharding
(a writer owns whole chunks, so concurrent writers never touch the same file). The ``done``
flag of a chunk is written only after all its data chunks are written, so a killed job
resumes by redoing exactly the chunks whose flag is 0.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import zarr

FORMAT_VERSION = 1
ATTRS_KEY = "egoslots"


class StoreError(RuntimeError):
    """A store that is missing, incomplete, or not what the caller needs."""


@dataclass(frozen=True)
class VideoRecord:
    """One row of a store's video table: rows first..first+length-1 of every array."""

    id: str
    first: int
    length: int
    split: str
    hflip: bool = False  # rows hold the horizontally flipped frames of video `id`

    @property
    def stop(self) -> int:
        return self.first + self.length


def store_path(work_dir: str | Path, fingerprint: str) -> Path:
    return Path(work_dir) / "stores" / f"{fingerprint}.zarr"


def chunk_bounds(chunk: int, chunk_len: int, num_frames: int) -> tuple[int, int]:
    start = chunk * chunk_len
    return start, min(start + chunk_len, num_frames)


def num_chunks(num_frames: int, chunk_len: int) -> int:
    return max(1, -(-num_frames // chunk_len))


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token symmetric int8: (F, N, D) float -> int8 values and (F, N) float32 scales."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


class FeatureStore:
    """A handle on one store group. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = Path(path) if "://" not in str(path) else path
        self.group = group
        self._meta: Optional[dict] = None

    # ------------------------------------------------------------------ creation / opening
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        fingerprint: str,
        videos: list[VideoRecord],
        num_tokens: int,
        feature_dim: int,
        grid: tuple[int, int],
        frame_size: int,
        feature_dtype: str = "float16",
        has_masks: bool = False,
        chunk_len: int = 64,
        compressor: str = "none",
        attrs: Optional[dict] = None,
    ) -> "FeatureStore":
        """Make an empty store with every array allocated and every chunk marked not done."""
        num_frames = sum(v.length for v in videos)
        if num_frames == 0:
            raise StoreError("cannot create a store with no frames")
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        compressors = _compressors(compressor)
        storage = {"bfloat16": "float32"}.get(feature_dtype, feature_dtype)
        # bfloat16 has no zarr dtype: stored as its upper 16 bits in uint16.
        if feature_dtype == "bfloat16":
            storage = "uint16"
        group.create_array("features", shape=(num_frames, num_tokens, feature_dim), dtype=storage,
                           chunks=(chunk_len, num_tokens, feature_dim), compressors=compressors, fill_value=0)
        if feature_dtype == "int8":
            group.create_array("features_scale", shape=(num_frames, num_tokens), dtype="float32",
                               chunks=(chunk_len, num_tokens), compressors=compressors, fill_value=0)
        group.create_array("frames", shape=(num_frames, frame_size, frame_size, 3), dtype="uint8",
                           chunks=(chunk_len, frame_size, frame_size, 3), compressors=compressors, fill_value=0)
        if has_masks:
            group.create_array("masks", shape=(num_frames, frame_size, frame_size), dtype="uint8",
                               chunks=(chunk_len, frame_size, frame_size), compressors=compressors, fill_value=0)
        group.create_array("done", shape=(num_chunks(num_frames, chunk_len),), dtype="uint8", chunks=(1,),
                           fill_value=0, compressors=None)
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "complete": False,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "num_frames": num_frames,
            "num_tokens": num_tokens,
            "feature_dim": feature_dim,
            "grid": list(grid),
            "frame_size": frame_size,
            "feature_dtype": feature_dtype,
            "chunk_len": chunk_len,
            "has_masks": has_masks,
            "videos": [asdict(v) for v in videos],
        }
        meta.update(attrs or {})
        group.attrs[ATTRS_KEY] = _jsonable(meta)
        return cls(path, group)

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True, mode: str = "r") -> "FeatureStore":
        """Open an existing store; by default refuse one that extraction has not finished."""
        if "://" not in str(path) and not Path(path).exists():
            raise StoreError(f"no feature store at {path}; run `egoslots extract-features CONFIG` first")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception as err:
            raise StoreError(f"{path} is not a readable zarr v3 store: {err}") from err
        if ATTRS_KEY not in group.attrs:
            raise StoreError(f"{path} is a zarr group but not an egoslots feature store (no '{ATTRS_KEY}' attrs)")
        store = cls(path, group)
        if store.meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path} has store format {store.meta.get('format_version')}, this egoslots reads "
                f"format {FORMAT_VERSION}; re-extract with `egoslots extract-features CONFIG --overwrite`"
            )
        if require_complete and not store.complete:
            done, total = store.progress()
            raise StoreError(
                f"{path} is incomplete ({done}/{total} chunks written); rerun `egoslots extract-features` "
                "with the same config to finish it"
            )
        return store

    # ------------------------------------------------------------------ description
    @property
    def meta(self) -> dict:
        """The store's description (read once; :meth:`update_meta` writes through)."""
        if self._meta is None:
            self._meta = dict(self.group.attrs[ATTRS_KEY])
        return self._meta

    def update_meta(self, **values) -> None:
        meta = dict(self.group.attrs[ATTRS_KEY])
        meta.update(_jsonable(values))
        self.group.attrs[ATTRS_KEY] = meta
        self._meta = meta

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def videos(self) -> list[VideoRecord]:
        if getattr(self, "_videos", None) is None:
            self._videos = [VideoRecord(**v) for v in self.meta["videos"]]
        return self._videos

    def videos_in(self, split: Optional[str] = None, hflip: Optional[bool] = False) -> list[VideoRecord]:
        """Video rows of one split (None = all); hflip=None includes both variants."""
        return [
            v for v in self.videos
            if (split is None or v.split == split) and (hflip is None or v.hflip == hflip)
        ]

    @property
    def num_frames(self) -> int:
        return int(self.meta["num_frames"])

    @property
    def chunk_len(self) -> int:
        return int(self.meta["chunk_len"])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])  # type: ignore[return-value]

    @property
    def feature_dim(self) -> int:
        return int(self.meta["feature_dim"])

    @property
    def frame_size(self) -> int:
        return int(self.meta["frame_size"])

    @property
    def has_masks(self) -> bool:
        return "masks" in self.group

    @property
    def features(self) -> zarr.Array:
        return self.group["features"]

    @property
    def frames(self) -> zarr.Array:
        return self.group["frames"]

    @property
    def masks(self) -> Optional[zarr.Array]:
        return self.group["masks"] if self.has_masks else None

    # ------------------------------------------------------------------ reading
    def read_features(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of `features` as float32 (dequantised / widened)."""
        raw = self.features[start:stop]
        dtype = self.meta["feature_dtype"]
        if dtype == "bfloat16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if dtype == "int8":
            scale = self.group["features_scale"][start:stop]
            return raw.astype(np.float32) * scale[..., None]
        return raw.astype(np.float32)

    # ------------------------------------------------------------------ writing
    def encode_features(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        """float32 (n, N, D) -> {array name: values} in this store's storage dtype."""
        dtype = self.meta["feature_dtype"]
        feats = np.asarray(feats, dtype=np.float32)
        if dtype == "bfloat16":
            bits = feats.view(np.uint32)
            # round to nearest even, as torch does when casting to bfloat16
            rounded = bits + 0x7FFF + ((bits >> 16) & 1)
            return {"features": (rounded >> 16).astype(np.uint16)}
        if dtype == "int8":
            q, scale = quantize_int8(feats)
            return {"features": q, "features_scale": scale}
        return {"features": feats.astype(dtype)}

    def write_chunk(self, chunk: int, arrays: dict[str, np.ndarray]) -> None:
        """Write whole chunk ``chunk`` of the named arrays, then flag it done (last)."""
        start, stop = chunk_bounds(chunk, self.chunk_len, self.num_frames)
        for name, values in arrays.items():
            if len(values) != stop - start:
                raise StoreError(f"chunk {chunk} of '{name}' needs {stop - start} rows, got {len(values)}")
            self.group[name][start:stop] = values
        self.group["done"][chunk] = 1

    def done_chunks(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    def progress(self) -> tuple[int, int]:
        done = self.done_chunks()
        return int(done.sum()), int(done.size)

    def pending_chunks(self, shard_id: int = 0, num_shards: int = 1) -> list[int]:
        """Chunks not yet written that belong to this shard (chunk % num_shards == shard_id)."""
        done = self.done_chunks()
        return [c for c in range(done.size) if not done[c] and c % num_shards == shard_id]

    def mark_complete_if_done(self) -> bool:
        done, total = self.progress()
        if done == total and not self.complete:
            self.update_meta(complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        return done == total

    # ------------------------------------------------------------------ tokens (stage 2)
    def token_group_names(self) -> list[str]:
        if "tokens" not in self.group:
            return []
        return sorted(name for name, _ in self.group["tokens"].groups())

    def tokens(self, dvae_hash: str, *, require_complete: bool = True) -> zarr.Array:
        """Token ids (F, h, w) uint16 written by the dVAE with this hash."""
        name = f"tokens/{dvae_hash}"
        if name not in self.group:
            have = ", ".join(self.token_group_names()) or "none"
            raise StoreError(
                f"{self.path} has no tokens of dVAE {dvae_hash} (tokens present: {have}); "
                "run `egoslots tokenize RUN` with that dVAE's run directory"
            )
        sub = self.group[name]
        if require_complete and not sub.attrs.get("complete", False):
            done = int(np.asarray(sub["done"][:]).sum())
            raise StoreError(
                f"tokens of dVAE {dvae_hash} in {self.path} are incomplete ({done}/{sub['done'].shape[0]} "
                "chunks); rerun `egoslots tokenize RUN` to finish them"
            )
        return sub["ids"]

    def create_tokens(self, dvae_hash: str, grid: tuple[int, int], attrs: dict) -> zarr.Group:
        """Allocate (or reopen, to resume) the token sub-group of one dVAE."""
        name = f"tokens/{dvae_hash}"
        if name in self.group:
            return self.group[name]
        sub = self.group.require_group(name)
        sub.create_array("ids", shape=(self.num_frames, *grid), dtype="uint16",
                         chunks=(self.chunk_len, *grid), fill_value=0)
        sub.create_array("done", shape=self.group["done"].shape, dtype="uint8", chunks=(1,), fill_value=0,
                         compressors=None)
        sub.attrs.update(_jsonable({"dvae_hash": dvae_hash, "grid": list(grid), "complete": False, **attrs}))
        return sub


def remove_store(path: str | Path) -> None:
    shutil.rmtree(path)


def list_stores(work_dir: str | Path) -> Iterator[Path]:
    root = Path(work_dir) / "stores"
    if root.is_dir():
        yield from sorted(p for p in root.iterdir() if p.suffix == ".zarr")


def directory_size(path: str | Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def _compressors(name: str):
    if name in ("none", None):
        return None
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "zstd":
        return [ZstdCodec(level=3)]
    if name == "blosc":
        return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]
    raise StoreError(f"unknown compressor '{name}' (extract.compressor: none | zstd | blosc)")


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))

