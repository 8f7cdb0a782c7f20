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

import math
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
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


@dataclass(frozen=True)
class CropRecipe:
    """What DINO's multi-crop draws: sizes, scale ranges and probabilities (DINO's defaults).

    ``blur`` holds the blur probabilities of (global 1, global 2, local); ``solarize`` applies to
    the second global crop only; ``color_strength`` multiplies DINO's jitter strengths
    (0.4, 0.4, 0.2, 0.1); ``normalize`` is the mean and std (ImageNet's by default)."""

    image_size: int
    local_size: int
    num_local: int
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    hflip: float = 0.5
    color_jitter: float = 0.8
    color_strength: float = 1.0
    grayscale: float = 0.2
    blur: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.2
    normalize: dict | None = None

    @classmethod
    def from_config(cls, p) -> CropRecipe:
        """The recipe of a ``pretrain_encoder`` config section."""
        return cls(
            int(p.image_size),
            int(p.local_size),
            int(p.num_local_crops),
            global_scale=tuple(p.global_scale),
            local_scale=tuple(p.local_scale),
            hflip=float(p.hflip),
            color_jitter=float(p.color_jitter),
            color_strength=float(p.color_strength),
            grayscale=float(p.grayscale),
            blur=tuple(p.blur),
            blur_sigma=tuple(p.blur_sigma),
            solarize=float(p.solarize),
        )


class MultiCrop:
    """uint8 frame (S, S, 3) + stream position -> [global 1, global 2, local 1, ...] float
    tensors (3, s, s), normalised."""

    def __init__(self, recipe: CropRecipe, seed: int = 0):
        from lightly.transforms import DINOTransform

        r = recipe
        self.seed = int(seed)
        self.num_views = 2 + int(r.num_local)
        # lightly scales DINO's jitter strengths (0.8, 0.8, 0.4, 0.2) by cj_strength=0.5, except
        # for the second global view (its cj_strength is not passed on): scale the four instead.
        strengths = {
            f"cj_{k}": v * float(r.color_strength)
            for k, v in {"bright": 0.8, "contrast": 0.8, "sat": 0.4, "hue": 0.2}.items()
        }
        self.transform = DINOTransform(
            global_crop_size=int(r.image_size),
            global_crop_scale=tuple(float(v) for v in r.global_scale),
            local_crop_size=int(r.local_size),
            local_crop_scale=tuple(float(v) for v in r.local_scale),
            n_local_views=int(r.num_local),
            hf_prob=float(r.hflip),
            cj_prob=float(r.color_jitter),
            cj_strength=0.5,
            **strengths,
            random_gray_scale=float(r.grayscale),
            gaussian_blur=tuple(float(v) for v in r.blur),
            sigmas=tuple(float(v) for v in r.blur_sigma),
            solarization_prob=float(r.solarize),
            normalize=r.normalize or IMAGENET,
        )

    def __call__(self, frame: np.ndarray, position: int) -> list[torch.Tensor]:
        image = Image.fromarray(np.ascontiguousarray(frame))
        with seeded_global_rngs(self.seed, position), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision: ToTensor is deprecated
            return self.transform(image)


# --------------------------------------------------------------------------------------------
# The same crops for a whole batch at once, in torch (on the training device)
# --------------------------------------------------------------------------------------------
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, h, w) -> (n, 1, h, w)."""
    w = x.new_tensor(GRAY).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (RGB -> HSV, hue + shift mod 1, -> RGB) with a shift per image;
    HSV -> RGB as channel_n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 hue) mod 6."""
    maxc, argmax = x.max(1)  # (n, h, w)
    minc = x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, 1.0)
    sat = delta / torch.where(maxc > 0, maxc, 1.0)
    r, g, b = x.unbind(1)
    hue = torch.where(
        argmax == 0, g - b, torch.where(argmax == 1, 2 * safe + b - r, 4 * safe + r - g)
    )
    hue = torch.where(delta > 0, hue / (6 * safe), 0.0) + shift.view(-1, 1, 1)
    n = x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = (n + 6 * hue[:, None]) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return maxc[:, None] * (1 - sat[:, None] * ramp)


