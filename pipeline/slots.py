"""Slot building blocks of SlotContrast: feature MLP, slot initializers, slot attention.

Follows the released code of SlotContrast (github.com/martius-lab/slotcontrast) and VideoSAUR
(github.com/martius-lab/videosaur):

- :class:`FeatureMLP` maps cached ViT features (F) to the slot dimension (D), optionally after
  Slot Attention's :class:`SoftPositionEmbedding` (``grouper.position_embedding``).
- :class:`FixedInit` is SlotContrast's learned fixed initial slots; :class:`GaussianInit` is the
  VideoSAUR / STEVE alternative (learned mean and log-std, sampled per video);
  :class:`KMeansInit` (egoslots' own option, in no published system) starts each video's slots
  from k-means clusters of its first frame's features.
- :class:`SlotAttention` is SlotContrast's variant: single head, q/k/v without bias, softmax over
  slots, GRU update and a residual MLP. It returns the attention of the last iteration *before*
  the renormalisation over inputs as the slot masks.
- :class:`InvariantSlotAttention` (``grouper.invariant``, an option) is Invariant Slot Attention's
  translation-and-scale variant: every slot also has a position and a scale, and sees the tokens
  in its own reference frame.
"""

from __future__ import annotations

import torch
from torch import nn

from egoslots.pipeline.baselines import kmeans


