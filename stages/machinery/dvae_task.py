"""The LightningModule of pretrain-dvae: one training step of STEVE's dVAE.

:class:`DVAETask` wraps :class:`egoslots.pipeline.dvae.DVAE`: the relaxed Gumbel-softmax reconstruction
(tau annealed by :func:`egoslots.pipeline.dvae.gumbel_tau`), the optional KL prior and GECO, Adam, and
the logged statistics (``train/loss_dvae_recon``, ``train/tau``, ``train/perplexity``,
``train/codes_used``, ``train/geco_beta``). Each frame's Gumbel noise comes from its own seed
(:meth:`DVAETask.frame_seeds`), so any number of ranks, and a resumed run, train the weights of
one uninterrupted process. The frames, the NaN guard and the pictures are not here
(``stages/machinery/datamodules.py``, ``stages/machinery/callbacks.py``).
"""

from __future__ import annotations

import lightning as L
import torch

from egoslots.pipeline.dvae import (
    DVAE,
    Geco,
    code_usage,
    gumbel_tau,
    kl_to_uniform,
    reconstruction_loss,
)
from egoslots.stages.machinery.callbacks import add_loss_watch, watch_loss
from egoslots.stages.machinery.speed_probe import (
    PrecisionProbe,
    model_signature,
    training_step_timer,
)


class DVAETask(L.LightningModule):
    """One training step of the dVAE: Gumbel-softmax reconstruction (+ optional prior / GECO)."""

    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        frame_size: int,
        lr: float,
        tau_start: float,
        tau_final: float,
        tau_steps: int,
        kl_weight: float = 0.0,
        geco: dict | None = None,
        seed: int = 0,
        arch: str = "steve",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.dvae = DVAE(vocab_size, hidden, arch=arch)
        self.geco = None
        if geco and geco.get("enabled"):
            self.geco = Geco(
                geco["target"],
                frame_size * frame_size * 3,
                eta=geco["eta"],
                ema=geco["ema"],
                warmup_steps=geco["warmup_steps"],
                beta_init=geco["beta_init"],
                beta_min=geco["beta_min"],
            )
        add_loss_watch(self)  # the first step whose loss was not finite, for the LossGuard

    @property
    def seed(self) -> int:
        return int(self.hparams.seed)

    @property
    def world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def frame_seeds(self, step: int, batch: int) -> list[int]:
        """The Gumbel-noise seed of each frame of this rank's batch at ``step``: keyed by the
        frame's position in the global sample stream, so DDP ranks (each with a slice of the
        global batch) and resumed runs draw exactly the noise one uninterrupted process draws."""
        first = (step * self.world + self.global_rank) * batch  # this rank's frame 0
        return [(self.seed << 40) + first + i for i in range(batch)]

    def tau(self, step: int) -> float:
        h = self.hparams
        return gumbel_tau(step, h.tau_start, h.tau_final, h.tau_steps)

    def configure_optimizers(self):
        return torch.optim.Adam(self.dvae.parameters(), lr=self.hparams.lr)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        step = self.global_step
        frames = batch.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, S, S) in [0, 1]
        tau = self.tau(step)
        out = self.dvae(frames, tau, frame_seeds=self.frame_seeds(step, len(frames)))
        recon = reconstruction_loss(out.recon, frames)
        sync = self.world > 1  # logged values: means over the ranks (the global batch's values)
        prior = frames.new_zeros(())
        if self.hparams.kl_weight > 0:
            kl = kl_to_uniform(out.log_probs)
            prior = self.hparams.kl_weight * kl
            self.log("train/kl", kl, sync_dist=sync)
        if self.geco is not None:
            loss = self.geco(self._global_value(recon), prior, step)
            self.log("train/geco_beta", self.geco.beta)
            self.log("train/geco_weight", self.geco.weight)
        else:
            loss = recon + prior
        watch_loss(self, loss)

        perplexity, used = code_usage(out.ids, self.hparams.vocab_size)
        self.log("train/loss_dvae_recon", recon, prog_bar=True, sync_dist=sync)
        self.log("train/loss", loss, sync_dist=sync)
        self.log(
            "train/mse", recon / frames[0].numel(), sync_dist=sync
        )  # per pixel value, comparable across sizes
        self.log("train/tau", tau, prog_bar=True)
        self.log("train/perplexity", perplexity, sync_dist=sync)
        self.log("train/codes_used", used, sync_dist=sync)
        return {"loss": loss, "recon": out.recon.detach()}  # recon: ReconstructionPictures

    def _global_value(self, value: torch.Tensor) -> torch.Tensor:
        """Under DDP: the mean of ``value`` over the ranks, with this rank's gradient.

        GECO's multiplier follows the reconstruction error; every rank must see the global
        batch's error (as one process would) or the ranks' multipliers drift apart.
        """
        if self.world == 1:
            return value
        import torch.distributed as dist

        mean = value.detach().clone()
        dist.all_reduce(mean)
        return value + (mean / self.world - value.detach())


def precision_probe(task: DVAETask, batch: int, device: str) -> PrecisionProbe:
    """``dvae.precision: auto``'s probe: this run's own dVAE step (a copy of its dVAE, random
    frames of its batch shape) in each precision (``stages/machinery/runtime.choose_precision``)."""
    size = int(task.hparams.frame_size)

    def make_step():
        frames = torch.rand(batch, 3, size, size, device=device)
        seeds = list(range(batch))

        def loss_of(dvae):
            return reconstruction_loss(dvae(frames, 1.0, frame_seeds=seeds).recon, frames)

        return training_step_timer(task.dvae, loss_of, device)

    shape = {"model": model_signature(task.dvae), "frames": [batch, 3, size, size]}
    return PrecisionProbe("pretrain-dvae", shape, make_step)
