"""Lightning callbacks of the training stages: the NaN guard, the final checkpoint, the pictures.

- :class:`LossGuard` is the one NaN/inf guard. A training step records the first step whose loss
  is not finite with :func:`watch_loss` (on the device: no host sync per step); the guard reads
  it on the CPU after every step, elsewhere every ``every`` steps, at the last step and before
  every checkpoint is saved, and raises :class:`~egoslots.stages.machinery.common.TrainingDiverged`, so no
  checkpoint ever holds the damage. Under DDP every rank checks at the same steps and they agree
  on the first bad step of any rank, so all stop together.
- :class:`FinalCheckpoint`: train-slots ends with ``step=N.ckpt`` and ``last.ckpt`` of its last
  step N.
- :class:`SlotPictures` / :class:`ReconstructionPictures`: slot masks over a fixed clip, and the
  dVAE's frames vs reconstructions, in TensorBoard.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from egoslots.stages.machinery.common import TrainingDiverged
from egoslots.stages.machinery.pictures import masks_overlay
from egoslots.stages.machinery.rundirs import checkpoint_step


# --------------------------------------------------------------------------------------------
# NaN / inf
# --------------------------------------------------------------------------------------------
def add_loss_watch(module: torch.nn.Module) -> None:
    """Give a LightningModule the buffer :func:`watch_loss` fills (-1: every loss was finite)."""
    module.register_buffer("first_bad_step", torch.tensor(-1, dtype=torch.long), persistent=False)


def watch_loss(module, loss: torch.Tensor) -> None:
    """In ``training_step``: remember this step if its loss is the first that is not finite."""
    bad = ~torch.isfinite(loss.detach())
    module.first_bad_step = torch.where(
        bad & (module.first_bad_step < 0),
        torch.full_like(module.first_bad_step, module.global_step),
        module.first_bad_step,
    )


def first_bad_step_of_all_ranks(module: L.LightningModule) -> torch.Tensor:
    """``module.first_bad_step``; under DDP the first over all ranks (-1: none). Every rank checks
    at the same steps, so they agree and stop together instead of one rank leaving the others
    blocked in the next all-reduce."""
    first = module.first_bad_step
    trainer = module._trainer
    if trainer is None or trainer.world_size < 2 or not torch.distributed.is_initialized():
        return first
    never = torch.iinfo(first.dtype).max
    first = torch.where(first < 0, never, first)
    torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
    return torch.where(first == never, -1, first)


class LossGuard(Callback):
    """Stops training when the loss became NaN/inf, before any checkpoint holds the damage.

    ``what`` names the loss in the message ("training", "dVAE"), ``advice`` says what to try;
    steps are counted from 1, as checkpoints are (the loss of step N would be in step=N.ckpt).
    """

    def __init__(self, every: int, ckpt_dir: Path, what: str, advice: str):
        self.every, self.ckpt_dir = max(1, int(every)), ckpt_dir
        self.what, self.advice = what, advice

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if (
            pl_module.device.type == "cpu"  # reading the flag costs no sync on the CPU
            or step % self.every == 0
            or step >= (trainer.max_steps or 0)
        ):
            self.check(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.check(pl_module)  # every rank saves: they agree, and no checkpoint of bad weights

    def check(self, pl_module, all_ranks: bool = True) -> None:
        """Raise TrainingDiverged if a loss so far was not finite (on any rank: a collective)."""
        bad = int(first_bad_step_of_all_ranks(pl_module) if all_ranks else pl_module.first_bad_step)
        if bad < 0:
            return
        last = self.ckpt_dir / "last.ckpt"
        where = (
            f"the last good checkpoint is {last}"
            if last.exists()
            else "no checkpoint was written yet"
        )
        raise TrainingDiverged(
            f"the {self.what} loss became NaN/inf at step {bad + 1}; training stopped and "
            f"{where}. {self.advice}"
        )


# --------------------------------------------------------------------------------------------
# The last step's checkpoint
# --------------------------------------------------------------------------------------------
class FinalCheckpoint(Callback):
    """At the end: step=N.ckpt when N is not a multiple of ckpt_every, and last.ckpt whenever it
    is not step N (e.g. a write of last.ckpt failed, and the rerun resumed from step=N.ckpt)."""

    def __init__(self, ckpt_dir: Path, guard: LossGuard):
        self.ckpt_dir, self.guard = ckpt_dir, guard

    def on_train_end(self, trainer, pl_module):
        if trainer.interrupted:
            return
        self.guard.check(pl_module)
        step = trainer.global_step
        path, last = self.ckpt_dir / f"step={step}.ckpt", self.ckpt_dir / "last.ckpt"
        if not path.exists():
            trainer.save_checkpoint(path)
            trainer.save_checkpoint(last)
        elif not last.exists() or _step_or_none(last) != step:
            trainer.save_checkpoint(last)


def _step_or_none(path: Path) -> int | None:
    try:
        return checkpoint_step(path)
    except Exception:  # noqa: BLE001 - a damaged last.ckpt is rewritten like a stale one
        return None


# --------------------------------------------------------------------------------------------
# Pictures in TensorBoard
# --------------------------------------------------------------------------------------------
def _experiment(trainer):
    """The TensorBoard writer, or None (no logger, or one that takes no images)."""
    experiment = getattr(trainer.logger, "experiment", None)
    return experiment if hasattr(experiment, "add_image") else None


class SlotPictures(Callback):
    """Every ``every`` steps (and after the first): slot masks over the frames of one fixed clip."""

    def __init__(
        self, every: int, clip: dict | None, grid: tuple[int, int], token_grid: tuple | None
    ):
        self.every, self.clip = max(1, int(every)), clip
        self.grid, self.token_grid = grid, token_grid

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.clip is None or not (step == 1 or step % self.every == 0):
            return
        self.draw(trainer, pl_module, step)

    @rank_zero_only
    def draw(self, trainer, pl_module, step: int) -> None:
        import torchvision

        experiment = _experiment(trainer)
        if experiment is None:
            return
        clip = self.clip
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad(), torch.autocast(pl_module.device.type, enabled=False):
            feats = clip["features"][None].to(pl_module.device)
            tokens = clip["tokens"][None].to(pl_module.device) if "tokens" in clip else None
            out = pl_module.model(feats, tokens)
        pl_module.train(was_training)
        frames = clip["frames"].numpy()  # (T, S, S, 3)
        rows = [
            frames,
            masks_overlay(frames, out["decoder"]["masks"][0], self.grid),
            masks_overlay(frames, out["processor"]["corrector"]["masks"][0], self.grid),
        ]
        names = "rows: frames | feature-decoder masks | slot-attention masks"
        if "steve" in out and self.token_grid is not None:
            rows.append(masks_overlay(frames, out["steve"]["masks"][0], tuple(self.token_grid)))
            names += " | STEVE attention masks"
        images = torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2).float() / 255
        grid_img = torchvision.utils.make_grid(images, nrow=len(frames), padding=2)
        experiment.add_image("slots/masks_over_time", grid_img, step)
        experiment.add_text("slots/legend", names, step)


class ReconstructionPictures(Callback):
    """Every ``every`` steps: the dVAE's input frames, its reconstructions from the relaxed sample
    (the training step's ``recon`` output) and from the argmax tokens."""

    def __init__(self, every: int, count: int = 8):
        self.every, self.count = int(every), count

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the step that just ran
        if self.every and step % self.every == 0:
            self.draw(trainer, pl_module, outputs["recon"], batch, step)

    @rank_zero_only
    @torch.no_grad()
    def draw(self, trainer, pl_module, recon: torch.Tensor, batch: torch.Tensor, step: int) -> None:
        from torchvision.utils import make_grid

        experiment = _experiment(trainer)
        if experiment is None:
            return
        x = batch[: self.count].permute(0, 3, 1, 2).float().div_(255)  # (n, 3, S, S) in [0, 1]
        hard = pl_module.dvae.decode_ids(pl_module.dvae.encode_ids(x))
        rows = torch.cat([x, recon[: self.count].float(), hard.float()]).clamp(0, 1)
        experiment.add_image("train/reconstructions", make_grid(rows, nrow=len(x), padding=1), step)
