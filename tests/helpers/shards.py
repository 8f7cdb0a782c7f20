"""Tiny tar shards written the way SlotContrast's data/save_movi.py and save_ytvis2021.py write
them (through webdataset's ShardWriter / TarWriter), without needing webdataset:

- one sample = members ``<key>.<field>`` in sorted field order, ``__key__`` = ``str(index)``
  counted over the whole split (save_movi) or the YT-VIS video id (save_ytvis2021);
- USTAR tar, mode 0o444, user and group "bigdata", a new shard every ``maxcount`` samples,
  named ``<pattern> % shard_index``;
- each ``.npy`` value is ``numpy.lib.format.write_array`` of the array (webdataset's npy encoder).
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np


def npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array(stream, array)
    return stream.getvalue()


def write_shards(pattern: str, samples: list[dict], maxcount: int = 32) -> list[Path]:
    """Write ``samples`` ({"__key__": str, "video.npy": array, ...}) into shards ``pattern % i``."""
    paths = []
    for first in range(0, len(samples), maxcount):
        path = Path(pattern % (first // maxcount))
        path.parent.mkdir(parents=True, exist_ok=True)
        with (
            open(path, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w|", format=tarfile.USTAR_FORMAT) as tar,
        ):
            for sample in samples[first : first + maxcount]:
                key = sample["__key__"]
                for field in sorted(k for k in sample if k != "__key__"):
                    data = npy_bytes(sample[field])
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size, info.mtime, info.mode = len(data), time.time(), 0o444
                    info.uname = info.gname = "bigdata"
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def movi_like(count: int, frames: int = 6, size: int = 32, seed: int = 0, first_key: int = 0):
    """MOVi samples as save_movi.py stores them: video (T, H, W, 3) uint8, segmentations
    (T, H, W, 1) uint8 label maps (0 = background), forward_flow (T, H, W, 2) float32.
    Each video shows 2-3 coloured squares moving on a grey background."""
    rng = np.random.default_rng(seed)
    out = []
    for v in range(count):
        video = np.full((frames, size, size, 3), 90, np.uint8)
        seg = np.zeros((frames, size, size, 1), np.uint8)
        for obj in range(1, int(rng.integers(2, 4)) + 1):
            colour = rng.integers(0, 256, 3).astype(np.uint8)
            side = int(rng.integers(size // 5, size // 3))
            y, x = rng.integers(0, size - side, 2)
            dy, dx = rng.integers(-2, 3, 2)
            for t in range(frames):
                yy = int(np.clip(y + dy * t, 0, size - side))
                xx = int(np.clip(x + dx * t, 0, size - side))
                video[t, yy : yy + side, xx : xx + side] = colour
                seg[t, yy : yy + side, xx : xx + side, 0] = obj
        flow = rng.standard_normal((frames, size, size, 2)).astype(np.float32)
        out.append(
            {
                "__key__": str(first_key + v),
                "video.npy": video,
                "segmentations.npy": seg,
                "forward_flow.npy": flow,
            }
        )
    return out


def ytvis_like(ids: list[int], frames: int = 5, height: int = 24, width: int = 40, seed: int = 0):
    """YT-VIS samples as save_ytvis2021.py stores them: non-square video (T, H, W, 3) and
    segmentations (T, H, W, I), one channel per instance holding its category id where it is."""
    rng = np.random.default_rng(seed)
    out = []
    for vid in ids:
        video = rng.integers(0, 256, (frames, height, width, 3)).astype(np.uint8)
        instances = int(rng.integers(1, 4))
        seg = np.zeros((frames, height, width, instances), np.uint8)
        for i in range(instances):
            category = int(rng.integers(1, 41))
            y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
            seg[:, y : y + 8, x : x + 8, i] = category
            video[:, y : y + 8, x : x + 8] = rng.integers(0, 256, 3).astype(np.uint8)
        out.append({"__key__": str(vid), "video.npy": video, "segmentations.npy": seg})
    return out
