"""Temporal part of SlotContrast: the slot predictor and the scan over frames.

state_t = SlotAttention(init_t, features_t);  init_{t+1} = predictor(state_t)

The predictor is one pre-norm transformer encoder block over the K slots of a frame (4 heads,
FFN 4D with ReLU, no dropout), as in SlotContrast / VideoSAUR. With the predictor disabled
(``predictor.enabled: false``) the next frame starts from the current slots unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.slots import SlotAttention


class SlotPredictor(nn.Module):
    """One pre-norm transformer encoder block over slots: (B, K, D) -> (B, K, D)."""

    def __init__(self, dim: int, num_heads: int = 4, ffn_ratio: int = 4):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=num_heads,
            dim_feedforward=ffn_ratio * dim,
            dropout=0.0,
            activation="relu",
            batch_first=True,
            norm_first=True,
        )

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        return self.block(slots)  # (B, K, D)


class SlotScan(nn.Module):
    """Runs slot attention frame by frame, carrying slots through the predictor.

    The first frame of a clip gets ``n_iters_first`` iterations when it starts from the
    initializer; when the caller passes ``init_state`` (slots carried over from the previous
    window of a long video) every frame gets ``n_iters``, so that running a video in windows
    gives the same slots as running it in one go.
    """

    def __init__(self, corrector: SlotAttention, predictor: nn.Module | None,
                 n_iters: int = 2, n_iters_first: int = 3):
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
        initial slots for frame t+1, and masks (B, T, K, N).
        """
        keys, values = self.corrector.project_inputs(inputs)  # (B, T, N, D) each
        T = inputs.shape[1]
        slots = init
        states, predicted, masks = [], [], []
        for t in range(T):
            n_iters = self.n_iters if (t > 0 or carried) else self.n_iters_first
            slots, attn = self.corrector.iterate(slots, keys[:, t], values[:, t], n_iters)
            states.append(slots)  # (B, K, D)
            masks.append(attn)  # (B, K, N)
            slots = self.predict(slots)  # (B, K, D): initial slots of frame t+1
            predicted.append(slots)
        return torch.stack(states, 1), torch.stack(predicted, 1), torch.stack(masks, 1)


__all__ = ["SlotPredictor", "SlotScan"]
