"""DINO's multi-crop augmentation, with random draws that depend only on (seed, sample position).

The crops are lightly's :class:`~lightly.transforms.DINOTransform`, which computes DINO's
``DataAugmentationDINO`` (main_dino.py): two global crops (random resized crop of scale
``global_scale``, flip, colour jitter with probability 0.8 and strengths (0.4, 0.4, 0.2, 0.1),
grayscale 0.2, Gaussian blur 1.0 / 0.1, solarisation 0.2 on the second) and ``num_local``
local crops (scale ``local_scale``, blur 0.5), normalised with the ImageNet mean and std.

Its transforms draw from the global torch, numpy and ``random`` generators. Each sample's crops
are drawn with those three seeded from (seed, position of the sample in the run's sample
stream) and restored afterwards, so the crops of a sample are the same whichever DataLoader
worker makes them, in a resumed run and on every DDP rank layout.
"""

from __future__ import annotations

import random
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@contextmanager
def seeded_global_rngs(seed: int, position: int):
    """Seed torch's CPU generator, numpy's and ``random``'s from (seed, position); restore all
    three afterwards."""
    state = np.random.SeedSequence([int(seed), int(position)]).generate_state(2, dtype=np.uint64)
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(state[0]))
        np.random.seed(int(state[1] % (1 << 32)))
        random.seed(int(state[1]))
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class MultiCrop:
    """uint8 frame (S, S, 3) + stream position -> [global 1, global 2, local 1, ...] float
    tensors (3, s, s), normalised."""

    def __init__(
        self,
        image_size: int,
        local_size: int,
        num_local: int,
        global_scale=(0.4, 1.0),
        local_scale=(0.05, 0.4),
        hflip: float = 0.5,
        color_jitter: float = 0.8,
        color_strength: float = 1.0,
        grayscale: float = 0.2,
        blur=(1.0, 0.1, 0.5),
        blur_sigma=(0.1, 2.0),
        solarize: float = 0.2,
        seed: int = 0,
        normalize: dict | None = None,
    ):
        from lightly.transforms import DINOTransform

        self.seed = int(seed)
        self.num_views = 2 + int(num_local)
        # lightly scales DINO's jitter strengths (0.8, 0.8, 0.4, 0.2) by cj_strength=0.5, except
        # for the second global view (its cj_strength is not passed on): scale the four instead.
        strengths = {
            f"cj_{k}": v * float(color_strength)
            for k, v in {"bright": 0.8, "contrast": 0.8, "sat": 0.4, "hue": 0.2}.items()
        }
        self.transform = DINOTransform(
            global_crop_size=int(image_size),
            global_crop_scale=tuple(float(v) for v in global_scale),
            local_crop_size=int(local_size),
            local_crop_scale=tuple(float(v) for v in local_scale),
            n_local_views=int(num_local),
            hf_prob=float(hflip),
            cj_prob=float(color_jitter),
            cj_strength=0.5,
            **strengths,
            random_gray_scale=float(grayscale),
            gaussian_blur=tuple(float(v) for v in blur),
            sigmas=tuple(float(v) for v in blur_sigma),
            solarization_prob=float(solarize),
            normalize=normalize or IMAGENET,
        )

    def __call__(self, frame: np.ndarray, position: int) -> list[torch.Tensor]:
        image = Image.fromarray(np.ascontiguousarray(frame))
        with seeded_global_rngs(self.seed, position), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision: ToTensor is deprecated
            return self.transform(image)
