"""STEVE's discrete VAE: frames -> a grid of token ids from a vocabulary, and back.

The dVAE is pretrained on its own in stage 2 (`egoslots pretrain-dvae`); its hard tokens are
what stage 3's STEVE decoder learns to predict from the slots. The layer list is STEVE's
(``singhgautam/steve``, ``dvae.py``; Singh et al. 2022):

- Encoder: conv 4x4 stride 4 (3 -> C), six conv 1x1 (C -> C), conv 1x1 -> vocabulary logits,
  log-softmax over the vocabulary. A frame of S px gives an (S/4, S/4) token grid.
- Decoder: conv 1x1 (V -> C), conv 3x3, two conv 1x1, conv 1x1 (-> 4C), PixelShuffle(2), conv 3x3,
  two conv 1x1, conv 1x1 (-> 4C), PixelShuffle(2), conv 1x1 -> 3. No output activation.
- The two output convs have Xavier-uniform init and zero bias (STEVE's ``conv2d`` helper).

Each hidden conv is a block whose kind ``arch`` chooses (``dvae.arch``):

- ``steve`` (default): STEVE's ``Conv2dBlock``, conv **with bias** (Kaiming-uniform weights, zero
  bias) -> ReLU. No normalisation layer anywhere in the network.
- ``slate``: SLATE's block (Singh et al. 2021, STEVE's predecessor; ``singhgautam/slate``), conv
  without bias (Kaiming-uniform) -> one-group GroupNorm with affine weights -> ReLU. This is what
  egoslots built before ``dvae.arch`` existed; its runs keep loading as ``slate``. The two nets
  give different tokens for the same conv weights, so the arch is part of every dVAE's identity
  (the weights file, whose hash names the token cache, has different tensors).

Training draws a relaxed Gumbel-softmax sample ``z_soft`` (tau cosine-annealed 1.0 -> 0.1 over
30k steps; noise from the global RNG or from one seed per frame) that feeds the decoder; the hard tokens are the argmax of that same noisy sample,
detached. (STEVE draws fresh noise for its hard sample; each is a sample of the same categorical
distribution, so this saves a second pass over (B, V, h, w) for no change in law.)
Reconstruction loss: squared error **summed over pixels and channels, divided by the number of
frames** (STEVE's ``dvae_mse``), on frames in [0, 1] without mean/std normalisation.

Optional, off by default: a KL term to a uniform prior over codes (DALL-E's dVAE),
``kl_weight * KL(q || U)``, and GECO (EfficientMORL) to balance it against reconstruction.

For caching, :meth:`DVAE.encode_ids` gives the deterministic argmax ids (no noise), and
:meth:`DVAE.decode_ids` turns ids back into pictures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from egoslots.pipeline.checkpoints import load_weights
from egoslots.pipeline.config_schema import DVAE_ARCHS
from egoslots.pipeline.records import read_json

MAX_VOCAB = 65536  # token ids are cached as uint16
PATCH = 4  # pixels per token side: two PixelShuffle(2) in the decoder


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
ARCHS = DVAE_ARCHS  # dvae.arch: which paper's conv block the hidden layers use


class ConvBlock(nn.Module):
    """A conv and what follows it (:meth:`activate`); ``decode_ids`` uses the two parts apart."""

    conv: nn.Conv2d

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.conv(x))


class SteveConvBlock(ConvBlock):
    """STEVE's Conv2dBlock: conv with bias (Kaiming-uniform weights, zero bias) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=True)
        nn.init.kaiming_uniform_(self.conv.weight, nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """What follows the conv (the bias is inside it)."""
        return F.relu(x)


class SlateConvBlock(ConvBlock):
    """SLATE's conv block: conv without bias (Kaiming-uniform) -> GroupNorm(1 group) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        nn.init.kaiming_uniform_(self.conv.weight, nonlinearity="relu")
        self.norm = nn.GroupNorm(1, c_out)

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """What follows the conv: normalisation, then ReLU."""
        return F.relu(self.norm(x))


BLOCKS = {"steve": SteveConvBlock, "slate": SlateConvBlock}


def check_arch(arch: str) -> str:
    if arch not in BLOCKS:
        raise ValueError(f"dvae.arch={arch!r} is not one of {', '.join(ARCHS)}")
    return arch


def infer_arch(state: dict) -> str:
    """The arch a dVAE state dict was saved from: SLATE's blocks have GroupNorm weights."""
    return "slate" if any(".norm." in key for key in state) else "steve"


def output_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """A 1x1 output conv with STEVE's default init (Xavier-uniform weights, zero bias)."""
    conv = nn.Conv2d(c_in, c_out, 1)
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def gumbel_tau(step: int, start: float = 1.0, final: float = 0.1, steps: int = 30000) -> float:
    """STEVE's cosine temperature: ``0.5(s-f)cos(pi p) + 0.5(s+f)``, ``p = min(step/steps, 1)``."""
    p = min(max(step, 0) / max(steps, 1), 1.0)
    return 0.5 * (start - final) * math.cos(math.pi * p) + 0.5 * (start + final)


def seeded_gumbel_noise(like: torch.Tensor, frame_seeds: Sequence[int]) -> torch.Tensor:
    """Gumbel(0, 1) noise shaped like ``like`` (B, ...), frame i drawn from a generator seeded
    with ``frame_seeds[i]``: a frame's noise depends on its seed alone, not on which process or
    batch draws it (stage 2 keys the seed by the frame's place in the global sample stream, so
    DDP ranks and resumed runs draw what one uninterrupted process draws)."""
    noise = torch.empty_like(like)
    for i, seed in enumerate(frame_seeds):
        generator = torch.Generator(device=like.device).manual_seed(int(seed))
        noise[i].exponential_(generator=generator)
    return -noise.log()  # as F.gumbel_softmax: -log(Exp(1))


@dataclass
class DVAEOutput:
    recon: torch.Tensor  # (B, 3, S, S) decoder output from the relaxed sample, unclamped
    log_probs: torch.Tensor  # (B, V, h, w) log-softmax of the encoder logits
    ids: torch.Tensor  # (B, h, w) int64 hard tokens of this sample (detached)


# --------------------------------------------------------------------------------------------
# The dVAE
# --------------------------------------------------------------------------------------------
class DVAE(nn.Module):
    """STEVE's dVAE (``arch="slate"``: SLATE's blocks). ``forward(frames, tau)`` trains;
    ``encode_ids``/``decode_ids`` for use."""

    def __init__(
        self, vocab_size: int = 4096, hidden: int = 64, channels: int = 3, arch: str = "steve"
    ):
        super().__init__()
        if not 2 <= vocab_size <= MAX_VOCAB:
            raise ValueError(
                f"dVAE vocabulary must be in [2, {MAX_VOCAB}] (ids are cached as uint16), got {vocab_size}"
            )
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.arch = check_arch(arch)
        block = BLOCKS[arch]
        c = hidden
        self.encoder = nn.Sequential(
            block(channels, c, kernel=PATCH, stride=PATCH),
            *[block(c, c) for _ in range(6)],
            output_conv(c, vocab_size),
        )
        self.decoder = nn.Sequential(
            block(vocab_size, c),
            block(c, c, kernel=3, padding=1),
            block(c, c),
            block(c, c),
            block(c, 4 * c),
            nn.PixelShuffle(2),
            block(c, c, kernel=3, padding=1),
            block(c, c),
            block(c, c),
            block(c, 4 * c),
            nn.PixelShuffle(2),
            output_conv(c, channels),
        )

    def token_grid(self, frame_size: int) -> tuple[int, int]:
        return frame_size // PATCH, frame_size // PATCH

    def log_probs(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, V, S/4, S/4) log-probabilities over the vocabulary."""
        return F.log_softmax(self.encoder(frames), dim=1)

    def forward(
        self, frames: torch.Tensor, tau: float, frame_seeds: Sequence[int] | None = None
    ) -> DVAEOutput:
        """A relaxed Gumbel-softmax sample of the tokens, decoded. The noise is F.gumbel_softmax's
        (global RNG), or with ``frame_seeds`` (one per frame) :func:`seeded_gumbel_noise`."""
        log_probs = self.log_probs(frames)  # (B, V, h, w)
        if frame_seeds is None:
            z_soft = F.gumbel_softmax(log_probs, tau=tau, hard=False, dim=1)  # (B, V, h, w)
        else:
            noise = seeded_gumbel_noise(log_probs, frame_seeds)  # (B, V, h, w)
            z_soft = ((log_probs + noise) / tau).softmax(dim=1)  # F.gumbel_softmax's formula
        ids = z_soft.detach().argmax(dim=1)  # (B, h, w) hard tokens of the same sample
        recon = self.decoder(z_soft)  # (B, 3, S, S)
        return DVAEOutput(recon=recon, log_probs=log_probs, ids=ids)

    @torch.no_grad()
    def encode_ids(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, S/4, S/4) argmax token ids (int64): the cached tokens."""
        return self.encoder(frames).argmax(dim=1)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) token ids -> (B, 3, 4h, 4w) pictures (unclamped; clamp to [0, 1] to show).

        The decoder's first conv is 1x1, so on a one-hot input it picks one column of its weight
        (plus its bias, STEVE's block): an embedding lookup, which avoids building a
        (B, V, h, w) one-hot tensor.
        """
        first = self.decoder[0]  # block(V, C) with a 1x1 conv
        table = first.conv.weight.flatten(1).t()  # (V, C)
        x = F.embedding(ids.long(), table).permute(0, 3, 1, 2)  # (B, C, h, w) = W @ one_hot(ids)
        if first.conv.bias is not None:
            x = x + first.conv.bias.view(1, -1, 1, 1)  # (B, C, h, w) = conv(one_hot(ids))
        x = first.activate(x)
        return self.decoder[1:](x)  # (B, 3, S, S)


# --------------------------------------------------------------------------------------------
# Losses and code statistics
# --------------------------------------------------------------------------------------------
def reconstruction_loss(recon: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """STEVE's dVAE loss: squared error summed over pixels and channels / number of frames."""
    return (recon.float() - frames.float()).pow(2).sum() / frames.shape[0]


def kl_to_uniform(log_probs: torch.Tensor) -> torch.Tensor:
    """KL(q || uniform) of the per-token code distributions, summed over tokens / frames.

    ``KL = sum_v q_v (log q_v + log V)``; zero when every token is maximally uncertain, as in
    DALL-E's dVAE prior term.
    """
    log_probs = log_probs.float()
    vocab = log_probs.shape[1]
    kl = (log_probs.exp() * (log_probs + math.log(vocab))).sum(dim=1)  # (B, h, w)
    return kl.sum() / log_probs.shape[0]


@torch.no_grad()
def code_usage(ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Perplexity of the code histogram of ``ids`` and the fraction of codes used at least once."""
    counts = torch.bincount(ids.flatten(), minlength=vocab_size).float()
    p = counts / counts.sum()
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return entropy.exp(), (counts > 0).float().mean()


class Geco(nn.Module):
    """GECO (EfficientMORL): a Lagrange multiplier that holds reconstruction at a target.

    ``C_t = target - err_t``; ``C_ema <- ema * C_ema + (1 - ema) * C_t``; after ``warmup_steps``
    steps, ``beta <- max(beta_min, beta - eta * C_ema)``; the loss is
    ``KL - softplus(beta) * (C_t + stopgrad(C_ema - C_t))``. So the reconstruction weight
    ``softplus(beta)`` rises while the error is above its target and falls (down to
    ``softplus(beta_min)`` ~ 1) once it is below. ``err_t`` is the reconstruction loss in its own
    units (summed squared error per frame); ``target`` is given per pixel value (a mean squared
    error, easier to choose) and scaled by ``values_per_frame`` (S*S*3). The state lives in
    buffers, so it is saved in training checkpoints.
    """

    def __init__(
        self,
        target: float,
        values_per_frame: int,
        eta: float = 1e-6,
        ema: float = 0.99,
        warmup_steps: int = 1000,
        beta_init: float = 1.0,
        beta_min: float = 0.55,
    ):
        super().__init__()
        self.target = float(target) * values_per_frame
        self.eta, self.ema, self.warmup_steps, self.beta_min = eta, ema, warmup_steps, beta_min
        self.register_buffer("beta", torch.tensor(float(beta_init)))
        self.register_buffer("c_ema", torch.tensor(0.0))

    @property
    def weight(self) -> torch.Tensor:
        return F.softplus(self.beta)

    def forward(self, recon_err: torch.Tensor, prior: torch.Tensor, step: int) -> torch.Tensor:
        """The GECO loss at training step ``step``; updates the moving average and the multiplier."""
        c_t = self.target - recon_err  # > 0: better than the target
        with torch.no_grad():
            if step == 0:
                self.c_ema.copy_(c_t.detach())
            else:
                self.c_ema.mul_(self.ema).add_((1 - self.ema) * c_t.detach())
            if step >= self.warmup_steps:
                self.beta.copy_(torch.clamp(self.beta - self.eta * self.c_ema, min=self.beta_min))
        return prior - self.weight * (c_t + (self.c_ema - c_t).detach())


# --------------------------------------------------------------------------------------------
# Loading a trained dVAE (stage 2 writes dvae.pt + dvae.json into its run directory)
# --------------------------------------------------------------------------------------------
def load_dvae(run_dir: str | Path, map_location: str | torch.device = "cpu") -> DVAE:
    """The trained dVAE of a `pretrain-dvae` run directory (weights from ``dvae.pt``), in eval mode."""
    run_dir = Path(run_dir)
    info_path, weights = run_dir / "dvae.json", run_dir / "dvae.pt"
    if not info_path.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{run_dir} holds no trained dVAE (dvae.json / dvae.pt missing): run `egoslots pretrain-dvae CONFIG`"
        )
    info = read_json(info_path, "the dVAE's record")
    state = load_weights(
        weights,
        map_location,
        damaged=f"it is truncated or damaged: rerun `egoslots pretrain-dvae --overwrite` with "
        f"{run_dir / 'config.yaml'}, or restore it from a copy",
    )
    # Runs from before dvae.arch existed have no "arch" in dvae.json: their weights say which.
    arch = info.get("arch") or infer_arch(state)
    model = DVAE(vocab_size=int(info["vocab_size"]), hidden=int(info.get("hidden", 64)), arch=arch)
    model.load_state_dict(state)
    return model.eval()
