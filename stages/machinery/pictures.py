"""Slot masks drawn over frames: one fixed colour per slot, for TensorBoard and `visualize`.

Colours are fixed by slot index (tab20, strong ones first), so a slot keeps its colour over
time and a colour change means the object changed slot. :func:`timeline` draws each slot's
area per frame over a whole video in the same colours, so identity switches show at a glance;
:class:`OverlayVideo` writes overlays frame by frame as GIF or mp4 (``infer``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from egoslots.pipeline.label_free import (  # noqa: F401 - TIE_TOLERANCE re-exported
    TIE_TOLERANCE,
    sticky_labels,
    tied_argmax,
)
from egoslots.pipeline.metrics import infer_grid, masks_to_labels

# 20 distinct colours (tab20 order, strong ones first); slot k always gets PALETTE[k % 20].
PALETTE = np.array(
    [
        [31, 119, 180],
        [255, 127, 14],
        [44, 160, 44],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [227, 119, 194],
        [127, 127, 127],
        [188, 189, 34],
        [23, 190, 207],
        [174, 199, 232],
        [255, 187, 120],
        [152, 223, 138],
        [255, 152, 150],
        [197, 176, 213],
        [196, 156, 148],
        [247, 182, 210],
        [199, 199, 199],
        [219, 219, 141],
        [158, 218, 229],
    ],
    dtype=np.uint8,
)


def slot_colours(labels: np.ndarray) -> np.ndarray:
    """Slot label maps (..., H, W) -> RGB (..., H, W, 3) with the fixed palette."""
    return PALETTE[labels % len(PALETTE)]


def overlay(frames: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend slot colours over frames (T, H, W, 3) uint8 and darken slot boundaries."""
    colours = slot_colours(labels).astype(np.float32)
    out = (1 - alpha) * frames.astype(np.float32) + alpha * colours
    edge = np.zeros(labels.shape, dtype=bool)
    edge[..., 1:, :] |= labels[..., 1:, :] != labels[..., :-1, :]
    edge[..., :, 1:] |= labels[..., :, 1:] != labels[..., :, :-1]
    out[edge] *= 0.3
    return out.clip(0, 255).astype(np.uint8)


def masks_overlay(
    frames: np.ndarray,
    masks: torch.Tensor,
    grid: tuple[int, int] | None,
    alpha: float = 0.55,
    ties: bool = False,
    labels: torch.Tensor | None = None,
) -> np.ndarray:
    """Frames (T, S, S, 3) uint8 and soft slot masks (T, K, N) on ``grid`` (None: square) ->
    (T, S, S, 3) uint8, each pixel in the colour of its arg-max slot (masks resized bilinearly),
    blended over the frame with ``alpha`` (1: solid slot colours, identities easiest to follow).
    ``ties`` (``--track match``): pixels two slots share almost equally are not left to float
    noise (:func:`tied_labels`): they keep their token's slot, ``labels`` (T, N) (the tracker's;
    None: :func:`~egoslots.pipeline.label_free.sticky_labels` of ``masks``)."""
    size = frames.shape[1:3]
    if ties:
        if labels is None:
            labels = sticky_labels(masks.detach().float().cpu())
        pixels = tied_labels(masks, size, grid, labels=labels).numpy()
    else:
        pixels = masks_to_labels(masks.detach().float().cpu(), size, grid).numpy()
    return overlay(frames, pixels, alpha)


