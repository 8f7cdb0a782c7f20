"""Slot masks drawn over frames: one fixed colour per slot, for TensorBoard and `visualize`.

Colours are fixed by slot index (tab20, strong ones first), so a slot keeps its colour over
time and a colour change means the object changed slot.
"""

from __future__ import annotations

import numpy as np
import torch

from egoslots.pipeline.metrics import masks_to_labels

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
    frames: np.ndarray, masks: torch.Tensor, grid: tuple[int, int] | None, alpha: float = 0.55
) -> np.ndarray:
    """Frames (T, S, S, 3) uint8 and soft slot masks (T, K, N) on ``grid`` (None: square) ->
    (T, S, S, 3) uint8, each pixel in the colour of its arg-max slot (masks resized bilinearly),
    blended over the frame with ``alpha`` (1: solid slot colours, identities easiest to follow)."""
    size = frames.shape[1:3]
    labels = masks_to_labels(masks.detach().float().cpu(), size, grid).numpy()
    return overlay(frames, labels, alpha)
