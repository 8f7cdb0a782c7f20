"""Stage 2, `egoslots pretrain-dvae CONFIG`: train STEVE's dVAE on cached frames, then tokenize.

Trains :class:`egoslots.pipeline.dvae.DVAE` (one step: ``stages/machinery/dvae_task.py``) on the frames that stage
1 cached in the feature store (no video is decoded here), then tokenizes every cached frame
(``stages/tokenize.py``). Everything about one dVAE lives in ``<work_dir>/runs/<dvae.run_name>/``::

    config.yaml     the fully resolved config of the last invocation
    inputs.json     the store it trains on: path and fingerprint
    checkpoints/    step=N.ckpt every dvae.ckpt_every steps, and last.ckpt (Lightning)
    tb/             TensorBoard: train/loss_dvae_recon, train/tau, train/perplexity,
                    train/codes_used, train/geco_beta, frames vs reconstructions
    dvae.pt         the trained weights only (state dict of egoslots.pipeline.dvae.DVAE)
    dvae.json       hash (sha256 of dvae.pt, 16 hex), store fingerprint, vocab_size, token_grid

Running the same command again resumes from ``checkpoints/last.ckpt`` (or ``--resume PATH``);
once ``dvae.pt`` exists for ``dvae.max_steps`` steps it returns at once (a larger max_steps
continues training and gives a new hash).

Several GPUs / nodes: ``dvae.devices``, ``dvae.num_nodes``, ``dvae.strategy=ddp`` (as
``trainer.*`` for stage 3; launch with torchrun or srun, or let Lightning start the processes).
``dvae.batch_size`` is per device. Every rank reads its own slice of one seeded frame stream and
draws each frame's Gumbel noise from a generator keyed by the frame's place in that stream, so W
ranks with batch B train the weights of one process with batch B*W (tests/test_ddp.py). Rank 0
alone writes the run directory (checkpoints, TensorBoard, dvae.pt) and then tokenizes the store
while the other ranks exit: tokenizing is one encoder pass, short next to training, and a
single writer needs no coordination over the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import click
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from egoslots.cache.catalog import store_for_config
from egoslots.cache.location import write_file
from egoslots.cache.store import FeatureStore, StoreError
from egoslots.pipeline.config import ConfigError
from egoslots.pipeline.dvae import MAX_VOCAB, PATCH
from egoslots.stages.machinery.batch_memory import check_dvae_batch
from egoslots.stages.machinery.callbacks import LossGuard, ReconstructionPictures
from egoslots.stages.machinery.common import TrainingDiverged, config_command, output_writes
from egoslots.stages.machinery.datamodules import FrameData
from egoslots.stages.machinery.dvae_task import DVAETask, precision_probe
from egoslots.stages.machinery.locks import writing_run
from egoslots.stages.machinery.run_paths import path_for_run_file, path_from_run_file
from egoslots.stages.machinery.rundirs import (
    check_checkpoint_files,
    read_checkpoint,
    read_json,
    resume_checkpoint,
    run_dir_of,
    saved_config,
    write_json,
    write_run_files,
)
from egoslots.stages.machinery.runtime import (
    configure_threads,
    device_type,
    set_fast_math,
)
from egoslots.stages.machinery.training import (
    fit,
    is_rank_zero,
    make_trainer,
    require_steps,
    run_precision,
)
from egoslots.stages.tokenize import check_frames, sha256_16, tokenize_run

log = logging.getLogger("egoslots")

# dvae.* keys that change the network: a run directory cannot resume with other values.
ARCHITECTURE_KEYS = ("vocab_size", "hidden", "arch")
# What a run or checkpoint from before a key existed had (dvae.arch came later: SLATE's blocks).
ARCHITECTURE_BEFORE = {"arch": "slate"}


# --------------------------------------------------------------------------------------------
# Inputs: the vocabulary (the store's frames: stages/tokenize.check_frames)
# --------------------------------------------------------------------------------------------
def check_vocab(cfg: DictConfig) -> int:
    vocab = int(cfg.dvae.vocab_size)
    if not 2 <= vocab <= MAX_VOCAB:
        raise ConfigError(
            f"dvae.vocab_size={vocab} is outside [2, {MAX_VOCAB}]: token ids are cached as uint16 "
            "(set globals.VOCAB_SIZE or dvae.vocab_size)"
        )
    return vocab


# --------------------------------------------------------------------------------------------
# The run directory: does it belong to this config, is it finished, its exported weights
# --------------------------------------------------------------------------------------------
def check_run_dir(run_dir: Path, cfg: DictConfig, store: FeatureStore) -> None:
    """Refuse a run directory that belongs to another store or another dVAE architecture."""
    check_checkpoint_files(run_dir / "checkpoints")
    inputs = read_json(run_dir / "inputs.json")
    if inputs and inputs.get("store_fingerprint") != store.fingerprint:
        raise StoreError(
            f"the dVAE run directory {run_dir} was trained on store "
            f"{inputs.get('store_fingerprint')} ({path_from_run_file(run_dir, inputs.get('store'))}), but this config names store {store.fingerprint} "
            f"({store.path}): choose another dvae.run_name, or pass --overwrite to start this run "
            "again"
        )
    saved = saved_config(run_dir)
    if saved is None:
        return
    old = saved.get("dvae", {})
    for key in ARCHITECTURE_KEYS:
        was = old.get(key, ARCHITECTURE_BEFORE.get(key))
        if was is not None and str(was) != str(cfg.dvae[key]):
            raise ConfigError(
                f"the dVAE run directory {run_dir} holds a dVAE with dvae.{key}={was}, this "
                f"config asks for {cfg.dvae[key]}: choose another dvae.run_name, or pass "
                "--overwrite"
            )


def finished(run_dir: Path, cfg: DictConfig, store: FeatureStore) -> bool:
    """Whether ``dvae.pt`` holds this config's finished training (so nothing is left to train)."""
    info = read_json(run_dir / "dvae.json")
    weights = run_dir / "dvae.pt"
    return bool(
        info
        and weights.is_file()
        and info.get("store") == store.fingerprint
        and int(info.get("steps", -1)) >= int(cfg.dvae.max_steps)
        and sha256_16(weights) == info.get("hash")
    )


