"""Stage 0: `egoslots pretrain-encoder CONFIG` - train a ViT on the dataset's own frames with DINO.

silicon-menagerie's SAYCam encoders are DINO ViTs trained on a child's head-camera video; this
stage runs that recipe (:mod:`egoslots.pipeline.dino`, multi-crop in :mod:`egoslots.pipeline.multicrop`) on the
train videos of the configured dataset, so a lab without those checkpoints, or with its own
recordings, gets an encoder whose patch features slot models can group. ``backbone.name: self``
then extracts features with it, and ``egoslots run`` trains it first when the config asks for it.

Everything about one encoder lives in ``<work_dir>/runs/<pretrain_encoder.run_name>/``::

    config.yaml     the fully resolved config of the last invocation
    inputs.json     the data it trains on: dataset path and the identity of its frames
    frames/         frames.npy (N, S, S, 3) uint8, the train frames decoded once (see
                    stages/machinery/encoder_frames.py for why), and frames.json
    checkpoints/    step=N.ckpt every pretrain_encoder.ckpt_every steps, and last.ckpt
    tb/             TensorBoard: train/loss, train/teacher_entropy, train/teacher_batch_entropy,
                    train/lr, train/weight_decay, train/momentum, train/teacher_temp, and the
                    teacher's last-block CLS attention over a few frames (train/attention)
    encoder.pth     the teacher in silicon-menagerie's DINO layout: {"teacher": {"backbone.*",
                    "head.*"}}, tensors only (torch.load(weights_only=True)), no `args`
    encoder.json    its architecture (arch), mean/std, steps, sha256 of encoder.pth

``--export-safetensors DIR`` also writes DIR/encoder.safetensors (the teacher's backbone only,
no DINO head: what extraction needs, small enough to ship, no pickle) and DIR/encoder.json;
``backbone.checkpoint=DIR/encoder.safetensors`` loads it exactly as encoder.pth.

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
import time
from collections.abc import Sequence
from pathlib import Path

import click
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from egoslots.cache.location import write_file
from egoslots.pipeline.checkpoints import sha256_file
from egoslots.pipeline.config import ConfigError
from egoslots.pipeline.dino import DinoArch
from egoslots.pipeline.multicrop import IMAGENET, BatchMultiCrop, CropRecipe, MultiCrop
from egoslots.stages.machinery.common import StageError, config_command, output_writes
from egoslots.stages.machinery.encoder_frames import (
    build_frame_cache,
    cache_identity,
    training_videos,
    wait_for_frame_cache,
)
from egoslots.stages.machinery.encoder_task import CropDataset, EncoderTask, precision_probe
from egoslots.stages.machinery.locks import writing_run
from egoslots.stages.machinery.rundirs import (
    read_checkpoint,
    read_json,
    resume_checkpoint,
    run_dir_of,
    write_json,
    write_run_files,
)
from egoslots.stages.machinery.runtime import configure_threads, device_type
from egoslots.stages.machinery.training import (
    fit,
    is_rank_zero,
    make_trainer,
    require_steps,
    run_precision,
)

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


def multicrop_of(p: DictConfig, seed: int) -> MultiCrop | BatchMultiCrop:
    """The crops ``pretrain_encoder.crops`` names, with the config's probabilities and ranges."""
    kind = {"batched": BatchMultiCrop, "lightly": MultiCrop}[str(p.crops)]
    return kind(CropRecipe.from_config(p), seed=seed)


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
        and sha256_file(weights) == info.get("sha256", "")
    )


def export_encoder(run_dir: Path, task: EncoderTask, inputs: dict, steps: int) -> Path:
    """encoder.pth (the teacher, silicon-menagerie layout) then encoder.json (architecture)."""
    weights = run_dir / "encoder.pth"
    write_file(weights, lambda f: torch.save(task.model.teacher_checkpoint(), f))
    sha = sha256_file(weights)
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