class SoftPositionEmbedding(nn.Module):
    """Slot Attention's soft position embedding (Locatello et al. 2020; ``SoftPositionEmbed`` in
    github.com/google-research/google-research/slot_attention): a linear map of each token's
    (y, x, 1 - y, 1 - x), coordinates in [0, 1] on the token grid, added to the token. The
    grouped inputs then say where each token is, so a slot's vector, a weighted mean of them,
    says where its tokens are (egoslots' option ``grouper.position_embedding``; SlotContrast
    adds none to its ViT features)."""

    def __init__(self, dim: int, grid: tuple[int, int]):
        super().__init__()
        ys, xs = torch.meshgrid(
            torch.linspace(0, 1, grid[0]), torch.linspace(0, 1, grid[1]), indexing="ij"
        )
        coords = torch.stack([ys, xs, 1 - ys, 1 - xs], dim=-1).reshape(-1, 4)  # (N, 4)
        self.register_buffer("coords", coords, persistent=False)
        self.proj = nn.Linear(4, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.proj(self.coords).to(tokens.dtype)  # (..., N, dim)


class FeatureMLP(nn.Module):
    """LayerNorm(F) -> Linear(F, 2F) -> ReLU -> Linear(2F, D), applied per token; with
    ``position_grid`` a :class:`SoftPositionEmbedding` is added to the features first (where
    Slot Attention adds it: before the LayerNorm and the MLP)."""

    def __init__(
        self,
        feature_dim: int,
        slot_dim: int,
        hidden_dim: int | None = None,
        position_grid: tuple[int, int] | None = None,
    ):
        super().__init__()
        hidden_dim = hidden_dim or 2 * feature_dim
        self.position = (
            None if position_grid is None else SoftPositionEmbedding(feature_dim, position_grid)
        )
        self.net = nn.Sequential(
            nn.LayerNorm(feature_dim),
            nn.Linear(feature_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, slot_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.position is not None:
            features = self.position(features)  # (..., N, F) + where each token is
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


class KMeansInit(nn.Module):
    """First slots from the video itself: k-means of the first frame's features, one slot per
    cluster, each starting at the mean slot input of its cluster's tokens.

    Why: learned or random first slots start slot attention far from any grouping, and on
    scenes dominated by background it settles where k-means of the same features would not
    (docs/discovery.md). Started from the clusters, slot attention refines a grouping instead of
    finding one. The clusters come from the frozen features (L2-normalised, k-means++ seeding,
    Lloyd iterations; ``pipeline/baselines.kmeans``); gradients reach the feature MLP through
    the means. The seeding draws its seed from torch's RNG, so ``inference.restarts`` draws
    different clusterings. A cluster left empty starts at the frame's mean input.
    egoslots' own option: SlotContrast, STEVE and VideoSAUR start from learned slots.
    """

    def __init__(self, num_slots: int, iters: int = 30):
        super().__init__()
        self.num_slots = num_slots
        self.iters = iters

    def forward(self, features: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """features (B, N, F): one frame's cached features; inputs (B, N, D): their feature-MLP
        outputs -> first slots (B, K, D)."""
        seed = int(torch.randint(2**31 - 1, ()))
        with torch.no_grad():
            unit = nn.functional.normalize(features.float(), dim=-1)
            ids = kmeans(unit, self.num_slots, self.iters, seed)  # (B, N)
        members = nn.functional.one_hot(ids.to(inputs.device), self.num_slots).to(inputs.dtype)
        counts = members.sum(1)[..., None]  # (B, K, 1)
        means = members.transpose(1, 2) @ inputs / counts.clamp_min(1)  # (B, K, D)
        frame_mean = inputs.mean(1, keepdim=True).expand_as(means)  # (B, K, D)
        return torch.where(counts > 0, means, frame_mean)


def build_initializer(name: str, num_slots: int, slot_dim: int) -> nn.Module:
    if name == "fixed":
        return FixedInit(num_slots, slot_dim)
    if name == "gaussian":
        return GaussianInit(num_slots, slot_dim)
    if name == "kmeans":
        return KMeansInit(num_slots)
    raise ValueError(
        f"model.initializer.name must be 'fixed', 'gaussian' or 'kmeans', got {name!r}"
    )


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

    invariant = False  # no slot positions (see InvariantSlotAttention)

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


def coordinate_grid(height: int, width: int) -> torch.Tensor:
    """(height * width, 2) token coordinates (y, x) in [-1, 1], row-major like the tokens."""
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij"
    )
    return torch.stack([ys, xs], dim=-1).reshape(-1, 2)


GEOMETRY_DIMS = 4  # Invariant Slot Attention's (y, x, scale_y, scale_x) per slot


def slot_frame_coordinates(
    grid: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor, scales_factor: float
) -> torch.Tensor:
    """Every token's coordinate in every slot's frame, as ISA computes it for attention and
    decoding: grid (N, 2), positions and scales (..., K, 2) -> (..., K, N, 2)."""
    rel = grid - positions.unsqueeze(-2)  # (..., K, N, 2)
    return rel / scales_factor / scales.unsqueeze(-2)


class InvariantSlotAttention(nn.Module):
    """Invariant Slot Attention with slot positions and scales (ISA-TS; Biza et al., ICML 2023).

    Computes what ``SlotAttentionTranslScaleEquiv`` in google-research/google-research
    (invariant_slot_attention/modules/invariant_attention.py) computes, with its defaults
    (slots start each frame at the centre, ``zero_position_init``, with scale 0.1,
    ``init_with_fixed_scale``) and the settings of its CLEVRTex configs: relative positions added
    to values too (``add_rel_pos_to_values``), ``scales_factor`` 5, and a grid encoder
    MLP(LayerNorm, 128, ReLU). Per round, every slot k sees token n at the relative coordinate
    ``(grid_n - position_k) / (5 * scale_k)``; keys and values get that coordinate's projection
    and go through the grid encoder, so what a slot attends to does not depend on where its object
    is or how big it looks. After each round the slot's position and scale are recomputed as the
    mean and standard deviation of the token coordinates under its attention; one last round
    only updates them, so they belong to the final slots.

    Why here: with the plain module, nothing ties a slot to one place, so two objects that look
    alike share a slot wherever they stand; and a slot vector need not say where its object is.
    ISA keeps the position and scale beside the vector: ``iterate`` returns them (B, K, 4) as
    (y, x, scale_y, scale_x) in the grid's [-1, 1] units, and inference appends them to each slot
    as ISA's code does.

    Faithful details of ISA's code, unlike :class:`SlotAttention` (SlotContrast's): the GRU's
    previous state is the slots before the LayerNorm, and the renormalisation over inputs is
    ``attn / (sum + eps)``. The masks are the softmax over slots of the last round.
    """

    invariant = True

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int],
        mlp_ratio: int = 4,
        eps: float = 1e-8,
        grid_hidden: int = 128,
        scales_factor: float = 5.0,
        init_scale: float = 0.1,
        min_scale: float = 0.001,
        max_scale: float = 2.0,
    ):
        super().__init__()
        self.eps = eps
        self.scale = dim**-0.5
        self.scales_factor = scales_factor
        self.init_scale = init_scale
        self.min_scale, self.max_scale = min_scale, max_scale
        self.register_buffer("grid", coordinate_grid(*grid), persistent=False)  # (N, 2)
        self.norm_inputs = nn.LayerNorm(dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.grid_proj = nn.Linear(2, dim)
        self.grid_encoder = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, grid_hidden), nn.ReLU(), nn.Linear(grid_hidden, dim)
        )
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = ResidualMLP(dim, mlp_ratio * dim)

    def project_inputs(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.norm_inputs(inputs)  # (..., N, D)
        return self.to_k(inputs), self.to_v(inputs)  # (..., N, D) each

    def step(self, slots, keys, values, positions, scales, update: bool = True):
        """One round: attention in every slot's frame, new positions and scales, and (when
        ``update``) the slot update. slots (B, K, D); keys, values (B, N, D); positions,
        scales (B, K, 2)."""
        B, K, D = slots.shape
        rel = slot_frame_coordinates(self.grid, positions, scales, self.scales_factor)
        rel = self.grid_proj(rel)  # (B, K, N, D)
        keys_rel = self.grid_encoder(keys.unsqueeze(1) + rel)  # (B, K, N, D)
        values_rel = self.grid_encoder(values.unsqueeze(1) + rel)  # (B, K, N, D)
        q = self.to_q(self.norm_slots(slots))  # (B, K, D)
        logits = torch.einsum("bkd,bknd->bkn", q, keys_rel) * self.scale  # (B, K, N)
        attn = logits.softmax(dim=1)  # (B, K, N), softmax over slots: the mask
        weights = attn / (attn.sum(dim=-1, keepdim=True) + self.eps)  # over inputs
        positions = torch.einsum("bkn,nc->bkc", weights, self.grid)  # (B, K, 2), centre of mass
        spread = (self.grid - positions.unsqueeze(-2)).square()  # (B, K, N, 2)
        scales = torch.einsum("bkn,bknc->bkc", weights + self.eps, spread).sqrt()
        scales = scales.clamp(self.min_scale, self.max_scale)  # (B, K, 2)
        if update:
            updates = torch.einsum("bkn,bknd->bkd", weights, values_rel)  # (B, K, D)
            slots = self.gru(updates.reshape(B * K, D), slots.reshape(B * K, D)).reshape(B, K, D)
            slots = self.mlp(slots)
        return slots, attn, positions, scales

    def iterate(self, slots, keys, values, n_iters: int):
        """``n_iters`` rounds and a last one for positions and scales; returns slots (B, K, D),
        masks (B, K, N) and geometry (B, K, 4) = (y, x, scale_y, scale_x)."""
        B, K, _ = slots.shape
        positions = slots.new_zeros(B, K, 2)  # every slot starts at the centre ...
        scales = slots.new_full((B, K, 2), self.init_scale)  # ... at ISA's initial scale
        attn = None
        for round_ in range(n_iters + 1):
            slots, attn, positions, scales = self.step(
                slots, keys, values, positions, scales, update=round_ < n_iters
            )
        return slots, attn, torch.cat([positions, scales], dim=-1)

    def forward(self, slots, inputs, n_iters: int):
        keys, values = self.project_inputs(inputs)
        return self.iterate(slots, keys, values, n_iters)


__all__ = [
    "coordinate_grid",
    "GEOMETRY_DIMS",
    "slot_frame_coordinates",
    "InvariantSlotAttention",
    "FeatureMLP",
    "FixedInit",
    "GaussianInit",
    "KMeansInit",
    "build_initializer",
    "ResidualMLP",
    "SlotAttention",
]
