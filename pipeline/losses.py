"""Stage-3 losses: feature reconstruction, slot-slot contrast, STEVE cross-entropy.

All losses are computed in float32 with autocast disabled (inputs are upcast), so they are safe
under bf16 autocast, and none of them reads a tensor value on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from egoslots.pipeline.config_schema import LossSS


def _no_autocast(fn):
    """Run ``fn`` with autocast off (on every device type), so its matmuls stay float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


@_no_autocast
def loss_featrec(reconstruction: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Mean squared error between decoded (B, T, N, F) and cached features (the target)."""
    return F.mse_loss(reconstruction.float(), features.float().detach())


@_no_autocast
def loss_slot_slot_contrast(
    slots: torch.Tensor,
    temperature: float = LossSS.temperature,  # losses.loss_ss.* defaults
    batch_contrast: bool = LossSS.batch_contrast,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """SlotContrast's slot-slot contrastive loss on slots (B, T, K, D).

    s = L2-normalise(slots); with batch contrast all videos' slots of a time step are pooled,
    (T, B*K, D). logits_t[i, j] = s_t[i] . s_{t+1}[j] / tau and

        L = -1/((T-1) B K) sum_t sum_j log( exp(logits_t[j, j]) / sum_i exp(logits_t[i, j]) ),

    i.e. each slot at t+1 must pick out its own slot at t among every slot of every video at t.
    Without batch contrast the negatives are only the other slots of the same video.

    ``gather`` (optional) maps the local slots (B, T, K, D) to the global batch (B', T, K, D)
    with gradients (e.g. an all-gather under DDP) before the loss is formed.
    """
    if gather is not None:
        slots = gather(slots)  # (B', T, K, D)
    s = F.normalize(slots.float(), p=2.0, dim=-1)  # (B, T, K, D)
    B, T, K, D = s.shape
    if T < 2:  # no pair of consecutive frames: nothing to contrast
        return s.sum() * 0.0
    if batch_contrast:
        s = s.transpose(0, 1).reshape(1, T, B * K, D)  # (1, T, B*K, D)
    logits = s[:, :-1] @ s[:, 1:].transpose(-2, -1) / temperature  # (B or 1, T-1, S, S): [i, j]
    # Column j's softmax over rows i: log-softmax over dim -2, then the diagonal.
    log_prob = logits.log_softmax(dim=-2).diagonal(dim1=-2, dim2=-1)  # (B or 1, T-1, S)
    return -log_prob.mean()


@_no_autocast
def loss_steve_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicted next tokens (B, T, L, V) vs cached ids (B, T, h, w).

    **Averaged** over tokens and frames (STEVE sums over tokens and divides by frames; the mean
    keeps the loss on the scale users expect, ~2-4 nats, and independent of the token grid;
    multiply by h*w to get STEVE's number).
    """
    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V).float(), tokens.reshape(-1).long())


__all__ = ["loss_featrec", "loss_slot_slot_contrast", "loss_steve_ce"]