def export_encoder_safetensors(run_dir: Path, out_dir: Path) -> Path:
    """DIR/encoder.safetensors (the teacher's ``backbone.*`` tensors of run_dir/encoder.pth,
    head left out) then DIR/encoder.json (run_dir's, with this file's sha256)."""
    from safetensors.torch import save

    from egoslots.pipeline.checkpoints import read_weights_file

    info = read_json(run_dir / "encoder.json")
    if not info or not (run_dir / "encoder.pth").is_file():
        raise StageError(
            f"{run_dir} has no finished encoder (encoder.pth and encoder.json) to export"
        )
    teacher = read_weights_file(run_dir / "encoder.pth")["teacher"]
    backbone = {k: v.contiguous() for k, v in teacher.items() if k.startswith("backbone.")}
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "encoder.safetensors"
    metadata = {"format": "egoslots pretrain-encoder teacher backbone"}
    write_file(weights, lambda f: f.write(save(backbone, metadata=metadata)))
    sha = sha256_file(weights)
    write_json(
        out_dir / "encoder.json",
        {
            **info,
            "format": "egoslots pretrain-encoder (DINO teacher backbone, no head; safetensors)",
            "sha256": sha,
            "exported_from": {"run": str(run_dir), "encoder.pth sha256": info.get("sha256")},
        },
    )
    return weights


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def pretrain(
    cfg: DictConfig,
    resume: str | Path | None = None,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
    source=None,
) -> Path:
    """Train (or finish training) the encoder this config describes and export it; returns the
    run directory. Returns at once when encoder.pth already holds the finished training."""
    from egoslots.pipeline.data import make_source

    p = cfg.pretrain_encoder
    arch = check_settings(p)
    source = source if source is not None else make_source(cfg)
    videos = training_videos(source)
    inputs = {
        "dataset": str(source.root),
        "frames": cache_identity(videos, arch.image_size, int(p.frame_step)),
    }
    run_dir = run_dir_of(cfg, p.run_name)
    zero = is_rank_zero()
    with writing_run(run_dir, "egoslots pretrain-encoder", overwrite, zero):
        if zero:
            check_run_dir(run_dir, cfg, inputs)
        return _pretrain_locked(cfg, source, arch, run_dir, inputs, resume, callbacks)


def _pretrain_locked(cfg, source, arch, run_dir, inputs, resume, callbacks) -> Path:
    """:func:`pretrain` once the run directory's lock is held (on rank 0)."""
    p, zero = cfg.pretrain_encoder, is_rank_zero()
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
    accelerator = str(p.accelerator)
    device = device_type(accelerator)
    # lightly crops are made by PIL in the DataLoader workers: those keep cores busy
    configure_threads(cfg.num_threads, int(p.num_workers) if p.crops == "lightly" else 0)
    checkpoint = read_checkpoint(Path(ckpt)) if ckpt else None
    precision = run_precision(p, device, precision_probe(task, device), checkpoint)
    # save_on_epoch_end=None: Lightning also saves last.ckpt when the sample stream's one
    # "epoch" ends, which stage 0's checkpoints have always included
    trainer, sigterm = make_trainer(
        run_dir,
        command=COMMAND,
        section="pretrain_encoder",
        settings=p,
        precision=precision,
        callbacks=callbacks,
        save_on_epoch_end=None,
    )
    log.info(
        "encoder: DINO ViT (patch %d, dim %d, depth %d, heads %d) on %d frames of %d px, "
        "2 x %d + %d x %d px crops, %d steps, %s, %s -> %s%s",
        arch.patch_size, arch.embed_dim, arch.depth, arch.num_heads, len(task.data),
        arch.image_size, arch.image_size, p.num_local_crops, p.local_size, p.max_steps,
        accelerator, precision, run_dir, f" (resuming {ckpt})" if ckpt else "",
    )  # fmt: skip
    fit(trainer, sigterm, task, None, ckpt)
    task.check_finite(all_ranks=False)
    require_steps(trainer, p.max_steps, "encoder", StageError)
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
@click.option(
    "--export-safetensors",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write DIR/encoder.safetensors (backbone only) and DIR/encoder.json.",
)
def pretrain_encoder(
    cfg: DictConfig,
    resume: Path | None = None,
    overwrite: bool = False,
    export_safetensors: Path | None = None,
):
    """Stage 0: train a ViT with DINO on the dataset's own train frames and export it.

    Writes <work_dir>/runs/<pretrain_encoder.run_name>/encoder.pth (silicon-menagerie's DINO
    layout) and encoder.json; extract features with it through backbone.name=self. Rerun the
    same command to resume after an interruption.
    """
    run_dir = pretrain(cfg, resume=resume, overwrite=overwrite)
    click.echo(f"encoder run: {run_dir}")
    click.echo(f"encoder: {run_dir / 'encoder.pth'}   (extract with backbone.name=self)")
    if export_safetensors is not None:
        path = export_encoder_safetensors(run_dir, export_safetensors)
        click.echo(f"exported: {path}   (backbone.checkpoint={path})")
