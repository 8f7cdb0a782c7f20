"""Stage 0: `egoslots pretrain-encoder CONFIG` - train a ViT on the dataset's own frames with DINO.

silicon-menagerie's SAYCam encoders are DINO ViTs trained on a child's head-camera video; this
stage runs that recipe (:mod:`pipeline.dino`, multi-crop in :mod:`pipeline.multicrop`) on the
train videos of the configured dataset, so a lab without those checkpoints, or with its own
recordings, gets an encoder whose patch features slot models can group. ``backbone.name: self``
then extracts features with it, and ``egoslots run`` trains it first when the config asks for it.

Everything about one encoder lives in ``<work_dir>/runs/<pretrain_encoder.run_name>/``::

    config.yaml     the fully resolved config of the last invocation
    inputs.json     the data it trains on: dataset path and the identity of its frames
    frames/         frames.npy (N, S, S, 3) uint8, the train frames decoded once (see
                    stages/encoder_frames.py for why), and frames.json
    checkpoints/    step=N.ckpt every pretrain_encoder.ckpt_every steps, and last.ckpt
    tb/             TensorBoard: train/loss, train/teacher_entropy, train/teacher_batch_entropy,
                    train/lr, train/weight_decay, train/momentum, train/teacher_temp, and the
                    teacher's last-block CLS attention over a few frames (train/attention)
    encoder.pth     the teacher in silicon-menagerie's DINO layout: {"teacher": {"backbone.*",
                    "head.*"}}, tensors only (torch.load(weights_only=True)), no `args`
    encoder.json    its architecture (arch), mean/std, steps, sha256 of encoder.pth

Running the same command again resumes from the newest checkpoint (or ``--resume PATH``); once
encoder.pth holds ``max_steps`` steps on the same frames it returns at once. A kill -9 at any
point, then the same command, ends bit-identical to an uninterrupted run (CPU, fp32): the sample
stream, each sample's crops and each step's stochastic depth depend only on (seed, step), and
the teacher's EMA update happens inside the optimizer step, before the step's checkpoint.
SIGTERM writes the finished step's checkpoint and exits 143.

Several GPUs / nodes: ``pretrain_encoder.devices``, ``num_nodes``, ``strategy=ddp``, as for the
dVAE; ``batch_size`` is per device, lr scales with the global batch (DINO's rule), each rank
reads its own slice of one sample stream, and the centre is averaged over ranks.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import click
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from pipeline.config import ConfigError
from pipeline.dino import DINO, DinoArch, cosine_schedule, teacher_temperature
from pipeline.multicrop import IMAGENET, BatchMultiCrop, MultiCrop
from stages.callbacks import first_bad_step_of_all_ranks
from stages.common import StageError, TrainingDiverged, config_command, output_writes
from stages.encoder_frames import (
    build_frame_cache,
    cache_identity,
    open_frames,
    training_videos,
    wait_for_frame_cache,
)
from stages.interrupts import CheckpointOnSigterm, SIGTERMException, ignore_sigterm_in_worker
from stages.rundirs import (
    read_checkpoint,
    read_json,
    resume_checkpoint,
    write_json,
    write_run_files,
)
from stages.tokenize import sha256_16
from stages.training import RaisingCheckpointIO, ResumableRandomSampler, is_rank_zero

log = logging.getLogger("egoslots")

ARCH_KEYS = tuple(DinoArch.__dataclass_fields__)  # keys a run directory cannot change
COMMAND = "egoslots pretrain-encoder"


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
def arch_of(p: DictConfig) -> DinoArch:
    return DinoArch(**{k: p[k] for k in ARCH_KEYS})


def check_settings(p: DictConfig) -> DinoArch:
    """The architecture, after the checks that would otherwise fail deep inside training."""
    arch = arch_of(p)
    problems = []
    for key in ("image_size", "local_size"):
        if int(p[key]) < arch.patch_size or int(p[key]) % arch.patch_size:
            problems.append(
                f"pretrain_encoder.{key}={p[key]} is not a multiple of patch_size={arch.patch_size}"
            )
    if int(p.local_size) > int(p.image_size):
        problems.append(
            f"pretrain_encoder.local_size={p.local_size} is larger than the global crops "
            f"(image_size={p.image_size}, the size frames are cached at)"
        )
    if arch.embed_dim % arch.num_heads:
        problems.append(
            f"pretrain_encoder.embed_dim={arch.embed_dim} is not divisible by "
            f"num_heads={arch.num_heads}"
        )
    for key in ("global_scale", "local_scale", "blur_sigma"):
        lo, hi = (float(v) for v in p[key])
        if not (0 < lo <= hi and (key == "blur_sigma" or hi <= 1)):
            bound = " <= 1" if key != "blur_sigma" else ""
            problems.append(
                f"pretrain_encoder.{key}={list(p[key])} must be [min, max], 0 < min <= max{bound}"
            )
    positive = ("batch_size", "max_steps", "frame_step", "depth", "out_dim", "hidden_dim",
                "bottleneck_dim", "ckpt_every", "log_every", "student_temp", "teacher_temp",
                "warmup_teacher_temp", "lr")  # fmt: skip
    problems += [f"pretrain_encoder.{k}={p[k]} must be > 0" for k in positive if not p[k] > 0]
    if not 0 <= float(p.momentum_teacher) <= 1 or not 0 <= float(p.center_momentum) <= 1:
        problems.append("pretrain_encoder.momentum_teacher and center_momentum must be in [0, 1]")
    if str(p.crops) not in ("batched", "lightly"):
        problems.append(f"pretrain_encoder.crops={p.crops}: choose batched or lightly")
    if int(p.num_local_crops) < 0 or len(p.blur) != 3:
        problems.append(
            "need num_local_crops >= 0 and blur = [global 1, global 2, local] probabilities"
        )
    if problems:
        raise ConfigError("; ".join(problems))
    return arch


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.work_dir) / "runs" / cfg.pretrain_encoder.run_name


def multicrop_of(p: DictConfig, seed: int) -> MultiCrop | BatchMultiCrop:
    """The crops ``pretrain_encoder.crops`` names, with the config's probabilities and ranges."""
    kind = {"batched": BatchMultiCrop, "lightly": MultiCrop}[str(p.crops)]
    return kind(
        int(p.image_size),
        int(p.local_size),
        int(p.num_local_crops),
        global_scale=list(p.global_scale),
        local_scale=list(p.local_scale),
        hflip=float(p.hflip),
        color_jitter=float(p.color_jitter),
        color_strength=float(p.color_strength),
        grayscale=float(p.grayscale),
        blur=list(p.blur),
        blur_sigma=list(p.blur_sigma),
        solarize=float(p.solarize),
        seed=seed,
    )


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
        from pipeline.dino import cls_attention

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