def tied_labels(
    masks: torch.Tensor,
    size: tuple[int, int],
    grid: tuple[int, int] | None,
    chunk: int = 64,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """As ``metrics.masks_to_labels`` (grid, bilinear resize to ``size``), with
    :func:`tied_argmax` instead of arg-max: (..., K, N) -> (..., H, W) int64. ``labels``
    (..., N): each token's slot; a pixel keeps its nearest token's slot when that slot ties for
    the pixel's largest value, so the picture agrees with the labels."""
    *lead, k, n = masks.shape
    h, w = infer_grid(n, grid)
    flat = masks.detach().float().cpu().reshape(-1, k, h, w)
    tokens = None if labels is None else labels.detach().cpu().reshape(-1, 1, h, w).float()
    out = []
    for i in range(0, flat.shape[0], chunk):
        part = flat[i : i + chunk]
        prefer = None if tokens is None else tokens[i : i + chunk]
        if (h, w) != tuple(size):
            part = F.interpolate(part, size=tuple(size), mode="bilinear", align_corners=False)
            if prefer is not None:
                prefer = F.interpolate(prefer, size=tuple(size), mode="nearest")
        if prefer is not None:
            prefer = prefer.flatten(1).long()
        out.append(tied_argmax(part.flatten(2), prefer=prefer).view(-1, *size))
    return torch.cat(out).reshape(*lead, *size)


def slot_areas(masks: torch.Tensor, labels: torch.Tensor | None = None) -> np.ndarray:
    """Soft masks (T, K, N) -> (T, K) share of the N tokens whose slot is k: ``labels`` (T, N)
    where given (the tracker's), else :func:`tied_argmax`."""
    t, k, n = masks.shape
    labels = tied_argmax(masks) if labels is None else labels.long()  # (T, N)
    counts = torch.zeros(t, k).scatter_add_(1, labels.cpu(), torch.ones(t, n))
    return (counts / n).numpy()


def timeline(
    areas: np.ndarray,
    ticks: list[int] | tuple[int, ...] = (),
    lane_height: int = 22,
    max_width: int = 1600,
    title: str = "",
) -> np.ndarray:
    """Each slot's area per frame over a video, (T, K) -> an RGB picture (H, W, 3) uint8.

    Top: the K areas stacked in slot order (each column one frame, each band as thick as its
    slot's share of the frame). Below: one lane per slot, its area as a filled curve (full lane =
    the largest area any slot reaches), labelled with the slot's index in its overlay colour. An
    object that changes slot shows as one lane falling while another rises at the same frame.
    ``ticks``: frame indices marked under the lanes (``visualize`` marks where each inference
    window starts, where carried slots meet new frames). Videos longer than ``max_width`` frames
    are sampled evenly; shorter ones get up to 8 pixels per frame.
    """
    from PIL import Image, ImageDraw

    t, k = areas.shape
    per_frame = max(1, min(8, max_width // max(t, 1)))
    width = min(t * per_frame, max_width)
    frame_of = np.minimum((np.arange(width) * t) // width, t - 1)  # frame shown in each column
    a = areas[frame_of]  # (W, K)
    left, top_h, gap, axis_h = 48, 64, 4, 14
    height = top_h + gap + k * lane_height + axis_h
    canvas = np.full((height, left + width, 3), 255, dtype=np.uint8)

    # stacked shares: rows from the top, slot 0 first
    edges = np.concatenate([np.zeros((width, 1)), np.cumsum(a, 1)], 1) * top_h  # (W, K+1)
    rows = np.arange(top_h)[:, None] + 0.5  # (top_h, 1)
    band = (rows[..., None] >= edges[None, :, :-1]) & (rows[..., None] < edges[None, :, 1:])
    has = band.any(-1)  # (top_h, W)
    canvas[:top_h, left:][has] = slot_colours(band.argmax(-1))[has]

    # one lane per slot
    scale = max(float(areas.max()), 1e-6)
    for slot in range(k):
        y0 = top_h + gap + slot * lane_height
        fill = np.round(a[:, slot] / scale * (lane_height - 3)).astype(int)  # (W,)
        ys = np.arange(lane_height - 1)[:, None]
        inside = ys >= (lane_height - 1 - fill)[None, :]
        lane = canvas[y0 : y0 + lane_height - 1, left:]
        lane[inside] = PALETTE[slot % len(PALETTE)]
        canvas[y0 + lane_height - 1, left:] = 225  # a light line under each lane
    y_axis = top_h + gap + k * lane_height
    for tick in ticks:
        if 0 <= tick < t:
            x = left + int(tick * width / t)
            canvas[y_axis : y_axis + 4, x] = 80

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    draw.text((2, top_h // 2 - 6), "area", fill=(60, 60, 60))
    for slot in range(k):
        y0 = top_h + gap + slot * lane_height
        colour = tuple(int(c) for c in PALETTE[slot % len(PALETTE)])
        draw.text((2, y0 + lane_height // 2 - 6), f"slot {slot}", fill=colour)
    draw.text((left, y_axis + 2), "frame 0", fill=(60, 60, 60))
    end = f"{t - 1}"
    draw.text((left + width - 6 * len(end), y_axis + 2), end, fill=(60, 60, 60))
    if title and width >= 6 * len(title) + 120:  # room between the two frame numbers
        draw.text((left + width // 2 - 3 * len(title), y_axis + 2), title, fill=(60, 60, 60))
    return np.asarray(image)


class OverlayVideo:
    """Frames beside their slot masks, written as they come: GIF (imageio) or mp4 (PyAV)."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps
        self.gif: list[np.ndarray] = []
        self.container = self.stream = None

    def add(self, images: np.ndarray) -> None:
        if self.path.suffix == ".gif":
            self.gif.extend(images)
            return
        import av

        if self.container is None:
            self.container = av.open(str(self.path), "w")
            self.stream = self.container.add_stream("libx264", rate=max(1, round(self.fps)))
            self.stream.height, self.stream.width = images.shape[1:3]
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": "18"}
        for image in images:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            for packet in self.stream.encode(frame):
                self.container.mux(packet)

    def close(self) -> None:
        if self.path.suffix == ".gif":
            import imageio.v2 as imageio

            imageio.mimsave(self.path, self.gif, duration=1000.0 / self.fps, loop=0)
        elif self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
