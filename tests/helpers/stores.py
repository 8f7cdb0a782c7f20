"""Tiny feature stores written directly (no extraction), and byte-level store comparison.

:func:`write_store` is the one writer; the three builders below it differ only in what the
frames, features, masks and tokens show:

- :func:`frames_store`: coloured shapes to train a dVAE on (features are zeros), with flipped rows.
- :func:`slot_store`: random features, frames and token ids for stage 3, two-square masks.
- :func:`squares_store`: two moving squares per video whose features say which object a patch
  shows, with per-object attributes in ``meta.json`` (evaluate, export, visualize, the probe).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from egoslots.cache.store import FeatureStore, VideoRecord


def write_store(
    path: Path,
    videos: list[VideoRecord],
    *,
    features: np.ndarray,
    frames: np.ndarray,
    masks: np.ndarray | None = None,
    grid: tuple[int, int],
    fingerprint: str,
    feature_dtype: str = "float16",
    chunk_len: int = 8,
    complete: bool = True,
) -> FeatureStore:
    """A store holding exactly these arrays (float32 features are encoded to ``feature_dtype``)."""
    store = FeatureStore.create(
        path,
        fingerprint=fingerprint,
        videos=videos,
        num_tokens=features.shape[1],
        feature_dim=features.shape[2],
        grid=grid,
        frame_size=frames.shape[1],
        feature_dtype=feature_dtype,
        has_masks=masks is not None,
        chunk_len=chunk_len,
    )
    for chunk in range(-(-store.num_frames // chunk_len)):
        a, b = chunk * chunk_len, min((chunk + 1) * chunk_len, store.num_frames)
        arrays = {**store.encode_features(features[a:b]), "frames": frames[a:b]}
        if masks is not None:
            arrays["masks"] = masks[a:b]
        store.write_chunk(chunk, arrays)
    if complete:
        store.mark_complete_if_done()
    return store


def add_tokens(store: FeatureStore, dvae_hash: str, ids: np.ndarray, vocab: int) -> FeatureStore:
    """Complete token ids (F, h, w) of a (recorded, not trained) dVAE; the store reopened."""
    sub = store.create_tokens(dvae_hash, ids.shape[1:], {"vocab_size": vocab})
    sub["ids"][:] = ids.astype(np.uint16)
    sub["done"][:] = 1
    sub.attrs["complete"] = True
    return FeatureStore.open(store.path)


def records(videos) -> list[VideoRecord]:
    """(id, length, split[, hflip]) rows, laid out one after another."""
    rows, first = [], 0
    for vid, length, split, *hflip in videos:
        rows.append(VideoRecord(vid, first, length, split, bool(hflip and hflip[0])))
        first += length
    return rows


# --------------------------------------------------------------------------------------------
# Frames for the dVAE
# --------------------------------------------------------------------------------------------
def synthetic_frames(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: one to three coloured squares or discs on a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    frames = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = np.broadcast_to(rng.integers(0, 80, 3), (size, size, 3)).copy()
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(4, size - 4, 2)
            r = rng.integers(3, max(4, size // 4))
            if rng.random() < 0.5:
                inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
            else:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img[inside] = rng.integers(100, 256, 3)
        frames[i] = img
    return frames


def frames_store(
    path: Path,
    fingerprint: str = "fp-test",
    size: int = 32,
    frames_per_video: int = 8,
    chunk_len: int = 8,
    seed: int = 0,
    hflip: bool = True,
    complete: bool = True,
) -> FeatureStore:
    """train/train/val/test videos of :func:`synthetic_frames` plus flipped rows of the train ones."""
    splits = ["train", "train", "val", "test"]
    rows = [(f"v{i}", frames_per_video, split) for i, split in enumerate(splits)]
    if hflip:
        rows += [(f"v{i}", frames_per_video, split, True) for i, split in enumerate(splits[:2])]
    videos = records(rows)
    total = sum(v.length for v in videos)
    return write_store(
        path,
        videos,
        features=np.zeros((total, 4, 8), np.float32),
        frames=synthetic_frames(total, size, seed),
        grid=(2, 2),
        fingerprint=fingerprint,
        chunk_len=chunk_len,
        complete=complete,
    )


# --------------------------------------------------------------------------------------------
# Random stores for stage 3
# --------------------------------------------------------------------------------------------
SLOT_GRID = (4, 4)  # feature grid: N = 16 tokens
SLOT_FEATURES = 8  # feature dim
SLOT_TOKEN_GRID = (4, 4)
SLOT_VOCAB = 16
SLOT_FRAME = 16
SLOT_DVAE_HASH = "d0e1f2a3"
SLOT_VIDEOS = (("a", 8, "train"), ("b", 8, "train"), ("c", 6, "val"))


def slot_store(
    work: Path,
    *,
    videos=SLOT_VIDEOS,
    tokens: bool = True,
    masks: bool = True,
    seed: int = 0,
    chunk_len: int = 4,
) -> FeatureStore:
    """``work/stores/fp0.zarr``: random features, frames and token ids; masks of two squares."""
    rng = np.random.default_rng(seed)
    rows = records(videos)
    total = sum(v.length for v in rows)
    n_tokens = SLOT_GRID[0] * SLOT_GRID[1]
    features, frames = [], []
    for start in range(0, total, chunk_len):  # drawn chunk by chunk: features, then frames
        n = min(chunk_len, total - start)
        features.append(rng.standard_normal((n, n_tokens, SLOT_FEATURES)).astype(np.float32))
        frames.append(rng.integers(0, 255, (n, SLOT_FRAME, SLOT_FRAME, 3), dtype=np.uint8))
    label_maps = np.zeros((total, SLOT_FRAME, SLOT_FRAME), np.uint8)
    label_maps[:, :8, :8] = 1
    label_maps[:, 8:, 8:] = 2
    store = write_store(
        work / "stores" / "fp0.zarr",
        rows,
        features=np.concatenate(features),
        frames=np.concatenate(frames),
        masks=label_maps if masks else None,
        grid=SLOT_GRID,
        fingerprint="fp0",
        chunk_len=chunk_len,
    )
    if not tokens:
        return FeatureStore.open(store.path)
    ids = rng.integers(0, SLOT_VOCAB, (total, *SLOT_TOKEN_GRID))
    return add_tokens(store, SLOT_DVAE_HASH, ids, SLOT_VOCAB)


# --------------------------------------------------------------------------------------------
# Two moving squares (evaluation)
# --------------------------------------------------------------------------------------------
SQ_SIZE, SQ_GRID, SQ_DIM, SQ_FRAMES, SQ_TOKEN_GRID, SQ_VOCAB = 32, 4, 8, 6, 8, 16
SQ_DVAE_HASH = "dvae0000"


def square_video(seed: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Frames (T, S, S, 3), masks (T, S, S) and object attributes of two moving squares."""
    rng = np.random.default_rng(seed)
    frames = np.full((SQ_FRAMES, SQ_SIZE, SQ_SIZE, 3), 40, dtype=np.uint8)
    masks = np.zeros((SQ_FRAMES, SQ_SIZE, SQ_SIZE), dtype=np.uint8)
    objects = []
    for label, colour, mesh in ((1, (220, 30, 30), "cube"), (2, (30, 30, 220), "sphere")):
        side = int(rng.integers(8, 13))
        x, y = rng.integers(0, SQ_SIZE - side, 2)
        dx, dy = rng.integers(-2, 3, 2)
        positions = []
        for t in range(SQ_FRAMES):
            xt = int(np.clip(x + dx * t, 0, SQ_SIZE - side))
            yt = int(np.clip(y + dy * t, 0, SQ_SIZE - side))
            frames[t, yt : yt + side, xt : xt + side] = colour
            masks[t, yt : yt + side, xt : xt + side] = label
            positions.append([xt / SQ_SIZE, yt / SQ_SIZE, 0.0])
        # the synthetic generator's meta.json layout: mesh {name, id}, per-frame lists, None values
        objects.append(
            {
                "id": label,
                "mesh": {"name": mesh, "id": label - 1},
                "color": [c / 255 for c in colour],
                "size": side / SQ_SIZE,
                "texture": None,
                "positions": positions,
            }
        )
    return frames, masks, objects


