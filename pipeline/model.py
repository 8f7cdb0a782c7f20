"""The stage-3 slot model: SlotContrast on cached ViT features, plus STEVE's token decoder.

Reads cached features (B, T, N, F) and, when the STEVE decoder is on, cached dVAE token ids
(B, T, h, w); never runs the ViT or the dVAE. Forward, top to bottom:

    features --FeatureMLP--> (B, T, N, D) --SlotScan (slot attention + predictor)--> state (B, T, K, D)
    (grouper.position_embedding: the FeatureMLP first adds Slot Attention's position embedding)
    state --MLP broadcast decoder--> reconstruction (B, T, N, F), masks (B, T, K, N)
    (grouper.invariant: SlotScan also gives each slot's position and scale (B, T, K, 4), and
    the decoder draws each slot relative to them)
    state, token ids --STEVE decoder--> next-token logits (B, T, h*w, V), masks (B, T, K, h*w)

The output dict uses the key names SlotContrast / integrated-model users know
(``processor.state``, ``decoder.masks``, ``dvae.z_hard`` ...); ``dvae.z_hard`` holds token ids
(B, T, h, w), not one-hot vectors. No I/O and no Lightning here: ``stages/train_slots.py``
wraps this module.

Losses (:meth:`SlotModel.losses`): ``loss_featrec`` (MSE, mean over all elements),
``loss_ss`` (slot-slot contrast on ``processor.state``, tau ``losses.loss_ss.temperature``),
``loss_steve_ce`` (next-token cross-entropy, **mean** over tokens and frames), and ``loss``,
their sum weighted by ``model.loss_weights``; a loss with weight 0 is not computed.
Long videos run in windows: pass the previous window's ``next_state`` as ``init_state``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from egoslots.pipeline.config import inference_restarts, schema_default
from egoslots.pipeline.config_schema import LossWeights
from egoslots.pipeline.decoders import MLPBroadcastDecoder
from egoslots.pipeline.losses import loss_featrec, loss_slot_slot_contrast, loss_steve_ce
from egoslots.pipeline.predictor import SlotPredictor, SlotScan
from egoslots.pipeline.slots import (
    FeatureMLP,
    FixedInit,
    InvariantSlotAttention,
    KMeansInit,
    SlotAttention,
    build_initializer,
)
from egoslots.pipeline.steve import SteveDecoder

# model.loss_weights' defaults (the schema's LossWeights): a weight a config leaves out
DEFAULT_LOSS_WEIGHTS = dataclasses.asdict(LossWeights())


@dataclass
class SlotModelConfig:
    """Every hyperparameter of a :class:`SlotModel`, in one place (as nanoGPT's ``GPTConfig``).

    ``feature_dim`` / ``num_tokens`` (and ``token_grid`` for the STEVE decoder) come from the
    feature store; :meth:`from_config` reads the rest from an egoslots config, whose keys are
    documented in ``pipeline/config_schema.py``.
    """

    feature_dim: int
    num_tokens: int
    # The defaults are the schema's (pipeline/config_schema.py, the key beside each), resolved.
    num_slots: int = schema_default("model.num_slots")
    slot_dim: int = schema_default("model.slot_dim")
    initializer: str = schema_default("model.initializer.name")
    # inference: draws of a Gaussian (or k-means) initializer's first slots per video; the draw
    # whose slots reconstruct the first window's features best is kept (as k-means its best init)
    restarts: int = schema_default("inference.restarts")
    n_iters: int = schema_default("grouper.n_iters")
    n_iters_first: int = schema_default("grouper.n_iters_first")
    eps: float = schema_default("grouper.eps")
    mlp_ratio: int = schema_default("grouper.mlp_ratio")
    invariant: bool = schema_default("grouper.invariant")
    position_embedding: bool = schema_default("grouper.position_embedding")
    predictor: bool = schema_default("predictor.enabled")
    predictor_heads: int = schema_default("predictor.num_heads")
    predictor_ffn_ratio: int = schema_default("predictor.ffn_ratio")
    predictor_attn_scale: str = schema_default("predictor.attn_scale")
    decoder_hidden_dims: tuple[int, ...] = tuple(schema_default("decoder.hidden_dims"))
    decoder_mixing: str = schema_default("decoder.mixing")
    decoder_positions: str = schema_default("decoder.positions")
    # Off unless asked for, unlike steve_decoder.enabled: the STEVE decoder needs the token grid
    # and vocabulary of a tokenized store, which a bare SlotModelConfig(feature_dim, ...) lacks.
    steve: bool = False
    vocab_size: int = schema_default("dvae.vocab_size")
    token_grid: tuple[int, int] | None = None  # from the store
    steve_blocks: int = schema_default("steve_decoder.num_blocks")
    steve_heads: int = schema_default("steve_decoder.num_heads")
    steve_d_model: int = schema_default("steve_decoder.d_model")
    steve_dropout: float = schema_default("steve_decoder.dropout")
    steve_detach_slots: bool = schema_default("steve_decoder.detach_slots")
    # model.loss_weights; a weight left out is DEFAULT_LOSS_WEIGHTS'
    loss_weights: dict[str, float] = field(default_factory=dict)
    ss_temperature: float = schema_default("losses.loss_ss.temperature")
    ss_batch_contrast: bool = schema_default("losses.loss_ss.batch_contrast")

    @classmethod
    def from_config(
        cls, cfg: Any, feature_dim: int, num_tokens: int, token_grid: tuple[int, int] | None = None
    ) -> SlotModelConfig:
        """From a full egoslots config (``model``, ``grouper``, ``predictor``, ``decoder``,
        ``steve_decoder``, ``losses``, ``dvae.vocab_size``, ``inference.restarts``)."""
        m, g, p, sd = cfg.model, cfg.grouper, cfg.predictor, cfg.steve_decoder
        return cls(
            feature_dim=feature_dim,
            num_tokens=num_tokens,
            num_slots=int(m.num_slots),
            slot_dim=int(m.slot_dim),
            initializer=str(m.initializer.name),
            restarts=inference_restarts(cfg),
            n_iters=int(g.n_iters),
            n_iters_first=int(g.n_iters_first),
            eps=float(g.eps),
            mlp_ratio=int(g.mlp_ratio),
            invariant=bool(g.invariant),
            position_embedding=bool(g.position_embedding),
            predictor=bool(p.enabled),
            predictor_heads=int(p.num_heads),
            predictor_ffn_ratio=int(p.ffn_ratio),
            predictor_attn_scale=str(p.attn_scale),
            decoder_hidden_dims=tuple(int(h) for h in cfg.decoder.hidden_dims),
            decoder_mixing=str(cfg.decoder.mixing),
            decoder_positions=str(cfg.decoder.positions),
            steve=bool(sd.enabled),
            vocab_size=int(cfg.dvae.vocab_size),
            token_grid=None if token_grid is None else (int(token_grid[0]), int(token_grid[1])),
            steve_blocks=int(sd.num_blocks),
            steve_heads=int(sd.num_heads),
            steve_d_model=int(sd.d_model),
            steve_dropout=float(sd.dropout),
            steve_detach_slots=bool(sd.detach_slots),
            loss_weights={k: float(v) for k, v in dict(m.loss_weights).items()},
            ss_temperature=float(cfg.losses.loss_ss.temperature),
            ss_batch_contrast=bool(cfg.losses.loss_ss.batch_contrast),
        )


class SlotModel(nn.Module):
    def __init__(self, config: SlotModelConfig):
        super().__init__()
        c = self.config = config
        self.num_slots, self.slot_dim = c.num_slots, c.slot_dim
        square = self._square_grid(c)  # (side, side) when an option needs token positions
        self.feature_mlp = FeatureMLP(
            c.feature_dim, c.slot_dim, position_grid=square if c.position_embedding else None
        )
        self.initializer = build_initializer(c.initializer, c.num_slots, c.slot_dim)
        grid = square if c.invariant else None  # ISA: slot positions on the token grid
        corrector = (
            InvariantSlotAttention(c.slot_dim, grid, mlp_ratio=c.mlp_ratio, eps=c.eps)
            if c.invariant
            else SlotAttention(c.slot_dim, mlp_ratio=c.mlp_ratio, eps=c.eps)
        )
        self.processor = SlotScan(
            corrector,
            SlotPredictor(
                c.slot_dim, c.predictor_heads, c.predictor_ffn_ratio, c.predictor_attn_scale
            )
            if c.predictor
            else None,
            n_iters=c.n_iters,
            n_iters_first=c.n_iters_first,
        )
        self.decoder = MLPBroadcastDecoder(
            c.slot_dim,
            c.feature_dim,
            c.num_tokens,
            c.decoder_hidden_dims,
            c.decoder_mixing,
            relative_grid=grid,
            positions=c.decoder_positions,
        )
        self.steve = None
        self.token_grid = None
        if c.steve:
            if c.token_grid is None:
                raise ValueError(
                    "the STEVE decoder (steve_decoder.enabled) needs the token grid (h, w)"
                )
            self.token_grid = tuple(c.token_grid)
            self.steve = SteveDecoder(
                c.slot_dim,
                c.vocab_size,
                c.token_grid[0] * c.token_grid[1],
                c.steve_blocks,
                c.steve_heads,
                c.steve_d_model,
                c.steve_dropout,
            )
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **c.loss_weights}
        if self.steve is None:
            self.loss_weights.pop("loss_steve_ce")
        self.ss_temperature = c.ss_temperature
        self.ss_batch_contrast = c.ss_batch_contrast

    @staticmethod
    def _square_grid(c: SlotModelConfig) -> tuple[int, int] | None:
        """The token grid (side, side) that ``grouper.invariant`` and
        ``grouper.position_embedding`` place tokens on; None when neither is on."""
        options = [key for key in ("invariant", "position_embedding") if getattr(c, key)]
        if not options:
            return None
        side = math.isqrt(c.num_tokens)
        if side * side != c.num_tokens:
            raise ValueError(
                f"grouper.{options[0]} needs a square token grid; the store has {c.num_tokens} "
                f"tokens per frame: set grouper.{options[0]}=false"
            )
        return side, side

    @classmethod
    def from_config(
        cls, cfg: Any, feature_dim: int, num_tokens: int, token_grid: tuple[int, int] | None = None
    ) -> SlotModel:
        """Build from a full egoslots config (see :meth:`SlotModelConfig.from_config`)."""
        return cls(SlotModelConfig.from_config(cfg, feature_dim, num_tokens, token_grid))

    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor | None = None,
        init_state: torch.Tensor | None = None,
        first_slots: torch.Tensor | None = None,
    ) -> dict:
        """features (B, T, N, F); tokens (B, T, h, w) int ids (the STEVE decoder runs only when
        they are given, so evaluation may leave them out); init_state (B, K, D): slots carried
        from the previous window (its ``next_state``). Every frame of a window that starts from
        ``init_state`` gets ``grouper.n_iters`` iterations, so windows chain exactly.
        first_slots (B, K, D): the initializer's slots for a video's first window, drawn by the
        caller (:meth:`best_first_slots`); None: drawn here."""
        B, T = features.shape[:2]
        inputs = self.feature_mlp(features)  # (B, T, N, D)
        if init_state is not None:
            init = init_state  # (B, K, D) carried from the previous window
        elif first_slots is not None:
            init = first_slots  # (B, K, D)
        else:
            init = self.draw_first_slots(features, inputs)  # (B, K, D)
        state, state_predicted, sa_masks, geometry = self.processor(
            init, inputs, carried=init_state is not None
        )  # (B, T, K, D), (B, T, K, D), (B, T, K, N), (B, T, K, 4) | None
        reconstruction, dec_masks = self.decoder(
            state, sa_masks if self.decoder.mixing == "attention" else None, geometry
        )  # (B, T, N, F), (B, T, K, N)
        outputs = {
            "encoder": {"backbone_features": features},
            "processor": {
                "state": state,
                "state_predicted": state_predicted,
                "corrector": {"masks": sa_masks},
            },
            "decoder": {"reconstruction": reconstruction, "masks": dec_masks},
            "next_state": state_predicted[:, -1],  # (B, K, D)
        }
        if geometry is not None:  # Invariant Slot Attention: (y, x, scale_y, scale_x) per slot
            outputs["processor"]["geometry"] = geometry
        if tokens is not None:
            outputs["dvae"] = {"z_hard": tokens}
        if self.steve is not None and tokens is not None:  # no tokens: slots only (evaluation)
            # detach_slots: the decoder learns to read the slots but does not shape them
            slots = state.detach() if self.config.steve_detach_slots else state  # (B, T, K, D)
            logits, masks = self.steve(slots.flatten(0, 1), tokens.flatten(0, 1))
            outputs["steve"] = {
                "logits": logits.unflatten(0, (B, T)),  # (B, T, h*w, V)
                "masks": masks.unflatten(0, (B, T)),  # (B, T, K, h*w)
            }
        return outputs

    def draw_first_slots(
        self, features: torch.Tensor, inputs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The initializer's first slots (B, K, D) for videos whose first window is ``features``
        (B, T, N, F); ``inputs``: their feature-MLP outputs (B, T, N, D) if already computed.
        A k-means initializer clusters the first frame; the others do not look at the data."""
        if not isinstance(self.initializer, KMeansInit):
            return self.initializer(features.shape[0])
        first = self.feature_mlp(features[:, 0]) if inputs is None else inputs[:, 0]
        return self.initializer(features[:, 0], first)  # (B, K, D)

    @torch.no_grad()
    def best_first_slots(self, features: torch.Tensor, restarts: int | None = None) -> torch.Tensor:
        """First slots (B, K, D) for videos whose first window is ``features`` (B, T, N, F).

        Slot attention from random first slots is, like k-means from a random init, a local
        search: some draws merge two objects into one slot. So, as k-means runs ``n_init``
        times and keeps the lowest inertia, this draws ``restarts`` (default ``config.restarts``)
        sets of first slots per video, runs the window from each (one batch), and keeps the set
        whose reconstruction of the window's features has the lowest mean squared error. No
        labels are used. With one restart (or a fixed initializer, whose draws are all equal)
        this is exactly :meth:`draw_first_slots`, the draw a plain forward makes; on the CPU that
        draw is also the first of the R candidates, so the kept draw never reconstructs worse.
        A k-means initializer's draws are R clusterings from different k-means++ seeds.
        """
        r = int(self.config.restarts if restarts is None else restarts)
        B = features.shape[0]
        if r <= 1 or isinstance(self.initializer, FixedInit):
            return self.draw_first_slots(features)  # (B, K, D)
        if isinstance(self.initializer, KMeansInit):  # r clusterings, one after another
            draws = torch.stack([self.draw_first_slots(features) for _ in range(r)])
        else:
            draws = self.initializer(r * B).unflatten(0, (r, B))  # (r, B, K, D)
        x = features.repeat(r, 1, 1, 1)  # (r*B, T, N, F), restart-major like the draws
        out = self(x, first_slots=draws.flatten(0, 1))
        error = (out["decoder"]["reconstruction"].float() - x.float()).pow(2)
        error = error.mean((1, 2, 3)).view(r, B)  # (r, B)
        best = error.argmin(0)  # (B,)
        return draws[best, torch.arange(B)]  # (B, K, D)

    def parameter_parts(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(the slot model's parameters, the STEVE decoder's): clipped apart when the decoder is
        detached from the slots (``steve_decoder.detach_slots``)."""
        steve = list(self.steve.parameters()) if self.steve is not None else []
        ids = {id(p) for p in steve}
        return [p for p in self.parameters() if id(p) not in ids], steve

    def losses(
        self, outputs: dict, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> dict:
        """Enabled losses and ``loss`` = their sum weighted by ``model.loss_weights``.

        A loss whose weight is 0 is not computed (nor returned). ``gather`` is passed to the
        slot-slot contrastive loss (DDP all-gather with gradients).
        """
        w = self.loss_weights
        out: dict[str, torch.Tensor] = {}
        if w["loss_featrec"] != 0:
            out["loss_featrec"] = loss_featrec(
                outputs["decoder"]["reconstruction"], outputs["encoder"]["backbone_features"]
            )
        if w["loss_ss"] != 0:
            out["loss_ss"] = loss_slot_slot_contrast(
                outputs["processor"]["state"], self.ss_temperature, self.ss_batch_contrast, gather
            )
        if self.steve is not None and w["loss_steve_ce"] != 0:
            if "steve" not in outputs:
                raise ValueError(
                    "the STEVE decoder is on (steve_decoder.enabled) but forward() got no tokens: "
                    "pass the cached dVAE token ids to train it"
                )
            out["loss_steve_ce"] = loss_steve_ce(
                outputs["steve"]["logits"], outputs["dvae"]["z_hard"]
            )
        if not out:
            raise ValueError("every loss weight in model.loss_weights is 0: nothing to train")
        out["loss"] = sum(w[name] * value for name, value in out.items())
        return out


__all__ = ["SlotModel", "SlotModelConfig", "DEFAULT_LOSS_WEIGHTS"]
