"""DINO self-distillation of a ViT (stage 0, ``egoslots pretrain-encoder``): the maths.

Computes what facebookresearch/dino's ``main_dino.py`` computes (silicon-menagerie trained its
SAYCam ViTs with that code):

- student = ViT + DINO head; teacher = the same, started as a copy, updated only as an EMA of
  the student with a momentum that rises from ``momentum_teacher`` to 1 on a cosine
  (:func:`cosine_schedule`);
- the teacher sees the 2 global crops, the student every crop; the loss is the cross-entropy
  between the centred, sharpened teacher softmax (temperature ``teacher_temp``, linear warm-up)
  and the student's (``student_temp``) over every (teacher view, student view) pair of
  different views (lightly's :class:`~lightly.loss.DINOLoss`, which computes DINO's ``DINOLoss``
  including the all-reduced centre update);
- the head is lightly's :class:`~lightly.models.modules.DINOProjectionHead` (DINO's
  ``DINOHead``: 3-layer GELU MLP, l2-normalised bottleneck, weight-normalised last layer with
  its norm fixed at 1);
- AdamW with weight decay only on weights (not biases or norms), lr and weight decay on
  cosine schedules, each parameter's gradient clipped to norm ``clip_grad`` on its own
  (DINO's ``clip_gradients``), the head's last layer frozen for the first steps.

Deliberate differences: schedules count steps, not epochs; the ViT is timm's (parameter names
and shapes of DINO's ``vision_transformer.py``, built by :func:`egoslots.pipeline.backbones.dino_vit`)
and resamples its position embedding for local crops with timm's bicubic (antialiased)
resampling instead of DINO's ``interpolate_pos_encoding``; timm initialises the CLS token with
std 1e-6 (DINO 0.02).

The teacher's backbone is the encoder: :meth:`DINO.teacher_checkpoint` gives it in
silicon-menagerie's layout (``{"teacher": {"backbone.*", "head.*"}}``), which
``backbone.name: self`` loads like any silicon-menagerie checkpoint.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DinoArch:
    """The ViT and head shapes (what ``encoder.json`` records as ``arch``)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    image_size: int
    out_dim: int
    hidden_dim: int
    bottleneck_dim: int

    def as_dict(self) -> dict:
        return asdict(self)


def cosine_schedule(step: int, total: int, base: float, final: float, warmup: int = 0) -> float:
    """DINO's ``utils.cosine_scheduler`` at one step: linear warm-up from 0 to ``base`` over
    ``warmup`` steps, then a cosine from ``base`` to ``final`` over the remaining steps."""
    if step < warmup:
        return base * step / max(1, warmup - 1)  # np.linspace(0, base, warmup)[step]
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def teacher_temperature(step: int, warmup_temp: float, temp: float, warmup_steps: int) -> float:
    """Linear from ``warmup_temp`` to ``temp`` over ``warmup_steps``, then ``temp`` (DINO)."""
    if step >= warmup_steps:
        return temp
    return warmup_temp + (temp - warmup_temp) * step / max(1, warmup_steps - 1)


def dino_head(arch: DinoArch, norm_last_layer: bool = True) -> nn.Module:
    from lightly.models.modules import DINOProjectionHead

    with warnings.catch_warnings():  # torch deprecates nn.utils.weight_norm; DINO used it
        warnings.simplefilter("ignore", FutureWarning)
        return DINOProjectionHead(
            arch.embed_dim,
            arch.hidden_dim,
            arch.bottleneck_dim,
            arch.out_dim,
            norm_last_layer=norm_last_layer,
        )


