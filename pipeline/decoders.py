"""SlotContrast's MLP broadcast feature decoder.

Each slot is broadcast to the N token positions, a learned positional embedding (1, 1, N, D) is
added, and an MLP D -> hidden... -> F+1 (ReLU between) decodes every (slot, position) pair. The
last output channel is alpha: masks = softmax(alpha over slots) and the reconstruction is the
mask-weighted sum of the per-slot reconstructions.

``mixing="attention"`` (an egoslots option, not SlotContrast's; default ``"alpha"`` is
SlotContrast's): the MLP outputs F channels and the per-slot reconstructions are mixed with the
slot-attention masks of the same frame instead, so the reconstruction error trains the grouping
directly (the E-step of a mixture model; cf. the spatial-broadcast decoders of Slot Attention,
which mix with decoded alphas). In egoslots' discovery benchmark (docs/discovery.md) this made
slots split objects within a few hundred CPU steps where alpha mixing let one slot paint the
whole frame for thousands of steps.

``relative_grid=(h, w)`` (with ``grouper.invariant``): the positional input of slot k at token n
is, as in Invariant Slot Attention's decoders (google-research invariant_slot_attention,
``RelativePositionEmbedding``, linear, project-add), a linear projection of that token's
coordinate in the slot's frame, ``(grid_n - position_k) / (5 * scale_k)``, instead of the learned
embedding: the decoder then draws an object the same wherever the slot found it.

``positions="none"`` (an egoslots option; needs ``mixing="attention"``): no positional input at
all. Each slot decodes to one feature vector (B, T, K, F) and the reconstruction of token n is
the attention-weighted mixture of those vectors, so the feature loss becomes a soft k-means
distortion of the features around the slots' decoded means. A slot can then no longer
reconstruct a whole region (floor around a small object, say) by painting its layout from the
positions; it pays for every token unlike its vector. Measured in docs/discovery.md.

Speed (deviation in form, not in maths): the first Linear is applied to the slots (B, T, K, D)
and to the positional embedding (N, D) separately and the two results are broadcast-added,
W(s + p) + b = Ws + (Wp + b). This is identical maths with N times fewer FLOPs in layer 1 and
no (B, T, K, N, D) input tensor. :meth:`MLPBroadcastDecoder.forward_naive` keeps the plain
broadcast-then-Linear form for tests and benchmarks.
"""

from __future__ import annotations

import torch
from torch import nn

from egoslots.pipeline.config_schema import DECODER_MIXINGS as MIXINGS  # decoder.mixing
from egoslots.pipeline.config_schema import DECODER_POSITIONS as POSITIONS  # decoder.positions
from egoslots.pipeline.slots import coordinate_grid, slot_frame_coordinates


