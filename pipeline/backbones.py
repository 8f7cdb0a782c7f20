"""Frozen image encoders that turn frames into patch-token features.

Every encoder is a :class:`FrozenEncoder`: it takes float images in [0, 1] of shape
(B, 3, S, S) with S = ``input_size``, normalises them itself, and returns patch features
(B, N, D) with N = grid[0] * grid[1] (prefix tokens such as CLS and registers dropped).
``describe()`` says everything that changes the features' bytes; the extraction
fingerprint and the store's attrs record it.

``build_backbone(cfg.backbone)`` picks the encoder from ``backbone.name``:

- ``patch-pixels``: parameter-free, each patch's normalised pixels (optionally through a fixed
  random projection, ``backbone.proj_dim``); runs offline with no weights (the demo).
- ``vit-tiny-test``: a 2-block ViT (dim 32, 4 heads, patch 8), randomly initialised with a fixed
  seed, so tests can run a real ViT in milliseconds. Its features mean nothing.
- a silicon-menagerie ViT (``dino_say_vitb14``, ``mugs_a_vits16``, ``mae_y_vitl16``, ... see
  :data:`SILICON_MODELS`): a timm ``VisionTransformer`` of the published shape, weights from
  ``backbone.checkpoint``, ``$EGOSLOTS_WEIGHTS/<name>.pth``, or by name: ``<name>.pth`` of the
  Hugging Face repo ``eminorhan/<name>``, fetched into the Hugging Face cache on first use.
- ``self``: the encoder ``egoslots pretrain-encoder`` trained on the user's own frames (stage 0),
  ``<backbone.encoder_run>/encoder.pth`` or ``backbone.checkpoint``: silicon-menagerie's DINO
  layout, loaded exactly as a silicon-menagerie ViT, its shape read from ``encoder.json``.
- any timm ViT name (``vit_base_patch14_dinov2``, ``vit_small_patch14_reg4_dinov2``, ...),
  weights from ``backbone.checkpoint``, ``$EGOSLOTS_WEIGHTS/<name>.pth``, timm's local caches,
  or fetched by name as timm's ``pretrained=True`` would.

Downloads respect ``HF_HUB_OFFLINE=1`` (see :mod:`egoslots.pipeline.checkpoints`). The feature is the output of block ``backbone.block`` (0-based as in
timm's ``blocks.N``, negative counts from the end; default the last block, so SlotContrast's
``vit_block12`` is block 11), before the final norm unless ``backbone.final_norm``. Blocks after
the chosen one are dropped from the model. For an input size other than the checkpoint's, the
position embedding is resampled bicubically once at load: without antialiasing for
silicon-menagerie models (as DINO and MAE do, though with the target size rather than DINO's
``+0.1`` scale factor), with timm's default (antialiased) for timm models, exactly what
``timm.create_model(name, pretrained=True, img_size=S)`` would give.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from egoslots.pipeline import checkpoints
from egoslots.pipeline.checkpoints import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TINY_TEST_VIT = "vit-tiny-test"

# silicon-menagerie architectures: patch size, embed dim, depth, heads.
SILICON_ARCHS = {
    "vits16": (16, 384, 12, 6),
    "vitb16": (16, 768, 12, 12),
    "vitl16": (16, 1024, 24, 16),
    "vitb14": (14, 768, 12, 12),
}
SILICON_MODELS = frozenset(
    [f"dino_{d}_vitb14" for d in ("say", "s", "a", "y", "sfp")]
    + [
        f"dino_{d}_vitb14"
        for d in (
            "imagenet100",
            "imagenet10",
            "imagenet3",
            "imagenet1",
            "kinetics-200h",
            "ego4d-200h",
        )
    ]
    + [
        f"{alg}_{d}_{arch}"
        for alg in ("dino", "mugs", "mae")
        for d in ("say", "s", "a", "y")
        for arch in ("vits16", "vitb16", "vitl16")
    ]
)
SILICON_RESNEXTS = frozenset(f"dino_{d}_resnext50" for d in ("say", "s", "a", "y", "sfp"))
# Checkpoint keys that belong to the training setup, not the backbone (left over, not errors):
# DINO's projection head, Mugs' three heads and relation blocks, MAE's decoder and mask token.
TRAINING_ONLY = {
    "dino": ("head.",),
    "mugs": ("head.", "instance_head.", "local_group_head.", "group_head.", "relation_blocks."),
    "mae": ("decoder", "mask_token"),
}


class BackboneError(ValueError):
    """A backbone that cannot be built or loaded; the message says what to fix."""


class FrozenEncoder(nn.Module):
    """Base class: normalisation, the frozen flag, and the description."""

    name: str
    patch_size: int
    input_size: int
    feature_dim: int
    checkpoint_sha256: str | None = None

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    @property
    def grid(self) -> tuple[int, int]:
        side = self.input_size // self.patch_size
        return side, side

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def freeze(self) -> FrozenEncoder:
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

    def __init__(
        self,
        input_size: int,
        patch_size: int = 8,
        proj_dim: int | None = None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        seed: int = 0,
    ):
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


def resolve_block(name: str, block: int | None, depth: int) -> int:
    """``backbone.block`` as a block index in 0..depth-1 (None = the last block)."""
    index = depth - 1 if block is None else int(block)
    if not -depth <= index < depth:
        raise BackboneError(
            f"backbone.block={block} is out of range: {name} has {depth} blocks, numbered 0..{depth - 1} "
            f"(or -{depth}..-1); SlotContrast's vit_block{depth} is block {depth - 1}"
        )
    return index % depth


class ViTEncoder(FrozenEncoder):
    """A timm ViT cut after the chosen block: patch tokens of that block, prefix tokens dropped."""

    def __init__(
        self,
        vit: nn.Module,
        name: str,
        block: int | None = None,
        final_norm: bool = False,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        checkpoint_sha256: str | None = None,
        pos_embed_resample: str = "none",
    ):
        super().__init__(mean, std)
        self.block = resolve_block(name, block, len(vit.blocks))
        self.final_norm = bool(final_norm)
        vit.prune_intermediate_layers([self.block], prune_norm=not self.final_norm, prune_head=True)
        self.vit = vit
        self.name = name
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.input_size = int(vit.patch_embed.img_size[0])
        self.feature_dim = int(vit.embed_dim)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.checkpoint_sha256 = checkpoint_sha256
        self.pos_embed_resample = pos_embed_resample

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"{self.name} expects images of {self.input_size}x{self.input_size}, "
                f"got {tuple(images.shape)}"
            )
        x = self.normalise(images)  # (B, 3, S, S)
        (feats,) = self.vit.forward_intermediates(
            x,
            indices=[self.block],
            norm=self.final_norm,
            output_fmt="NLC",
            intermediates_only=True,
            stop_early=True,
        )  # prefix tokens already split off
        return feats  # (B, N, D)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "block": self.block,
            "final_norm": self.final_norm,
            "num_prefix_tokens": self.num_prefix_tokens,
            "pos_embed_resample": self.pos_embed_resample,
        }


# --------------------------------------------------------------------------- building models


def silicon_vit(arch: str, input_size: int, weight_init: str = "") -> nn.Module:
    """An untrained silicon-menagerie ViT (DINO-style: CLS token, qkv bias, LayerNorm eps 1e-6);
    ``weight_init="skip"`` leaves the weights uninitialised (they are about to be loaded)."""
    patch, dim, depth, heads = SILICON_ARCHS[arch]
    return dino_vit(input_size, patch, dim, depth, heads, weight_init=weight_init)


def dino_vit(
    input_size: int,
    patch: int,
    dim: int,
    depth: int,
    heads: int,
    mlp_ratio: float = 4.0,
    weight_init: str = "",
    drop_path_rate: float = 0.0,
    dynamic_img_size: bool = False,
) -> nn.Module:
    """A timm ViT with the shape and parameter names of DINO's ``vision_transformer.py`` (CLS
    token, qkv bias, LayerNorm eps 1e-6, learned position embedding): silicon-menagerie's models
    and the encoders ``egoslots pretrain-encoder`` trains. ``dynamic_img_size`` resamples the
    position embedding for other input sizes at every call (DINO's local crops)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=input_size,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        class_token=True,
        global_pool="token",
        num_classes=0,
        weight_init=weight_init,
        drop_path_rate=drop_path_rate,
        dynamic_img_size=dynamic_img_size,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


def tiny_test_vit(input_size: int, seed: int = 0) -> nn.Module:
    """The 2-block, dim-32, patch-8 ViT behind ``vit-tiny-test``, the same on every call."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(
            img_size=input_size, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0
        )


def build_silicon(name: str, input_size: int, checkpoint: str | None) -> tuple[nn.Module, Path]:
    alg, _, arch = name.split("_")
    path = checkpoints.locate(name, checkpoint)
    model = checkpoints.load_model(
        lambda: silicon_vit(arch, input_size, "skip"),
        path,
        name,
        TRAINING_ONLY[alg],
        resample=checkpoints.resample_pos_embed_dino,
    )
    return model, path


@contextlib.contextmanager
def hub_offline():
    """Hugging Face hub offline mode while timm builds a model (belt and braces: egoslots only
    calls ``create_model(pretrained=False)`` and finds or fetches weights itself)."""
    import huggingface_hub.constants as hub

    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


SELF_TRAINED = "self"  # the encoder `egoslots pretrain-encoder` trained (stage 0)
SELF_TRAINED_JSON = "encoder.json"  # its architecture, beside the weights file


def build_self_trained(
    input_size: int, checkpoint: str | None, encoder_run: str | None
) -> tuple[nn.Module, Path, dict]:
    """The encoder of a ``pretrain-encoder`` run: ``backbone.checkpoint`` if set, else
    ``<backbone.encoder_run>/encoder.pth``. The file holds silicon-menagerie's DINO layout
    (``teacher`` with ``backbone.`` keys) and loads exactly as ``dino_say_vitb14`` does; its
    architecture comes from ``encoder.json`` beside it. Returns (ViT, weights path, that JSON)."""
    import json

    if checkpoint:
        path = checkpoints.explicit_checkpoint(checkpoint)
    elif encoder_run:
        path = Path(encoder_run).expanduser() / "encoder.pth"
        if not path.is_file():
            raise BackboneError(
                f"backbone.name={SELF_TRAINED}: no trained encoder at {path}: run `egoslots "
                "pretrain-encoder CONFIG` first (`egoslots run CONFIG` does it for you), or set "
                "backbone.checkpoint=RUN/encoder.pth"
            )
    else:
        raise BackboneError(
            f"backbone.name={SELF_TRAINED} needs backbone.encoder_run (a pretrain-encoder run "
            "directory) or backbone.checkpoint=RUN/encoder.pth"
        )
    meta_path = path.with_name(SELF_TRAINED_JSON)
    try:
        meta = json.loads(meta_path.read_text())
        arch = meta["arch"]
        shape = [int(arch[k]) for k in ("patch_size", "embed_dim", "depth", "num_heads")]
        mlp_ratio = float(arch["mlp_ratio"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BackboneError(
            f"backbone.name={SELF_TRAINED}: {meta_path} (the encoder's architecture, written by "
            f"`egoslots pretrain-encoder` beside {path.name}) is missing or unreadable: {err}"
        ) from err
    check_patch_grid(SELF_TRAINED, input_size, shape[0], None)
    model = checkpoints.load_model(
        lambda: dino_vit(input_size, *shape, mlp_ratio=mlp_ratio, weight_init="skip"),
        path,
        SELF_TRAINED,
        TRAINING_ONLY["dino"],
        resample=checkpoints.resample_pos_embed_dino,
    )
    return model, path, meta


def build_timm(
    name: str,
    input_size: int,
    checkpoint: str | None,
    cfg_patch_size: int | None = None,
    block: int | None = None,
) -> tuple[nn.Module, Path]:
    import timm

    def build() -> nn.Module:
        with hub_offline():
            return timm.create_model(name, pretrained=False, img_size=input_size, num_classes=0)

    try:
        with torch.device("meta"):
            skeleton = build()
    except TypeError as err:  # e.g. a CNN has no img_size argument
        raise BackboneError(f"backbone.name={name} is a timm model but not a ViT: {err}") from err
    for attr in (
        "forward_intermediates",
        "prune_intermediate_layers",
        "patch_embed",
        "blocks",
        "num_prefix_tokens",
    ):
        if not hasattr(skeleton, attr):
            raise BackboneError(
                f"backbone.name={name} is a timm model but not a ViT egoslots can cut "
                f"after a block (it lacks {attr})"
            )
    check_patch_grid(name, input_size, int(skeleton.patch_embed.patch_size[0]), cfg_patch_size)
    resolve_block(name, block, len(skeleton.blocks))
    path = checkpoints.locate(name, checkpoint, skeleton.pretrained_cfg)
    filter_fn = getattr(sys.modules[type(skeleton).__module__], "checkpoint_filter_fn", None)
    return checkpoints.load_model(build, path, name, ("head.",), filter_fn=filter_fn), path


def build_backbone(cfg: Any) -> FrozenEncoder:
    """Build the frozen encoder a config's ``backbone`` section names (weights fetched by name
    on first use unless a local file is given or ``HF_HUB_OFFLINE=1``)."""
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    name = get("name")
    input_size = int(get("input_size"))
    mean, std = (tuple(float(v) for v in x) if x else None for x in (get("mean"), get("std")))
    if name == "patch-pixels":
        return PatchPixels(
            input_size,
            int(get("patch_size") or 8),
            get("proj_dim"),
            mean or IMAGENET_MEAN,
            std or IMAGENET_STD,
        ).freeze()

    import timm  # not needed (and slow to import) for patch-pixels

    if get("proj_dim"):
        raise BackboneError(
            f"backbone.proj_dim applies to patch-pixels only, not backbone.name={name}"
        )
    if name in SILICON_RESNEXTS:
        raise BackboneError(
            f"backbone.name={name} is a silicon-menagerie ResNeXt, not a ViT: egoslots "
            f"needs patch tokens; use e.g. {name.rsplit('_', 1)[0]}_vitb14"
        )
    cfg_patch_size = get("patch_size")
    sha = None
    pos_embed_resample = "bicubic"
    try:
        if name == TINY_TEST_VIT:
            check_patch_grid(name, input_size, 8, cfg_patch_size)
            vit = tiny_test_vit(input_size)
        elif name == SELF_TRAINED:
            if cfg_patch_size:
                raise BackboneError(
                    f"backbone.patch_size={cfg_patch_size} is for patch-pixels only: the "
                    f"{SELF_TRAINED} encoder's patch size comes from its encoder.json"
                )
            vit, path, meta = build_self_trained(input_size, get("checkpoint"), get("encoder_run"))
            sha = checkpoints.sha256_file(path)
            mean, std = mean or tuple(meta.get("mean", ())), std or tuple(meta.get("std", ()))
        elif name in SILICON_MODELS:
            patch, _, depth, _ = SILICON_ARCHS[name.split("_")[2]]
            check_patch_grid(name, input_size, patch, cfg_patch_size)
            resolve_block(name, get("block"), depth)  # a bad block fails before a slow load
            vit, path = build_silicon(name, input_size, get("checkpoint"))
            sha = checkpoints.sha256_file(path)
        elif timm.is_model(name):
            vit, path = build_timm(
                name, input_size, get("checkpoint"), cfg_patch_size, get("block")
            )
            sha = checkpoints.sha256_file(path)
            pos_embed_resample = "bicubic-antialias"
            mean, std = mean or vit.pretrained_cfg.get("mean"), std or vit.pretrained_cfg.get("std")
        else:
            raise BackboneError(_unknown_name(name))
    except CheckpointError as err:
        raise BackboneError(str(err)) from err
    encoder = ViTEncoder(
        vit,
        name,
        get("block"),
        bool(get("final_norm")),
        mean or IMAGENET_MEAN,
        std or IMAGENET_STD,
        sha,
        pos_embed_resample,
    )
    return encoder.freeze()


def check_patch_grid(name: str, input_size: int, patch: int, cfg_patch_size: int | None) -> None:
    """The input must tile into whole patches; ``backbone.patch_size`` is for patch-pixels only."""
    if cfg_patch_size and int(cfg_patch_size) != patch:
        raise BackboneError(
            f"backbone.patch_size={cfg_patch_size}, but {name} has patch size {patch} "
            f"(leave backbone.patch_size unset for ViTs)"
        )
    if input_size % patch:
        raise BackboneError(
            f"backbone.input_size={input_size} is not a multiple of {name}'s patch size "
            f"{patch} (e.g. {input_size // patch * patch} or {(input_size // patch + 1) * patch})"
        )


def _unknown_name(name: Any) -> str:
    import timm

    known = [
        "patch-pixels",
        TINY_TEST_VIT,
        SELF_TRAINED,
        *sorted(SILICON_MODELS),
        *timm.list_models(),
    ]
    close = difflib.get_close_matches(str(name), known, n=6, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    return (
        f"unknown backbone.name={name}: not patch-pixels, {TINY_TEST_VIT}, {SELF_TRAINED} (the "
        f"encoder `egoslots pretrain-encoder` trains), a silicon-menagerie ViT or a timm model{hint}"
    )
