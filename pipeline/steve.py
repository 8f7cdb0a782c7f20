"""STEVE's transformer decoder: predicts each frame's dVAE tokens from its slots.

Follows STEVE (Singh et al. 2022, github.com/singhgautam/steve): ``num_blocks`` pre-LayerNorm blocks
of causal self-attention over tokens, cross-attention to ``slot_proj(slots)`` (Linear without
bias, D -> d) and a 4d ReLU FFN, dropout 0.1, a final LayerNorm and an output head
Linear(d, vocab) without bias. The input is [BOS, embedding(token ids)] plus a learned positional
embedding of length 1 + h*w, last position dropped, so position i predicts token i.

Faithful details kept from STEVE's code: attention projections have no bias; xavier-uniform init,
kaiming for the FFN's first layer, gain (3 * num_blocks)^-0.5 on the attention output projections
and the FFN's second layer; the first block's residual stream starts from the LayerNormed input;
dropout after the positional embedding, on attention weights and on sublayer outputs.

Initialisation of the inputs, as in STEVE's ``steve.py``:
- token embeddings: ``nn.Embedding``'s default, N(0, 1) (STEVE's ``OneHotDictionary``);
- BOS: ``xavier_uniform_`` on a (1, 1, d) tensor, i.e. U(-sqrt(3/d), sqrt(3/d));
- positional embedding: ``trunc_normal_`` with its defaults, std 1 truncated to [-2, 2]
  (``LearnedPositionalEmbedding1D``), not the 0.02 of ViTs;
- ``slot_proj`` and the output head: xavier-uniform, no bias.

Implementation choices:
- Token ids index an ``nn.Embedding`` (vocab + 1 rows, the last one is BOS) -- STEVE multiplies
  one-hot vectors instead; same maths, no (B, L, vocab) one-hot tensor.
- Self-attention uses ``F.scaled_dot_product_attention(is_causal=True)`` (flash / memory
  efficient kernels on GPU).
- Cross-attention is computed explicitly (q.k^T softmax) in **every** block: with K slots as keys
  it costs O(L*K) per head, negligible next to self-attention's O(L^2), and it gives the
  attention weights. The last block's weights, averaged over heads, are the STEVE masks
  (B, K, L): for each token, a distribution over slots (sums to 1 over K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _linear(
    d_in: int, d_out: int, bias: bool = True, gain: float = 1.0, kaiming: bool = False
) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias)
    if kaiming:
        nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
    else:
        nn.init.xavier_uniform_(layer.weight, gain=gain)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class Attention(nn.Module):
    """Multi-head attention with bias-free projections (STEVE's MultiHeadAttention)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, gain: float):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(
                f"steve_decoder.d_model={d_model} is not divisible by num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.dropout = dropout
        self.proj_q = _linear(d_model, d_model, bias=False)
        self.proj_k = _linear(d_model, d_model, bias=False)
        self.proj_v = _linear(d_model, d_model, bias=False)
        self.proj_o = _linear(d_model, d_model, bias=False, gain=gain)
        self.attn_dropout = nn.Dropout(dropout)
        self.out_dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        return x.view(B, L, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, H, L, dh)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        B, H, L, dh = x.shape
        return self.out_dropout(self.proj_o(x.transpose(1, 2).reshape(B, L, H * dh)))  # (B, L, d)

    def causal_self(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._heads(p(x)) for p in (self.proj_q, self.proj_k, self.proj_v))
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, H, L, dh)
        return self._merge(out)

    def cross(self, x: torch.Tensor, memory: torch.Tensor):
        """x (B, L, d) attends to memory (B, K, d); returns (B, L, d), weights (B, H, L, K)."""
        q = self._heads(self.proj_q(x))  # (B, H, L, dh)
        k = self._heads(self.proj_k(memory))  # (B, H, K, dh)
        v = self._heads(self.proj_v(memory))  # (B, H, K, dh)
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, L, K)
        weights = logits.softmax(dim=-1)  # (B, H, L, K)
        out = self.attn_dropout(weights) @ v  # (B, H, L, dh)
        return self._merge(out), weights


class DecoderBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float, gain: float, is_first: bool):
        super().__init__()
        self.is_first = is_first
        self.norm_self = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, num_heads, dropout, gain)
        self.norm_cross = nn.LayerNorm(d_model)
        self.cross_attn = Attention(d_model, num_heads, dropout, gain)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            _linear(d_model, 4 * d_model, kaiming=True),
            nn.ReLU(),
            _linear(4 * d_model, d_model, gain=gain),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, memory: torch.Tensor):
        if self.is_first:  # STEVE: the first block's residual stream is the normed input
            x = self.norm_self(x)
            x = x + self.self_attn.causal_self(x)
        else:
            x = x + self.self_attn.causal_self(self.norm_self(x))  # (B, L, d)
        update, weights = self.cross_attn.cross(self.norm_cross(x), memory)
        x = x + update  # (B, L, d)
        x = x + self.ffn(self.norm_ffn(x))
        return x, weights


class SteveDecoder(nn.Module):
    """Slots (B, K, D) + token ids (B, h, w) -> next-token logits (B, h*w, V), masks (B, K, h*w)."""

    def __init__(
        self,
        slot_dim: int,
        vocab_size: int,
        num_tokens: int,
        num_blocks: int = 8,
        num_heads: int = 4,
        d_model: int = 192,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.num_tokens = num_tokens
        self.embed = nn.Embedding(vocab_size + 1, d_model)  # rows 0..V-1 N(0, 1); last row: BOS
        bos = torch.empty(1, 1, d_model)
        nn.init.xavier_uniform_(bos)  # STEVE's BOS parameter (1, 1, d)
        with torch.no_grad():
            self.embed.weight[vocab_size].copy_(bos.view(d_model))
        self.pos_emb = nn.Parameter(torch.zeros(1, 1 + num_tokens, d_model))
        nn.init.trunc_normal_(self.pos_emb, std=1.0, a=-2.0, b=2.0)  # STEVE: trunc_normal_ defaults
        self.pos_dropout = nn.Dropout(dropout)
        self.slot_proj = _linear(slot_dim, d_model, bias=False)
        gain = (3 * num_blocks) ** -0.5
        self.blocks = nn.ModuleList(
            DecoderBlock(d_model, num_heads, dropout, gain, is_first=(i == 0))
            for i in range(num_blocks)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = _linear(d_model, vocab_size, bias=False)

    def forward(self, slots: torch.Tensor, tokens: torch.Tensor):
        B = tokens.shape[0]
        ids = tokens.reshape(B, -1).long()  # (B, L), L = h*w
        if ids.shape[1] != self.num_tokens:
            raise ValueError(
                f"STEVE decoder built for {self.num_tokens} tokens, got {ids.shape[1]}"
            )
        bos = ids.new_full((B, 1), self.vocab_size)
        x = self.embed(torch.cat([bos, ids[:, :-1]], dim=1))  # (B, L, d): last position dropped
        x = self.pos_dropout(x + self.pos_emb[:, :-1])  # (B, L, d)
        memory = self.slot_proj(slots)  # (B, K, d)
        weights = None
        for block in self.blocks:
            x, weights = block(x, memory)
        logits = self.head(self.norm(x))  # (B, L, V)
        masks = weights.mean(dim=1).transpose(1, 2)  # (B, H, L, K) -> (B, K, L)
        return logits, masks


__all__ = ["SteveDecoder"]