class DINO(nn.Module):
    """Student and teacher (ViT + head each) and the DINO loss with its centre."""

    def __init__(
        self,
        arch: DinoArch,
        drop_path_rate: float = 0.1,
        norm_last_layer: bool = True,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ):
        from lightly.loss import DINOLoss

        from egoslots.pipeline.backbones import dino_vit

        super().__init__()
        self.arch = arch

        def vit(drop_path: float) -> nn.Module:
            return dino_vit(
                arch.image_size,
                arch.patch_size,
                arch.embed_dim,
                arch.depth,
                arch.num_heads,
                mlp_ratio=arch.mlp_ratio,
                drop_path_rate=drop_path,
                dynamic_img_size=True,  # local crops: the position embedding is resampled
            )

        self.student = nn.ModuleDict(
            {"backbone": vit(drop_path_rate), "head": dino_head(arch, norm_last_layer)}
        )
        self.teacher = nn.ModuleDict({"backbone": vit(0.0), "head": dino_head(arch)})
        self.teacher.load_state_dict(self.student.state_dict())  # the same start (DINO)
        self.teacher.requires_grad_(False)
        self.loss = DINOLoss(
            arch.out_dim,
            warmup_teacher_temp_epochs=0,
            student_temp=student_temp,
            center_momentum=center_momentum,
        )

    # -------------------------------------------------------------------- forward
    @staticmethod
    def _embed(net: nn.ModuleDict, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Head outputs (B, out_dim) per view. Views of one size go through the backbone in
        one batch (DINO's MultiCropWrapper), then the head runs once on all CLS tokens."""
        batch = views[0].shape[0]
        cls, start = [], 0
        while start < len(views):
            stop = start
            while stop < len(views) and views[stop].shape[-1] == views[start].shape[-1]:
                stop += 1
            cls.append(net["backbone"](torch.cat(views[start:stop])))  # (n*B, D), normed CLS
            start = stop
        return list(net["head"](torch.cat(cls)).split(batch))  # V x (B, out_dim)

    def forward(
        self, views: list[torch.Tensor], teacher_temp: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """views: [global 1, global 2, local 1, ...], each (B, 3, s, s) normalised images.
        Returns the loss and statistics of the teacher's distribution (before this step's
        centre update)."""
        with torch.no_grad():
            teacher_out = self._embed(self.teacher, views[:2])  # 2 x (B, K)
            stats = self.teacher_stats(torch.stack(teacher_out).float(), teacher_temp)
        student_out = self._embed(self.student, views)  # V x (B, K)
        loss = self.loss(teacher_out, student_out, teacher_temp=teacher_temp)
        return loss, stats

    @torch.no_grad()
    def teacher_stats(self, teacher_out: torch.Tensor, temp: float) -> dict[str, torch.Tensor]:
        """Entropy of the teacher's centred, sharpened softmax per image (low: confident), and
        of its batch mean (low: every image gets the same prototype, i.e. collapse)."""
        centre = self.loss.center.reshape(1, 1, -1).float()
        probs = ((teacher_out - centre) / temp).softmax(dim=-1)  # (2, B, K)
        per_image = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        mean = probs.mean(dim=(0, 1))
        batch = -(mean * mean.clamp_min(1e-12).log()).sum()
        return {"teacher_entropy": per_image, "teacher_batch_entropy": batch}

    # -------------------------------------------------------------------- optimisation
    def param_groups(self) -> list[dict]:
        """DINO's ``get_params_groups``: weight decay on weights, none on biases and norms."""
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    @torch.no_grad()
    def clip_gradients(self, clip: float) -> None:
        """DINO's ``clip_gradients``: each parameter's gradient to norm ``clip`` on its own."""
        for p in self.student.parameters():
            if p.grad is not None:
                norm = p.grad.norm(2)
                p.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))

    def cancel_last_layer_gradients(self) -> None:
        for p in self.student["head"].last_layer.parameters():
            p.grad = None

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        for s, t in zip(self.student.parameters(), self.teacher.parameters()):
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)

    # -------------------------------------------------------------------- export
    def teacher_checkpoint(self) -> dict[str, dict[str, torch.Tensor]]:
        """The teacher in silicon-menagerie's DINO layout: ``{"teacher": {"backbone.<name>",
        "head.<name>"}}``, plain CPU tensors (loads with ``torch.load(weights_only=True)``)."""
        state = {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}
        return {"teacher": state}


@torch.no_grad()
def cls_attention(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's attention from the CLS token to every patch, per head:
    normalised images (B, 3, S, S) -> (B, heads, h, w). (timm's fused attention never forms the
    attention matrix, so the last block's softmax(q k^T / sqrt(d)) is recomputed here.)"""
    x = vit.patch_embed(images)
    x = vit.norm_pre(vit._pos_embed(x))  # (B, 1+N, D)
    for block in vit.blocks[:-1]:
        x = block(x)
    attn = vit.blocks[-1].attn
    b, n, _ = x.shape
    qkv = attn.qkv(vit.blocks[-1].norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, 1+N, d) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, heads, 1, 1+N)
    side = images.shape[-1] // vit.patch_embed.patch_size[0]
    return weights[:, :, 0, vit.num_prefix_tokens :].reshape(b, attn.num_heads, side, side)
