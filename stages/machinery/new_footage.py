"""New footage to features without a store (``egoslots infer``): which source reads a path, the
store's frozen encoder rebuilt from its recorded settings, features rounded to the store's
dtype, and windows of encoded frames streamed to the slot model (nothing cached).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from egoslots.pipeline.backbones import BackboneError, build_backbone
from egoslots.pipeline.preprocess import preprocess_frame
from egoslots.stages.machinery.common import StageError

log = logging.getLogger("egoslots")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# --------------------------------------------------------------------------------------------
# Input: which source reads it
# --------------------------------------------------------------------------------------------
def source_for(path: Path, fps: float | None):
    """A video file, a folder of video files, or a folder of frames / frame folders -> the
    project's source reading it (every video in split ``train``: splits mean nothing here)."""
    common = {"val": 0.0, "test": 0.0}
    if not path.exists():
        raise StageError(f"{path}: no such file or folder (give a video file or a folder)")
    if path.is_file():
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise StageError(
                f"{path}: not a video file ({', '.join(VIDEO_SUFFIXES)}); for frames give "
                "the folder that holds them"
            )
        from egoslots.pipeline.data.video import VideoFileSource

        return VideoFileSource(path, fps=fps, **common)
    visible = [
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in visible):
        from egoslots.pipeline.data.frames import FrameFolderSource

        return FrameFolderSource(path, **common)
    if any(p.suffix.lower() in VIDEO_SUFFIXES for p in visible):
        from egoslots.pipeline.data.video import VideoFileSource

        return VideoFileSource(path, fps=fps, **common)
    raise StageError(
        f"{path}: no video files ({', '.join(VIDEO_SUFFIXES)}) and no frames "
        f"({', '.join(IMAGE_SUFFIXES)}) in this folder"
    )


# --------------------------------------------------------------------------------------------
# The encoder the run's store was extracted with
# --------------------------------------------------------------------------------------------
def store_encoder(store, checkpoint: str | None, device: torch.device):
    """The store's frozen encoder, rebuilt from its recorded ``backbone`` settings and checked
    against the recorded description (same weights, input size and grid); -> (encoder, compute)."""
    recorded = store.meta.get("config", {}).get("backbone")
    described = store.meta.get("backbone")
    if not recorded or not described:
        raise StageError(
            f"store {store.path} records no backbone settings (it was not written by "
            "extract-features): infer needs the encoder that made its features"
        )
    settings = OmegaConf.create(dict(recorded))
    if checkpoint is not None:
        settings.checkpoint = str(checkpoint)
    try:
        encoder = build_backbone(settings)
    except (BackboneError, OSError) as err:
        raise StageError(
            f"cannot rebuild the encoder store {store.fingerprint} was extracted with: {err} "
            "(pass --backbone-checkpoint PATH if its weights moved)"
        ) from err
    mine = encoder.describe()
    for key in ("name", "input_size", "grid", "feature_dim", "checkpoint_sha256"):
        if mine.get(key) != described.get(key):
            raise StageError(
                f"the encoder built from store {store.fingerprint}'s settings differs from the "
                f"one that extracted it ({key}: {mine.get(key)} vs {described.get(key)}); pass "
                "--backbone-checkpoint with the weights the store was extracted with"
            )
    return encoder.to(device).eval(), str(store.meta.get("compute_dtype", "fp32"))


def as_stored(features: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round encoder output to the store's storage dtype and back to float32, as the store's
    ``encode_features`` + ``read_features`` do: the model sees exactly what export-slots reads."""
    x = features.float().cpu()
    if dtype == "float16":
        return x.half().float()
    if dtype == "bfloat16":
        return x.bfloat16().float()
    if dtype == "int8":  # per-token symmetric absmax / 127, as cache.store.quantize_int8
        from egoslots.cache.store import quantize_int8

        q, scale = quantize_int8(x.numpy())
        return torch.from_numpy(q.astype(np.float32) * scale[..., None])
    return x


def encoded_windows(
    source,
    video_id: str,
    encoder,
    compute: str,
    feature_dtype: str,
    frame_size: int,
    window: int,
    batch_size: int,
    bar,
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """(features (t, N, D), frames (t, S, S, 3) uint8) windows of one video, decoded and encoded
    ``batch_size`` frames at a time."""
    device = next(iter(encoder.buffers())).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute == "bf16")
    images, frames, feats = [], [], []

    def encode():
        batch = torch.stack(images).to(device).float().div_(255.0)
        with torch.inference_mode(), autocast:
            feats.append(as_stored(encoder(batch), feature_dtype))
        images.clear()

    def ready(final: bool):
        while sum(len(f) for f in feats) >= window or (final and feats):
            joined = torch.cat(feats)
            cut = min(window, len(joined))
            out_frames = np.stack(frames[:cut])
            del frames[:cut]
            feats[:] = [joined[cut:]] if len(joined) > cut else []
            yield joined[:cut], out_frames

    for frame in source.read_frames(video_id):
        vit, small, _ = preprocess_frame(frame.rgb, None, encoder.input_size, frame_size)
        images.append(vit)
        frames.append(small.numpy())
        bar.update(1)
        if len(images) == batch_size:
            encode()
            yield from ready(False)
    if images:
        encode()
    yield from ready(True)