def check_resume_checkpoint(path: Path, cfg: DictConfig) -> None:
    """A ``--resume`` checkpoint must be a pretrain-dvae checkpoint of this vocab_size / hidden / arch."""
    hp = read_checkpoint(path).get("hyper_parameters") or {}
    if "vocab_size" not in hp or "hidden" not in hp:
        raise StoreError(
            f"--resume {path} is not a pretrain-dvae checkpoint (no dVAE vocab_size / hidden in it)"
        )
    held = {key: hp.get(key, ARCHITECTURE_BEFORE.get(key)) for key in ARCHITECTURE_KEYS}
    wrong = [
        f"dvae.{key}={held[key]} (checkpoint) vs {cfg.dvae[key]}"
        for key in ARCHITECTURE_KEYS
        if str(held[key]) != str(cfg.dvae[key])
    ]
    if wrong:
        raise ConfigError(
            f"--resume {path} holds another dVAE than this config: {', '.join(wrong)}; set those "
            "keys as they were for the checkpoint, or train without --resume"
        )


def export_weights(run_dir: Path, task: DVAETask, store: FeatureStore, steps: int) -> str:
    """Write dvae.pt (weights only) then dvae.json (its hash); returns the hash."""
    weights = run_dir / "dvae.pt"
    state = {k: v.detach().cpu() for k, v in task.dvae.state_dict().items()}
    write_file(weights, lambda f: torch.save(state, f))
    dvae_hash = sha256_16(weights)
    size = store.frame_size
    write_json(
        run_dir / "dvae.json",
        {
            "hash": dvae_hash,
            "store": store.fingerprint,
            "store_path": path_for_run_file(run_dir, store.path),
            "vocab_size": task.dvae.vocab_size,
            "hidden": task.dvae.hidden,
            "arch": task.dvae.arch,
            "frame_size": size,
            "token_grid": [size // PATCH, size // PATCH],
            "steps": steps,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    return dvae_hash


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def make_task(cfg: DictConfig, frame_size: int) -> DVAETask:
    d = cfg.dvae
    return DVAETask(
        vocab_size=int(d.vocab_size),
        hidden=int(d.hidden),
        frame_size=frame_size,
        lr=float(d.lr),
        tau_start=float(d.tau_start),
        tau_final=float(d.tau_final),
        tau_steps=int(d.tau_steps),
        kl_weight=float(d.kl_weight),
        geco=OmegaConf.to_container(d.geco, resolve=True),
        seed=int(cfg.seed),
        arch=str(d.arch),
    )


def pretrain(
    cfg: DictConfig,
    resume: str | Path | None = None,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
    tokenize: bool = True,
) -> Path:
    """Train the dVAE on the store's train frames, export it, tokenize the store; returns the run dir.

    Resumes from ``checkpoints/last.ckpt`` of the run directory (or ``resume``); returns at once
    when the run already finished for this store and ``dvae.max_steps``. ``callbacks`` are extra
    Lightning callbacks (monitoring, tests).
    """
    vocab = check_vocab(cfg)
    store = store_for_config(cfg)
    frame_size = check_frames(store)
    check_dvae_batch(cfg, frame_size, device_type(cfg.dvae.accelerator) == "cuda")
    run_dir = run_dir_of(cfg, cfg.dvae.run_name)
    # Under DDP (torchrun, SLURM or Lightning's own launcher) every rank runs this function;
    # only rank 0 writes into the run directory and the store. All ranks must agree on whether
    # to train, so only rank 0 deletes, and the other ranks of an --overwrite run always train.
    zero = is_rank_zero()
    with writing_run(run_dir, "egoslots pretrain-dvae", overwrite, zero):
        if zero:
            check_run_dir(run_dir, cfg, store)
        _pretrain_locked(
            cfg, store, frame_size, vocab, run_dir, resume, overwrite, callbacks, tokenize
        )
    return run_dir


def _pretrain_locked(
    cfg, store, frame_size, vocab, run_dir, resume, overwrite, callbacks, tokenize
):
    """:func:`pretrain` once the run directory's lock is held (on rank 0)."""
    zero = is_rank_zero()
    if resume is None and (zero or not overwrite) and finished(run_dir, cfg, store):
        log.info(
            "dVAE in %s is already trained for %d steps on store %s",
            run_dir,
            cfg.dvae.max_steps,
            store.fingerprint,
        )
    else:
        # an unwritable or full run directory: one error naming the file, checkpoints kept
        with output_writes(run_dir):
            if zero:
                inputs = {
                    "store": path_for_run_file(run_dir, store.path),
                    "store_fingerprint": store.fingerprint,
                }
                write_run_files(run_dir, cfg, inputs)
            _train(cfg, store, frame_size, vocab, run_dir, resume, callbacks)
    if tokenize and zero:  # tokenization is one encoder pass over the store: rank 0 alone does it
        tokenize_run(run_dir)


def _train(
    cfg: DictConfig,
    store: FeatureStore,
    frame_size: int,
    vocab: int,
    run_dir: Path,
    resume: str | Path | None,
    callbacks: Sequence[Callback],
) -> str | None:
    """Fit the dVAE (on every DDP rank); rank 0 exports dvae.pt and returns its hash."""
    d = cfg.dvae
    ckpt_dir = run_dir / "checkpoints"
    ckpt = resume_checkpoint(ckpt_dir, resume)
    if resume:
        check_resume_checkpoint(Path(resume), cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    device = device_type(d.accelerator)
    set_fast_math(device == "cuda")
    configure_threads(cfg.num_threads, busy_workers=0)  # cache readers: see runtime.py
    task = make_task(cfg, frame_size)
    probe = precision_probe(task, int(d.batch_size), device)
    precision = run_precision(d, device, probe, read_checkpoint(ckpt) if ckpt else None)
    data = FrameData(store, cfg)
    guard = LossGuard(
        d.log_every,
        ckpt_dir,
        "dVAE",
        "Lower dvae.lr or check the cached frames, then rerun to resume from the last checkpoint",
    )
    trainer, sigterm = make_trainer(
        run_dir,
        command="egoslots pretrain-dvae",
        section="dvae",
        settings=d,
        precision=precision,
        callbacks=[guard, ReconstructionPictures(d.image_every), *callbacks],
    )
    log.info(
        "dVAE: %d train frames of %d px, vocab %d, %d steps, %s, %s -> %s%s",
        len(data.frames),
        frame_size,
        vocab,
        d.max_steps,
        d.accelerator,
        precision,
        run_dir,
        f" (resuming {ckpt})" if ckpt else "",
    )
    fit(trainer, sigterm, task, data, ckpt)
    guard.check(task, all_ranks=False)  # the ranks agreed at every check during training
    require_steps(trainer, d.max_steps, "dVAE", TrainingDiverged)
    if not trainer.is_global_zero:
        return None
    dvae_hash = export_weights(run_dir, task, store, trainer.global_step)
    log.info("dVAE %s written to %s", dvae_hash, run_dir / "dvae.pt")
    return dvae_hash


@config_command(
    "pretrain-dvae", example="egoslots pretrain-dvae configs/base.yaml dvae.max_steps=30000"
)
@click.option(
    "--resume",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Resume from this checkpoint (default: the run directory's last.ckpt, if any).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Delete the run directory <work_dir>/runs/<dvae.run_name> first.",
)
def pretrain_dvae(cfg: DictConfig, resume: Path | None = None, overwrite: bool = False):
    """Stage 2: train STEVE's dVAE on the cached frames, then tokenize every frame.

    Reads the feature store named by store= (or the one matching the config), trains for
    dvae.max_steps steps into <work_dir>/runs/<dvae.run_name>/ and writes token ids into the
    store under tokens/<dvae-hash>/. Rerun the same command to resume after an interruption.
    """
    run_dir = pretrain(cfg, resume=resume, overwrite=overwrite)
    click.echo(f"dVAE run: {run_dir}")