# --------------------------------------------------------------------------------------------
# Run directory bookkeeping
# --------------------------------------------------------------------------------------------
def check_run_dir(run_dir: Path, cfg: DictConfig, inputs: dict) -> None:
    """Refuse a run directory that trained on other frames or another architecture."""
    old = read_json(run_dir / "inputs.json")
    if old and old.get("frames") != inputs["frames"]:
        raise ConfigError(
            f"the encoder run directory {run_dir} trained on other frames ({old.get('dataset')}, "
            f"{old.get('frames')}); this config gives {inputs['dataset']} ({inputs['frames']}): "
            "choose another pretrain_encoder.run_name, or pass --overwrite to start it again"
        )
    saved = run_dir / "config.yaml"
    if saved.is_file():
        before = OmegaConf.load(saved).get("pretrain_encoder", {})
        p = cfg.pretrain_encoder
        wrong = [
            f"{k}={before[k]} (run) vs {p[k]}"
            for k in ARCH_KEYS
            if k in before and before[k] != p[k]
        ]
        if wrong:
            raise ConfigError(
                f"the encoder run directory {run_dir} holds another ViT: {', '.join(wrong)}; "
                "choose another pretrain_encoder.run_name, or pass --overwrite"
            )


def check_resume_checkpoint(path: Path, arch: DinoArch) -> None:
    hp = read_checkpoint(path).get("hyper_parameters") or {}
    if "arch" not in hp:
        raise ConfigError(
            f"--resume {path} is not a pretrain-encoder checkpoint (no ViT arch in it)"
        )
    wrong = [
        f"{k}={hp['arch'][k]} (checkpoint) vs {v}"
        for k, v in arch.as_dict().items()
        if hp["arch"].get(k) != v
    ]
    if wrong:
        raise ConfigError(f"--resume {path} holds another ViT than this config: {', '.join(wrong)}")


