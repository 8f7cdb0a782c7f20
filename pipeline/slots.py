"""Slot building blocks of SlotContrast: feature MLP, slot initializers, slot attention.

Follows the released code of SlotContrast (github.com/martius-lab/slotcontrast) and VideoSAUR
(github.com/martius-lab/videosaur):

- :class:`FeatureMLP` maps cached ViT features (F) to the slot dimension (D).
- :class:`FixedInit` is SlotContrast's learned fixed initial slots; :class:`GaussianInit` is the
  VideoSAUR / STEVE alternative (learned mean and log-std, sampled per video).
- :class:`SlotAttention` is SlotContrast's variant: single head, q/k/v without bias, softmax over
  slots, GRU update and a residual MLP. It returns the attention of the last iteration *before*
  the renormalisation over inputs as the slot masks.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureMLP(nn.Module):
    """LayerNorm(F) -> Linear(F, 2F) -> ReLU -> Linear(2F, D), applied per token."""

    def __init__(self, feature_dim: int, slot_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or 2 * feature_dim
        self.net = nn.Sequential(
            nn.LayerNorm(feature_dim),
            nn.Linear(feature_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, slot_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)  # (..., N, F) -> (..., N, D)


class FixedInit(nn.Module):
    """Learned initial slots (1, K, D), initialised randn * D^-0.5 (SlotContrast)."""

    def __init__(self, num_slots: int, slot_dim: int):
        super().__init__()
        self.slots = nn.Parameter(torch.randn(1, num_slots, slot_dim) * slot_dim**-0.5)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.slots.expand(batch_size, -1, -1)  # (B, K, D)


class GaussianInit(nn.Module):
    """Learned Gaussian (mean, log-std) shared by all slots, sampled per video and slot.

    As in STEVE / VideoSAUR the parameters are xavier-uniform initialised and sampling happens in
    eval mode too (so evaluation with this initializer is stochastic unless seeded).
    """

    def __init__(self, num_slots: int, slot_dim: int):
        super().__init__()
        self.num_slots = num_slots
        self.mean = nn.Parameter(torch.empty(1, 1, slot_dim))
        self.log_std = nn.Parameter(torch.empty(1, 1, slot_dim))
        nn.init.xavier_uniform_(self.mean)
        nn.init.xavier_uniform_(self.log_std)

    def forward(self, batch_size: int) -> torch.Tensor:
        noise = torch.randn(
            batch_size,
            self.num_slots,
            self.mean.shape[-1],
            device=self.mean.device,
            dtype=self.mean.dtype,
        )
        return self.mean + self.log_std.exp() * noise  # (B, K, D)


def build_initializer(name: str, num_slots: int, slot_dim: int) -> nn.Module:
    if name == "fixed":
        return FixedInit(num_slots, slot_dim)
    if name == "gaussian":
        return GaussianInit(num_slots, slot_dim)
    raise ValueError(f"model.initializer.name must be 'fixed' or 'gaussian', got {name!r}")


class ResidualMLP(nn.Module):
    """x + Linear(ReLU(Linear(LayerNorm(x)))): the slot update MLP of slot attention."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class SlotAttention(nn.Module):
    """SlotContrast's slot attention (one head, dim D).

    Inputs are LayerNormed once and projected to keys/values once per frame
    (:meth:`project_inputs`, batched over all frames); each iteration LayerNorms the slots,
    takes a softmax over **slots**, adds ``eps`` and renormalises over inputs for the weighted
    mean, then updates with a GRUCell and a residual MLP (:meth:`iterate`).

    Faithful detail of SlotContrast's / VideoSAUR's code: the GRU's previous hidden state is the
    *LayerNormed* slots (the norm result overwrites the slots before the update), not the raw
    slots of the previous iteration.
    """

    def __init__(self, dim: int, mlp_ratio: int = 4, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.scale = dim**-0.5
        self.norm_inputs = nn.LayerNorm(dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = ResidualMLP(dim, mlp_ratio * dim)

    def project_inputs(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.norm_inputs(inputs)  # (..., N, D)
        return self.to_k(inputs), self.to_v(inputs)  # (..., N, D) each

    def step(self, slots, keys, values):
        B, K, D = slots.shape
        slots = self.norm_slots(slots)  # (B, K, D); as in SlotContrast, also the GRU's hidden state
        q = self.to_q(slots)  # (B, K, D)
        logits = torch.einsum("bkd,bnd->bkn", q, keys) * self.scale  # (B, K, N)
        attn = logits.softmax(dim=1)  # (B, K, N), softmax over slots: this is the mask
        weights = attn + self.eps
        weights = weights / weights.sum(dim=-1, keepdim=True)  # renormalise over inputs
        updates = torch.einsum("bkn,bnd->bkd", weights, values)  # (B, K, D)
        slots = self.gru(updates.reshape(B * K, D), slots.reshape(B * K, D)).reshape(B, K, D)
        return self.mlp(slots), attn

    def iterate(self, slots, keys, values, n_iters: int):
        """Run ``n_iters`` iterations; returns slots (B, K, D) and masks (B, K, N)."""
        attn = None
        for _ in range(n_iters):
            slots, attn = self.step(slots, keys, values)
        return slots, attn

    def forward(self, slots, inputs, n_iters: int):
        keys, values = self.project_inputs(inputs)
        return self.iterate(slots, keys, values, n_iters)


__all__ = [
    "FeatureMLP",
    "FixedInit",
    "GaussianInit",
    "build_initializer",
    "ResidualMLP",
    "SlotAttention",
]
