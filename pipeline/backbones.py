"""Frozen image encoders that turn frames into patch-token features.

Every encoder is a :class:`FrozenEncoder`: it takes float images in [0, 1] of shape
(B, 3, S, S) with S = ``input_size``, normalises them itself, and returns patch features
(B, N, D) with N = grid[0] * grid[1] (prefix tokens such as CLS and registers dropped).
``describe()`` says everything that changes the features' bytes; the extraction
fingerprint and the store's attrs record it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(ValueError):
    """A backbone that cannot be built or loaded; the message says what to fix."""


class FrozenEncoder(nn.Module):
    """Base class: normalisation, the frozen flag, and the description."""

    name: str
    patch_size: int
    input_size: int
    feature_dim: int
    checkpoint_sha256: Optional[str] = None

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.input_size // self.patch_size
        return side, side

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def freeze(self) -> "FrozenEncoder":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "patch_size": self.patch_size,
            "input_size": self.input_size,
            "feature_dim": self.feature_dim,
            "grid": list(self.grid),
            "mean": [float(x) for x in self.mean.flatten()],
            "std": [float(x) for x in self.std.flatten()],
            "checkpoint_sha256": self.checkpoint_sha256,
        }


class PatchPixels(FrozenEncoder):
    """Parameter-free encoder: each patch's normalised RGB values, flattened (D = 3 p^2),
    optionally through a fixed random orthogonal projection (seeded, so always the same).

    Lets the whole pipeline run offline with no weights at all (the demo default).
    """

    def __init__(self, input_size: int, patch_size: int = 8, proj_dim: Optional[int] = None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int = 0):
        super().__init__(mean, std)
        if input_size % patch_size:
            raise BackboneError(
                f"backbone.input_size={input_size} is not divisible by backbone.patch_size={patch_size}"
            )
        self.name = "patch-pixels"
        self.input_size = input_size
        self.patch_size = patch_size
        raw_dim = 3 * patch_size * patch_size
        self.proj_dim = proj_dim
        if proj_dim:
            gen = torch.Generator().manual_seed(seed)
            q, _ = torch.linalg.qr(torch.randn(raw_dim, max(raw_dim, proj_dim), generator=gen))
            self.register_buffer("projection", q[:, :proj_dim].contiguous(), persistent=False)
        self.feature_dim = proj_dim or raw_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalise(images)  # (B, 3, S, S)
        p = self.patch_size
        patches = nn.functional.unfold(x, kernel_size=p, stride=p)  # (B, 3*p*p, N)
        feats = patches.transpose(1, 2)  # (B, N, 3*p*p)
        if self.proj_dim:
            feats = feats @ self.projection.to(feats.dtype)  # (B, N, proj_dim)
        return feats

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "proj_dim": self.proj_dim}


def build_backbone(cfg: Any) -> FrozenEncoder:
    """Build the frozen encoder a config's ``backbone`` section names (no downloads, ever)."""
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    name = get("name")
    mean = get("mean") or IMAGENET_MEAN
    std = get("std") or IMAGENET_STD
    if name == "patch-pixels":
        return PatchPixels(int(get("input_size")), int(get("patch_size") or 8), get("proj_dim"), mean, std).freeze()
    raise BackboneError(f"unknown backbone.name '{name}'")
