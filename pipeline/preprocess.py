"""Frame preprocessing for extraction: square crop, resize, flip.

Non-square frames are resized so that the shorter side matches the target, then centre-cropped
to a square (as SlotContrast does for YT-VIS). RGB uses antialiased bilinear resizing (what
PIL and torchvision's ``antialias=True`` do); masks are label maps, so they use nearest
neighbour ("nearest-exact": pixel centres, no shift) with the same crop. The ViT input is made
at ``backbone.input_size`` and the cached frames and masks at ``extract.frame_size``, each
straight from the original frame (never resized twice).

Everything here works on uint8 tensors so that DataLoader workers send compact batches; the
model side scales to [0, 1] itself. ``describe_preprocessing`` is part of the extraction
fingerprint: bump ``PREPROCESS_VERSION`` whenever a change here changes output bytes.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

PREPROCESS_VERSION = 1


def describe_preprocessing(input_size: int, frame_size: int) -> dict:
    """What the fingerprint records about preprocessing."""
    return {
        "version": PREPROCESS_VERSION,
        "geometry": "resize shorter side, centre-crop square",
        "rgb_interpolation": "bilinear, antialiased, uint8",
        "mask_interpolation": "nearest-exact",
        "input_size": int(input_size),
        "frame_size": int(frame_size),
    }


def _square(image: torch.Tensor, size: int, interpolation: InterpolationMode) -> torch.Tensor:
    """(C, H, W) -> (C, size, size): shorter side to ``size``, then the centre square."""
    h, w = image.shape[-2:]
    if (h, w) != (size, size):
        if min(h, w) != size:
            antialias = interpolation == InterpolationMode.BILINEAR
            image = TF.resize(image, [size], interpolation=interpolation, antialias=antialias)
        image = TF.center_crop(image, [size, size])
    return image


def resize_rgb(rgb: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) uint8, resized shorter side + centre crop."""
    image = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1)  # (3, H, W)
    return _square(image, size, InterpolationMode.BILINEAR).contiguous()


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) uint8 label map -> (size, size) uint8, nearest neighbour with the RGB's crop."""
    image = torch.from_numpy(np.require(mask, requirements=["C", "W"]))[None]  # (1, H, W)
    return _square(image, size, InterpolationMode.NEAREST_EXACT)[0].contiguous()


def preprocess_frame(
    rgb: np.ndarray, mask: np.ndarray | None, input_size: int, frame_size: int, hflip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One decoded frame -> (ViT input (3, I, I), cached frame (S, S, 3), cached mask (S, S) | None).

    ``hflip`` mirrors all three (the centre crop is symmetric, so flipping after cropping is
    the same as cropping the flipped frame).
    """
    vit = resize_rgb(rgb, input_size)  # (3, I, I)
    frame = vit if frame_size == input_size else resize_rgb(rgb, frame_size)  # (3, S, S)
    small_mask = None if mask is None else resize_mask(mask, frame_size)  # (S, S)
    if hflip:
        vit, frame = vit.flip(-1), frame.flip(-1)
        small_mask = None if small_mask is None else small_mask.flip(-1)
    return vit, frame.permute(1, 2, 0).contiguous(), small_mask