class MLPBroadcastDecoder(nn.Module):
    def __init__(
        self,
        slot_dim: int,
        feature_dim: int,
        num_tokens: int,
        hidden_dims: list[int] | tuple[int, ...] = (1024, 1024, 1024),
        mixing: str = "alpha",
        relative_grid: tuple[int, int] | None = None,
        scales_factor: float = 5.0,
        positions: str = "learned",
    ):
        super().__init__()
        if not hidden_dims:
            raise ValueError("decoder.hidden_dims must list at least one hidden layer")
        if mixing not in MIXINGS:
            raise ValueError(f"decoder.mixing={mixing!r} is not one of {', '.join(MIXINGS)}")
        if positions not in POSITIONS:
            raise ValueError(
                f"decoder.positions={positions!r} is not one of {', '.join(POSITIONS)}"
            )
        if positions == "none" and (mixing != "attention" or relative_grid is not None):
            raise ValueError(
                "decoder.positions=none needs decoder.mixing=attention and no grouper.invariant"
            )
        self.mixing = mixing
        self.positionless = positions == "none"
        self.relative = relative_grid is not None
        if self.relative:
            if relative_grid[0] * relative_grid[1] != num_tokens:
                raise ValueError(f"relative_grid {relative_grid} does not hold {num_tokens} tokens")
            self.scales_factor = scales_factor
            self.register_buffer("grid", coordinate_grid(*relative_grid), persistent=False)
            self.pos_proj = nn.Linear(2, slot_dim)  # (N, 2) grid in the slot's frame -> D
        elif not self.positionless:  # (positionless: nothing positional, one vector per slot)
            self.pos_emb = nn.Parameter(torch.randn(1, 1, num_tokens, slot_dim) * slot_dim**-0.5)
        alpha = 1 if mixing == "alpha" else 0  # the alpha channel only where it is used
        dims = [slot_dim, *hidden_dims, feature_dim + alpha]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def _mix(self, out: torch.Tensor, attention_masks: torch.Tensor | None):
        """out (B, T, K, N, F(+1)) -> reconstruction (B, T, N, F), masks (B, T, K, N)."""
        if self.mixing == "alpha":
            recon, alpha = out[..., :-1], out[..., -1]  # (B, T, K, N, F), (B, T, K, N)
            masks = alpha.softmax(dim=2)  # (B, T, K, N), softmax over slots
        else:
            if attention_masks is None:
                raise ValueError("decoder.mixing=attention needs the slot-attention masks")
            recon, masks = out, attention_masks.to(out.dtype)  # (B, T, K, N, F), (B, T, K, N)
        reconstruction = torch.einsum("btkn,btknf->btnf", masks, recon)  # (B, T, N, F)
        return reconstruction, masks

    def positions(self, geometry: torch.Tensor | None) -> torch.Tensor:
        """The positional input: (1, 1, N, D) learned, or (B, T, K, N, D) relative to each slot's
        geometry (B, T, K, 4) = (y, x, scale_y, scale_x)."""
        if not self.relative:
            return self.pos_emb[0]
        if geometry is None:
            raise ValueError("a decoder with relative positions needs the slots' geometry")
        rel = slot_frame_coordinates(
            self.grid, geometry[..., :2], geometry[..., 2:], self.scales_factor
        )  # (B, T, K, N, 2)
        return self.pos_proj(rel)  # (B, T, K, N, D)

    def forward(
        self,
        slots: torch.Tensor,
        attention_masks: torch.Tensor | None = None,
        geometry: torch.Tensor | None = None,
    ):
        """slots (B, T, K, D) [, attention_masks (B, T, K, N)] [, geometry (B, T, K, 4)] ->
        reconstruction (B, T, N, F), masks (B, T, K, N)."""
        if self.positionless:  # one vector per slot, mixed by the attention masks
            if attention_masks is None:
                raise ValueError("decoder.mixing=attention needs the slot-attention masks")
            x = slots
            for i, layer in enumerate(self.layers):
                x = layer(x if i == 0 else torch.relu(x))  # (B, T, K, D) ... -> (B, T, K, F)
            masks = attention_masks.to(x.dtype)  # (B, T, K, N)
            return torch.einsum("btkn,btkf->btnf", masks, x), masks  # (B, T, N, F), masks
        first = self.layers[0]
        pos = nn.functional.linear(self.positions(geometry), first.weight)  # (.., N, H1), no bias
        x = first(slots).unsqueeze(-2) + pos  # (B, T, K, 1, H1) + (.., N, H1) -> (B, T, K, N, H1)
        for layer in self.layers[1:]:
            x = layer(torch.relu(x))  # (B, T, K, N, H_i) ... -> (B, T, K, N, F(+1))
        return self._mix(x, attention_masks)

    def forward_naive(
        self,
        slots: torch.Tensor,
        attention_masks: torch.Tensor | None = None,
        geometry: torch.Tensor | None = None,
    ):
        """Reference form: broadcast, add the positional embedding, then the full MLP."""
        pos = None if self.positionless else self.positions(geometry)  # (.., N, D) | None
        N = attention_masks.shape[-1] if pos is None else pos.shape[-2]
        x = slots.unsqueeze(-2).expand(*slots.shape[:-1], N, slots.shape[-1])  # (B,T,K,N,D)
        if pos is not None:
            x = x + pos  # (B, T, K, N, D)
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else torch.relu(x))
        return self._mix(x, attention_masks)


__all__ = ["MIXINGS", "MLPBroadcastDecoder"]