def _jitter_op(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    """ColorJitter's four operations on float images in [0, 1], one factor per image."""
    f = factor.view(-1, 1, 1, 1)
    if op == 0:  # brightness
        return (x * f).clamp(0, 1)
    if op == 1:  # contrast: blend with the mean grey level
        return (f * x + (1 - f) * _gray(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)
    if op == 2:  # saturation: blend with the grey image
        return (f * x + (1 - f) * _gray(x)).clamp(0, 1)
    return _adjust_hue(x, factor)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (0: unchanged), reflect padding."""
    n, c, h, w = x.shape
    radius = min(int(math.ceil(3 * float(sigma.max()))), (min(h, w) - 1) // 2)
    if radius < 1:
        return x
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-6).view(-1, 1)
    kernel = torch.exp(-0.5 * (taps / s) ** 2)
    kernel = torch.where(sigma.view(-1, 1) > 0, kernel, (taps == 0).to(x.dtype).expand_as(kernel))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, k)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


class BatchMultiCrop:
    """DINO's multi-crop for a whole batch in torch, e.g. on the GPU in the training step:
    uint8 frames (B, S, S, 3) + each frame's random draws (:meth:`params`, made from its stream
    position) -> [global 1, global 2, local ...], each (B, 3, s, s) normalised.

    Draws what :class:`MultiCrop` (DINO's ``DataAugmentationDINO`` via lightly) draws, with the
    same probabilities and ranges, from a generator keyed by (seed, position): random resized
    crop (torchvision's 10-attempt sampler), flip, colour jitter in a random order, grayscale,
    Gaussian blur, solarisation. Deliberate differences, for speed (no per-image Python and
    PIL work): crops are resized with area-averaged bilinear sampling (``roi_align``) instead of
    PIL's bicubic, the blur is an exact Gaussian instead of PIL's box approximation, and every
    operation works on float images instead of rounding to uint8 after each step.
    """

    def __init__(self, recipe: CropRecipe, seed: int = 0):
        r = recipe
        norm = r.normalize or IMAGENET
        self.mean, self.std = norm["mean"], norm["std"]
        self.seed, self.hflip, self.jitter, self.gray = (
            int(seed),
            r.hflip,
            r.color_jitter,
            r.grayscale,
        )
        s = float(r.color_strength)
        self.strength = (0.4 * s, 0.4 * s, 0.2 * s, 0.1 * s)  # brightness, contrast, sat, hue
        self.sigma = tuple(float(v) for v in r.blur_sigma)
        # (size, scale range, blur probability, solarize probability) per view
        self.views = [
            (int(r.image_size), tuple(r.global_scale), float(r.blur[0]), 0.0),
            (int(r.image_size), tuple(r.global_scale), float(r.blur[1]), float(r.solarize)),
        ] + [(int(r.local_size), tuple(r.local_scale), float(r.blur[2]), 0.0)] * int(r.num_local)
        self.num_views = len(self.views)

    @staticmethod
    def _crop_box(rng: random.Random, side: int, scale: tuple) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params (ratio 3/4..4/3): (top, left, h, w)."""
        area, log_ratio = side * side, (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= side and 0 < h <= side:
                return rng.randint(0, side - h), rng.randint(0, side - w), h, w
        return 0, 0, side, side  # the whole (square) frame: its ratio is within bounds

    def draw(self, position: int, side: int) -> list[list[float]]:
        """Per view: top, left, h, w, flip, jitter?, 4 factors, 4-op order, gray?, sigma, solarize?"""
        rng = random.Random((self.seed << 40) + int(position))
        out = []
        for _, scale, blur_p, sol_p in self.views:
            top, left, h, w = self._crop_box(rng, side, scale)
            flip = rng.random() < self.hflip
            jitter = rng.random() < self.jitter
            b, c, s, hue = self.strength
            factors = [rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c)]
            factors += [rng.uniform(1 - s, 1 + s), rng.uniform(-hue, hue)]
            order = rng.sample(range(4), 4)
            gray = rng.random() < self.gray
            sigma = rng.uniform(*self.sigma) if rng.random() < blur_p else 0.0
            sol = rng.random() < sol_p
            out.append([top, left, h, w, flip, jitter, *factors, *order, gray, sigma, sol])
        return out

    def params(self, position: int, side: int) -> torch.Tensor:
        """:meth:`draw` as a (views, 17) tensor (DataLoader workers make it beside the frame)."""
        return torch.tensor(self.draw(position, side), dtype=torch.float32)

    def __call__(self, frames: torch.Tensor, params: torch.Tensor) -> list[torch.Tensor]:
        """uint8 frames (B, S, S, 3) and their :meth:`params` (B, views, 17) -> the views."""
        from torchvision.ops import roi_align

        n = frames.shape[0]
        x = frames.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, S, S)
        params = params.to(x.device)
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        views = []
        for v, (size, *_rest) in enumerate(self.views):
            p = params[:, v]
            top, left, h, w = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
            boxes = torch.stack([torch.arange(n, device=x.device, dtype=p.dtype), left, top,
                                 left + w, top + h], 1).to(x.dtype)  # fmt: skip
            y = roi_align(x, boxes, (size, size), 1.0, 0, True)  # (B, 3, s, s)
            y = torch.where(p[:, 4].bool().view(-1, 1, 1, 1), y.flip(-1), y)
            jitter = p[:, 5].bool()
            for k in range(4):  # the k-th operation of each image's random order
                for op in range(4):
                    pick = torch.nonzero(jitter & (p[:, 10 + k] == op)).flatten()
                    if len(pick):
                        y[pick] = _jitter_op(y[pick], op, p[pick, 6 + op].to(y.dtype))
            y = torch.where(p[:, 14].bool().view(-1, 1, 1, 1), _gray(y).expand_as(y), y)
            y = _gaussian_blur(y, p[:, 15])
            solar = p[:, 16].bool().view(-1, 1, 1, 1) & (y >= 128 / 255)
            y = torch.where(solar, 1 - y, y)
            views.append((y - mean) / std)
        return views