def finished(run_dir: Path, inputs: dict, max_steps: int) -> bool:
    """Whether encoder.pth holds this config's finished training on these frames."""
    info = read_json(run_dir / "encoder.json")
    weights = run_dir / "encoder.pth"
    return bool(
        info
        and weights.is_file()
        and info.get("frames") == inputs["frames"]
        and int(info.get("steps", -1)) >= int(max_steps)
        and sha256_16(weights) == info.get("sha256", "")[:16]
    )


def export_encoder(run_dir: Path, task: EncoderTask, inputs: dict, steps: int) -> Path:
    """encoder.pth (the teacher, silicon-menagerie layout) then encoder.json (architecture)."""
    import hashlib

    weights = run_dir / "encoder.pth"
    tmp = weights.with_suffix(".pth.tmp")
    torch.save(task.model.teacher_checkpoint(), tmp)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.replace(weights)
    write_json(
        run_dir / "encoder.json",
        {
            "format": "egoslots pretrain-encoder (DINO teacher, silicon-menagerie layout)",
            "arch": task.model.arch.as_dict(),
            "mean": IMAGENET["mean"],
            "std": IMAGENET["std"],
            "steps": steps,
            "sha256": sha,
            "frames": inputs["frames"],
            "dataset": inputs["dataset"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    return weights


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _device_settings(p: DictConfig) -> tuple[str, str]:
    """(accelerator, precision): ``auto`` is bf16-mixed on GPUs that have it, else fp32 (on
    this project's CPUs bf16 autocast made the step slower: docs/benchmarks.md)."""
    accelerator = str(p.accelerator)
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    setting = str(p.precision)
    if setting == "auto":
        return accelerator, "bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "32-true"
    return accelerator, {"32": "32-true", "fp32": "32-true", "bf16": "bf16-mixed"}.get(
        setting, setting
    )


def pretrain(
    cfg: DictConfig,
    resume: str | Path | None = None,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
    source=None,
) -> Path:
    """Train (or finish training) the encoder this config describes and export it; returns the
    run directory. Returns at once when encoder.pth already holds the finished training."""
    from pipeline.data import make_source

    p = cfg.pretrain_encoder
    arch = check_settings(p)
    source = source if source is not None else make_source(cfg)
    videos = training_videos(source)
    inputs = {
        "dataset": str(source.root),
        "frames": cache_identity(videos, arch.image_size, int(p.frame_step)),
    }
    run_dir = run_dir_of(cfg)
    zero = is_rank_zero()
    if zero:
        if overwrite and run_dir.exists():
            log.info("--overwrite: removing %s", run_dir)
            shutil.rmtree(run_dir)
        check_run_dir(run_dir, cfg, inputs)
    if resume is None and finished(run_dir, inputs, int(p.max_steps)):
        log.info("encoder in %s is already trained for %d steps", run_dir, p.max_steps)
        return run_dir
    with output_writes(run_dir):
        if zero:
            write_run_files(run_dir, cfg, inputs)
        frames = (run_dir / "frames", arch.image_size, int(p.frame_step))
        if zero:  # one writer; the other DDP ranks wait for it
            frames_path, rows = build_frame_cache(source, *frames, int(p.num_workers))
        else:
            frames_path, rows = wait_for_frame_cache(source, *frames)
        _train(cfg, arch, run_dir, frames_path, rows, inputs, resume, callbacks)
    return run_dir


def _train(cfg, arch, run_dir, frames_path, rows, inputs, resume, callbacks) -> None:
    p = cfg.pretrain_encoder
    ckpt_dir = run_dir / "checkpoints"
    ckpt = resume_checkpoint(ckpt_dir, resume)
    if resume:
        check_resume_checkpoint(Path(resume), arch)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    settings = OmegaConf.to_container(p, resolve=True)
    task = EncoderTask(arch.as_dict(), settings, seed=int(cfg.seed))
    task.data = CropDataset(frames_path, multicrop_of(p, int(cfg.seed)))
    picks = [v.first for v in rows[:4]]
    task.picture_frames = torch.from_numpy(np.stack([task.data.frames[i] for i in picks]))
    accelerator, precision = _device_settings(p)
    trainer = L.Trainer(
        default_root_dir=run_dir,
        accelerator=accelerator,
        devices=p.devices,
        num_nodes=int(p.num_nodes),
        strategy=str(p.strategy),
        use_distributed_sampler=False,  # the sampler slices the stream by rank itself
        precision=precision,
        max_steps=int(p.max_steps),
        max_epochs=-1,
        logger=TensorBoardLogger(
            save_dir=str(run_dir), name="tb", version="", default_hp_metric=False
        ),
        log_every_n_steps=int(p.log_every),
        callbacks=[
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="step={step}",
                auto_insert_metric_name=False,
                every_n_train_steps=int(p.ckpt_every),
                save_top_k=-1,
                save_last=True,
            ),
            sigterm := CheckpointOnSigterm(ckpt_dir, COMMAND),
            *callbacks,
        ],
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=[RaisingCheckpointIO()],
    )
    log.info(
        "encoder: DINO ViT (patch %d, dim %d, depth %d, heads %d) on %d frames of %d px, "
        "2 x %d + %d x %d px crops, %d steps, %s, %s -> %s%s",
        arch.patch_size, arch.embed_dim, arch.depth, arch.num_heads, len(task.data),
        arch.image_size, arch.image_size, p.num_local_crops, p.local_size, p.max_steps,
        accelerator, precision, run_dir, f" (resuming {ckpt})" if ckpt else "",
    )  # fmt: skip
    try:
        trainer.fit(task, ckpt_path=ckpt, weights_only=True)
    except SIGTERMException:
        raise sigterm.stopped() from None
    task.check_finite(all_ranks=False)
    if trainer.global_step < int(p.max_steps):
        raise StageError(
            f"encoder training stopped at step {trainer.global_step} of {p.max_steps}; rerun to resume"
        )
    if trainer.is_global_zero:
        path = export_encoder(run_dir, task, inputs, trainer.global_step)
        log.info("encoder written to %s (backbone.name=self loads it)", path)


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------
@config_command(
    "pretrain-encoder",
    example="egoslots pretrain-encoder configs/encoder_demo.yaml pretrain_encoder.max_steps=2000",
)
@click.option(
    "--resume",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Resume from this checkpoint (default: the run directory's newest checkpoint, if any).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Delete the run directory <work_dir>/runs/<pretrain_encoder.run_name> first.",
)
def pretrain_encoder(cfg: DictConfig, resume: Path | None = None, overwrite: bool = False):
    """Stage 0: train a ViT with DINO on the dataset's own train frames and export it.

    Writes <work_dir>/runs/<pretrain_encoder.run_name>/encoder.pth (silicon-menagerie's DINO
    layout) and encoder.json; extract features with it through backbone.name=self. Rerun the
    same command to resume after an interruption.
    """
    run_dir = pretrain(cfg, resume=resume, overwrite=overwrite)
    click.echo(f"encoder run: {run_dir}")
    click.echo(f"encoder: {run_dir / 'encoder.pth'}   (extract with backbone.name=self)")
