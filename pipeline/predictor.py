"""Temporal part of SlotContrast: the slot predictor and the scan over frames.

state_t = SlotAttention(init_t, features_t);  init_{t+1} = predictor(state_t)

The predictor is one pre-norm transformer encoder block over the K slots of a frame (4 heads,
FFN 4D with ReLU, no dropout), as in SlotContrast / VideoSAUR (including their attention
scaling, see :class:`SlotPredictor`). With the predictor disabled
(``predictor.enabled: false``) the next frame starts from the current slots unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from egoslots.pipeline.slots import InvariantSlotAttention, SlotAttention


class SlotPredictor(nn.Module):
    """One pre-norm transformer encoder block over slots: (B, K, D) -> (B, K, D).

    x = x + Attn(LN(x)); x = x + FFN(LN(x)), with qkv and output biases, ReLU FFN of width
    ``ffn_ratio * D`` and no dropout, xavier-uniform attention weights (as VideoSAUR's
    ``networks.TransformerEncoder`` that SlotContrast uses).

    ``attn_scale``: SlotContrast's published code computes ``q / scale`` with
    ``scale = head_dim**-0.5``, i.e. it multiplies the attention logits by sqrt(head_dim)
    instead of dividing. ``"published"`` (default) reproduces that, for fidelity to the
    published numbers; ``"standard"`` uses the usual 1/sqrt(head_dim).
    """

    def __init__(
        self, dim: int, num_heads: int = 4, ffn_ratio: int = 4, attn_scale: str = "published"
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"slot dim {dim} is not divisible by predictor.num_heads={num_heads}")
        if attn_scale not in ("published", "standard"):
            raise ValueError(f"attn_scale must be 'published' or 'standard', got {attn_scale!r}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**0.5 if attn_scale == "published" else head_dim**-0.5
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_ratio * dim), nn.ReLU(), nn.Linear(ffn_ratio * dim, dim)
        )
        for w in self.qkv.weight.chunk(3):  # xavier-uniform for q, k and v separately
            nn.init.xavier_uniform_(w)
        nn.init.zeros_(self.qkv.bias)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        B, K, D = slots.shape
        qkv = self.qkv(self.norm_attn(slots))  # (B, K, 3D)
        q, k, v = qkv.view(B, K, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, H, K, D/H)
        slots = slots + self.proj(out.transpose(1, 2).reshape(B, K, D))  # (B, K, D)
        return slots + self.ffn(self.norm_ffn(slots))  # (B, K, D)


class SlotScan(nn.Module):
    """Runs slot attention frame by frame, carrying slots through the predictor.

    The first frame of a clip gets ``n_iters_first`` iterations when it starts from the
    initializer; when the caller passes ``init_state`` (slots carried over from the previous
    window of a long video) every frame gets ``n_iters``, so that running a video in windows
    gives the same slots as running it in one go.
    """

    def __init__(
        self,
        corrector: SlotAttention | InvariantSlotAttention,
        predictor: nn.Module | None,
        n_iters: int = 2,
        n_iters_first: int = 3,
    ):
        super().__init__()
        self.corrector = corrector
        self.predictor = predictor
        self.n_iters = n_iters
        self.n_iters_first = n_iters_first

    def predict(self, slots: torch.Tensor) -> torch.Tensor:
        return slots if self.predictor is None else self.predictor(slots)  # (B, K, D)

    def forward(self, init: torch.Tensor, inputs: torch.Tensor, carried: bool = False):
        """init (B, K, D) first frame's initial slots; inputs (B, T, N, D) projected features.

        Returns state (B, T, K, D), state_predicted (B, T, K, D) = predictor(state_t), i.e. the
        initial slots for frame t+1, masks (B, T, K, N), and geometry (B, T, K, 4), each slot's
        (y, x, scale_y, scale_x), when the corrector is Invariant Slot Attention (else None).
        """
        keys, values = self.corrector.project_inputs(inputs)  # (B, T, N, D) each
        T = inputs.shape[1]
        slots = init
        states, predicted, masks, geometry = [], [], [], []
        for t in range(T):
            n_iters = self.n_iters if (t > 0 or carried) else self.n_iters_first
            out = self.corrector.iterate(slots, keys[:, t], values[:, t], n_iters)
            slots, attn = out[0], out[1]
            if self.corrector.invariant:
                geometry.append(out[2])  # (B, K, 4)
            states.append(slots)  # (B, K, D)
            masks.append(attn)  # (B, K, N)
            slots = self.predict(slots)  # (B, K, D): initial slots of frame t+1
            predicted.append(slots)
        return (
            torch.stack(states, 1),
            torch.stack(predicted, 1),
            torch.stack(masks, 1),
            torch.stack(geometry, 1) if geometry else None,
        )


__all__ = ["SlotPredictor", "SlotScan"]