def patch_features(masks: np.ndarray, rng) -> np.ndarray:
    """(T, N, D): each patch's label histogram in the first channels, plus noise."""
    p = SQ_SIZE // SQ_GRID
    t = masks.shape[0]
    blocks = (
        masks.reshape(t, SQ_GRID, p, SQ_GRID, p)
        .transpose(0, 1, 3, 2, 4)
        .reshape(t, SQ_GRID * SQ_GRID, p * p)
    )
    feats = np.zeros((t, SQ_GRID * SQ_GRID, SQ_DIM), dtype=np.float32)
    for label in range(3):
        feats[..., label] = (blocks == label).mean(-1)
    return feats + 0.05 * rng.standard_normal(feats.shape).astype(np.float32)


def squares_store(path: Path, data_dir: Path) -> FeatureStore:
    """6 videos (3 train, 3 test) of two moving squares, with tokens; meta.json in ``data_dir``."""
    rng = np.random.default_rng(0)
    frames, masks, features = [], [], []
    for i in range(6):
        video_frames, video_masks, objects = square_video(i)
        folder = data_dir / f"video_{i:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").write_text(json.dumps({"fps": 6, "objects": objects}))
        frames.append(video_frames)
        masks.append(video_masks)
        features.append(patch_features(video_masks, rng))
    rows = records((f"video_{i:02d}", SQ_FRAMES, "train" if i < 3 else "test") for i in range(6))
    store = write_store(
        path,
        rows,
        features=np.concatenate(features),
        frames=np.concatenate(frames),
        masks=np.concatenate(masks),
        grid=(SQ_GRID, SQ_GRID),
        fingerprint="tinyfp",
        feature_dtype="float32",
        chunk_len=6 * SQ_FRAMES,
    )
    ids = rng.integers(0, SQ_VOCAB, (store.num_frames, SQ_TOKEN_GRID, SQ_TOKEN_GRID))
    return add_tokens(store, SQ_DVAE_HASH, ids, SQ_VOCAB)


# --------------------------------------------------------------------------------------------
# Comparing stores
# --------------------------------------------------------------------------------------------
def snapshot(path: Path) -> dict:
    """The bytes that must match between equivalent extractions: every array and the video table."""
    store = FeatureStore.open(path)
    arrays = {name: np.asarray(store.group[name][:]) for name in store.data_arrays()}
    arrays["done"] = np.asarray(store.group["done"][:])
    return {"arrays": arrays, "videos": store.meta["videos"], "fingerprint": store.fingerprint}


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = snapshot(a), snapshot(b)
    assert sa["fingerprint"] == sb["fingerprint"]
    assert sa["videos"] == sb["videos"]
    assert sa["arrays"].keys() == sb["arrays"].keys()
    for name in sa["arrays"]:
        assert sa["arrays"][name].tobytes() == sb["arrays"][name].tobytes(), name


def only_store(work_dir: Path) -> Path:
    """The one store extraction wrote under ``work_dir/stores``."""
    stores = list((work_dir / "stores").glob("*.zarr"))
    assert len(stores) == 1, stores
    return stores[0]
