"""Videos the tests write to disk (frame folders, video files, HDF5) or hold in memory, and
the small configs that read them."""

from __future__ import annotations

import json
from pathlib import Path

import av
import h5py
import numpy as np
import yaml
from PIL import Image

from egoslots.pipeline.config import load_config
from egoslots.pipeline.data.memory import InMemorySource

REPO = Path(__file__).resolve().parents[2]


def frame_image(i: int, size=(12, 16), channels: int = 3) -> np.ndarray:
    """A frame whose pixels encode its index (survives lossless PNG; JPEG within a few levels)."""
    h, w = size
    img = np.full((h, w, channels), (i * 8) % 256, np.uint8)
    img[0, 0] = 255 - (i * 8) % 256
    return img


def write_frames(
    folder: Path,
    n: int,
    ext: str = "png",
    names=None,
    masks: bool = False,
    meta=None,
    size=(12, 16),
) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"frame{i}" for i in range(n)]
    for i, name in enumerate(names):
        Image.fromarray(frame_image(i, size)).save(folder / f"{name}.{ext}", quality=95)
        if masks:
            (folder / "masks").mkdir(exist_ok=True)
            Image.fromarray(np.full(size, i % 4, np.uint8)).save(folder / "masks" / f"{name}.png")
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))
    return names


def write_video(path: Path, n: int, fps: int = 30, size=(16, 16), codec: str = "libx264") -> None:
    """A lossless H.264 file whose frame i has grey level 4*i (so decoded frames name themselves)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv444p"
        stream.options = {"qp": "0", "g": "8"}  # lossless; a keyframe every 8 frames (seeking)
        for i in range(n):
            img = np.full((*size, 3), 4 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frame_value(frame) -> int:
    return int(round(float(frame.rgb.mean()) / 4))


def write_emorl_h5(
    path: Path, n: int = 5, k: int = 3, size=(8, 10), splits=("train", "test")
) -> dict:
    """EfficientMORL's layout: <split>/imgs (N, H, W, 3), <split>/masks (N, K, H, W, 1) binary."""
    rng = np.random.default_rng(0)
    truth = {}
    with h5py.File(path, "w") as f:
        for split in splits:
            imgs = rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)
            labels = rng.integers(0, k, (n, *size))
            masks = np.stack([(labels == j) for j in range(k)], axis=1)[..., None].astype(
                np.float32
            )
            f.create_dataset(f"{split}/imgs", data=imgs)
            f.create_dataset(f"{split}/masks", data=masks)
            truth[split] = (imgs, labels.astype(np.uint8))
    return truth


def cfg_for(*overrides):
    return load_config(REPO / "configs" / "demo.yaml", list(overrides))


def memory_source(
    num_videos: int = 4,
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
    masks: bool = True,
    lengths: list[int] | None = None,
) -> InMemorySource:
    """Small random non-square videos (lengths 9, 10, 11, ...) with label-map masks."""
    rng = np.random.default_rng(seed)
    lengths = lengths or [9 + i for i in range(num_videos)]
    videos = {
        f"vid{i:02d}": rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)
        for i, n in enumerate(lengths)
    }
    label_maps = (
        {k: rng.integers(0, 5, v.shape[:3], dtype=np.uint8) for k, v in videos.items()}
        if masks
        else None
    )
    return InMemorySource(videos, label_maps)


def extract_cfg(work_dir: Path, *overrides: str):
    """The demo config shrunk to test size: patch-pixels on 32 px, 16 px frames, 8-frame chunks."""
    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"work_dir={work_dir}",
            "globals.BACKBONE=patch-pixels",
            "globals.IMAGE_SIZE=32",
            "globals.FRAME_SIZE=16",
            "backbone.patch_size=8",
            "extract.frames_per_chunk=8",
            "extract.batch_size=4",
            "extract.num_workers=0",
            "extract.compute=fp32",
            "extract.device=cpu",
            *overrides,
        ],
    )


def write_frame_folder(
    root: Path, videos: int, frames: int, size: tuple[int, int], seed: int = 0
) -> Path:
    """`<root>/<video>/<t>.png` plus `masks/<t>.png`: smooth moving content (PNG-compressible)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for v in range(videos):
        folder = root / f"clip{v:02d}"
        (folder / "masks").mkdir(parents=True)
        cx, cy, dx = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(-3, 3)
        for t in range(frames):
            disc = (xx - cx - dx * t) ** 2 + (yy - cy) ** 2 < (h / 5) ** 2
            rgb = np.stack(
                [xx * 255 // w, yy * 255 // h, np.full_like(xx, 40 * v % 256)], -1
            ).astype(np.uint8)
            rgb[disc] = (255, 40, 40)
            Image.fromarray(rgb).save(folder / f"{t:04d}.png")
            Image.fromarray(disc.astype(np.uint8) * (v % 3 + 1)).save(
                folder / "masks" / f"{t:04d}.png"
            )
    return root


def write_extract_config(tmp_path: Path, data: Path, **extract) -> Path:
    cfg = {
        "defaults": [str(REPO / "configs" / "demo.yaml")],
        "dataset": {"source": "frames", "path": str(data)},
        "globals": {"IMAGE_SIZE": 64, "FRAME_SIZE": 32, "BACKBONE": "patch-pixels"},
        "backbone": {"patch_size": 8},
        "augment": {"hflip": "cache"},
        "extract": {
            "frames_per_chunk": 8,
            "batch_size": 4,
            "num_workers": 0,
            "compute": "fp32",
            "device": "cpu",
            **extract,
        },
    }
    path = tmp_path / "extract.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
