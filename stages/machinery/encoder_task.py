"""The training step of stage 0 (`egoslots pretrain-encoder`): DINO on crops of cached frames.

The data (crops keyed by their place in one seeded sample stream, so a resumed or multi-rank run
draws exactly the crops an uninterrupted single process would) and the LightningModule that
computes one DINO step (:mod:`egoslots.pipeline.dino`); the command and its run directory live in
:mod:`egoslots.stages.pretrain_encoder`, as :mod:`egoslots.stages.machinery.dvae_task` beside :mod:`egoslots.stages.pretrain_dvae`.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from egoslots.pipeline.dino import DINO, DinoArch, cosine_schedule, teacher_temperature
from egoslots.pipeline.multicrop import IMAGENET, BatchMultiCrop, MultiCrop
from egoslots.stages.machinery.callbacks import first_bad_step_of_all_ranks
from egoslots.stages.machinery.common import TrainingDiverged
from egoslots.stages.machinery.encoder_frames import (
    open_frames,
)
from egoslots.stages.machinery.interrupts import ignore_sigterm_in_worker
from egoslots.stages.machinery.speed_probe import (
    PrecisionProbe,
    model_signature,
    training_step_timer,
)
from egoslots.stages.machinery.training import ResumableRandomSampler


# --------------------------------------------------------------------------------------------
# Data: crops of cached frames, keyed by their place in the sample stream
# --------------------------------------------------------------------------------------------
class KeyedSampler(ResumableRandomSampler):
    """The shared resumable stream of frame indices, yielding (stream position, index) so each
    sample's crops can be drawn from a generator keyed by its position."""

    def __iter__(self):
        pos = self.start
        while pos < self.total:
            stop = min(self.total, (pos // self.BLOCK + 1) * self.BLOCK)
            positions = self._global_positions(torch.arange(pos, stop))
            yield from zip(positions.tolist(), self._draws(positions).tolist())
            pos = stop


class CropDataset(Dataset):
    """Item (position, row) -> the multi-crop views of cached frame ``row`` (``lightly`` crops),
    or the frame and its crops' random draws (``batched`` crops, made in the training step)."""

    def __init__(self, frames_path: Path, crops: MultiCrop | BatchMultiCrop):
        self.path, self.crops = Path(frames_path), crops
        self._frames: np.ndarray | None = None  # memory-mapped in the process that reads

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def frames(self) -> np.ndarray:
        if self._frames is None:
            self._frames = open_frames(self.path)
        return self._frames

    def __getitem__(self, item: tuple[int, int]) -> list[torch.Tensor]:
        position, row = item
        frame = self.frames[row]  # (S, S, 3) uint8
        if isinstance(self.crops, BatchMultiCrop):
            return torch.from_numpy(np.array(frame)), self.crops.params(position, len(frame))
        return self.crops(frame, position)

    def __getstate__(self):
        return {**self.__dict__, "_frames": None}


# --------------------------------------------------------------------------------------------
# The Lightning module
# --------------------------------------------------------------------------------------------
class EncoderTask(L.LightningModule):
    """One DINO step: student on every crop, teacher on the global crops, EMA after the step."""

    def __init__(self, arch: dict, settings: dict, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        s = settings
        self.model = DINO(
            DinoArch(**arch),
            drop_path_rate=s["drop_path_rate"],
            norm_last_layer=s["norm_last_layer"],
            student_temp=s["student_temp"],
            center_momentum=s["center_momentum"],
        )
        self.register_buffer("first_bad_step", torch.tensor(-1, dtype=torch.long), persistent=False)
        self.data: CropDataset | None = None  # set by _train(), read by train_dataloader()
        self.picture_frames: torch.Tensor | None = None  # (n, S, S, 3) uint8 for attention maps

    @property
    def s(self) -> dict:
        return self.hparams.settings

    @property
    def world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def train_dataloader(self) -> DataLoader:
        """This rank's slice of one seeded stream of frames, from the step training (re)starts at."""
        s, batch = self.s, int(self.s["batch_size"])
        start = min(self.trainer.global_step, s["max_steps"]) if self._trainer is not None else 0
        sampler = KeyedSampler(
            len(self.data), s["max_steps"] * batch, self.hparams.seed, start * batch, batch,
            self.global_rank, self.world,
        )  # fmt: skip
        workers = int(s["num_workers"])
        return DataLoader(
            self.data,
            batch_size=batch,
            sampler=sampler,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_sigterm_in_worker if workers > 0 else None,
        )

    # -------------------------------------------------------------- schedules (DINO, in steps)
    def schedules(self, step: int) -> dict[str, float]:
        s, total = self.s, int(self.s["max_steps"])
        base_lr = s["lr"] * s["batch_size"] * self.world / 256.0  # DINO's linear scaling rule
        return {
            "lr": cosine_schedule(step, total, base_lr, s["min_lr"], s["warmup_steps"]),
            "weight_decay": cosine_schedule(step, total, s["weight_decay"], s["weight_decay_end"]),
            "momentum": cosine_schedule(step, total, s["momentum_teacher"], 1.0),
            "teacher_temp": teacher_temperature(
                step, s["warmup_teacher_temp"], s["teacher_temp"], s["warmup_teacher_temp_steps"]
            ),
        }

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.param_groups())

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # stochastic depth draws from the global generator: key it by (seed, step, rank)
        torch.manual_seed((self.hparams.seed << 32) + self.global_step * 4096 + self.global_rank)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        step = self.global_step
        crops = self.data.crops if self.data is not None else None
        if isinstance(crops, BatchMultiCrop):  # batch = (frames (B, S, S, 3) uint8, draws)
            with torch.autocast(self.device.type, enabled=False):
                views = crops(*batch)
        else:  # lightly: the views were made in the DataLoader
            views = batch
        now = self.schedules(step)
        optimizer = self.optimizers(use_pl_optimizer=False)
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = now["lr"]
            if i == 0:  # only weights are decayed
                group["weight_decay"] = now["weight_decay"]
        loss, stats = self.model(views, now["teacher_temp"])
        self._watch(loss, step)
        sync = self.world > 1
        self.log("train/loss", loss, prog_bar=True, sync_dist=sync)
        for name, value in stats.items():
            self.log(f"train/{name}", value, sync_dist=sync)
        for name, value in now.items():
            self.log(f"train/{name}", value)
        every = int(self.s["image_every"])
        if every and step % every == 0 and self.global_rank == 0:
            self._log_attention(step)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.s["clip_grad"]:
            self.model.clip_gradients(float(self.s["clip_grad"]))
        if self.global_step < int(self.s["freeze_last_layer_steps"]):
            self.model.cancel_last_layer_gradients()

    def optimizer_step(self, *args, **kwargs) -> None:
        """The student's step, then the teacher's EMA update with this step's momentum: both
        before Lightning's checkpoint callbacks see the step."""
        step = self.global_step
        super().optimizer_step(*args, **kwargs)
        self.model.update_teacher(self.schedules(step)["momentum"])

    # -------------------------------------------------------------- NaN / Inf watch
    def _watch(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, step, self.first_bad_step)

    def check_finite(self, all_ranks: bool = True) -> None:
        bad = int(first_bad_step_of_all_ranks(self) if all_ranks else self.first_bad_step)
        if bad >= 0:
            raise TrainingDiverged(
                f"the DINO loss became NaN/Inf at step {bad}; no checkpoint after it was saved. "
                "Lower pretrain_encoder.lr (or set precision=32), then rerun to resume"
            )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (
            self.device.type == "cpu"
            or self.global_step % max(1, self.trainer.log_every_n_steps) == 0
        ):
            self.check_finite()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # never write a checkpoint of diverged weights

    # -------------------------------------------------------------- pictures
    @torch.no_grad()
    def _log_attention(self, step: int) -> None:
        """Rows: frames, the teacher's last-block CLS attention (mean over heads), each head."""
        from egoslots.pipeline.dino import cls_attention

        experiment = getattr(self.logger, "experiment", None)
        if (
            experiment is None
            or not hasattr(experiment, "add_image")
            or self.picture_frames is None
        ):
            return
        from torchvision.utils import make_grid

        images = self.picture_frames.to(self.device).permute(0, 3, 1, 2).float() / 255
        mean, std = (
            torch.tensor(v, device=self.device).view(1, 3, 1, 1) for v in IMAGENET.values()
        )
        with torch.autocast(self.device.type, enabled=False):
            attn = cls_attention(self.model.teacher["backbone"], (images - mean) / std)
        maps = torch.cat([attn.mean(1, keepdim=True), attn], 1)  # (n, 1+heads, h, w)
        lo, hi = maps.amin((2, 3), keepdim=True), maps.amax((2, 3), keepdim=True)
        maps = (maps - lo) / (hi - lo).clamp_min(1e-12)
        maps = torch.nn.functional.interpolate(maps, size=images.shape[-2:], mode="nearest")
        rows = [images] + [maps[:, h : h + 1].expand(-1, 3, -1, -1) for h in range(maps.shape[1])]
        grid = make_grid(torch.cat(rows).float().cpu(), nrow=len(images), padding=1)
        experiment.add_image("train/attention", grid, step)


def precision_probe(task: EncoderTask, device: str) -> PrecisionProbe:
    """``pretrain_encoder.precision: auto``'s probe: this run's own DINO step (a copy of its
    student and teacher on one real batch of its crops) in each precision
    (``stages/machinery/runtime.choose_precision``)."""

    def make_step():
        batch = next(iter(task.train_dataloader()))
        crops = task.data.crops if task.data is not None else None
        views = crops(*batch) if isinstance(crops, BatchMultiCrop) else batch
        views = [v.to(device) for v in views]
        temperature = task.schedules(0)["teacher_temp"]
        # a fresh DINO of the same shape: its weight-normed head cannot be deep-copied
        model = EncoderTask(**task.hparams).model
        return training_step_timer(model, lambda m: m(views, temperature)[0], device, False)

    s = task.s
    crops = {k: s[k] for k in ("batch_size", "num_local_crops", "local_size", "crops")}
    return PrecisionProbe(
        "pretrain-encoder", {"model": model_signature(task.model), **crops}, make_step
    )
