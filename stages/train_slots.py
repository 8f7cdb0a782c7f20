"""Stage 3, `egoslots train-slots CONFIG`: train the slot model from cached features and tokens.

The frozen ViT never runs here: batches are clips read from the feature store (stage 1) and,
when the STEVE decoder is on, the token ids of a pretrained dVAE (stage 2) from the same
store. Everything about one run lives in ``<work_dir>/runs/<run_name>/``::

    config.yaml        the fully resolved config
    inputs.json        store path + fingerprint, dVAE run + hash, feature shapes
    checkpoints/       step=N.ckpt every trainer.ckpt_every steps, and last.ckpt
    tb/                TensorBoard: train/loss*, train/lr, val/*, slot-mask pictures

Running the same command again resumes from ``checkpoints/last.ckpt`` (or ``--resume PATH``)
and continues the same data order, so an interrupted run ends where an uninterrupted one would.

Speed: ``trainer.precision: auto`` trains in whichever of fp32 and bf16-mixed a short probe of
this run's step measures faster on this machine (``stages/machinery/runtime.py``; stored in the
checkpoints, so a resumed run keeps it), torch threads follow the CPUs this process may use,
TF32 on GPUs, no host-device synchronisation inside a step (losses are logged as tensors; NaN checks
and progress bars look only every few steps), and DataLoader workers that read ahead.

The pieces: ``slot_task.py`` (the LightningModule), ``datamodules.py`` (the clips),
``callbacks.py`` (NaN guard, final checkpoint, pictures), ``rundirs.py`` (run files, resume,
checkpoint compatibility), ``inference.py`` (loading a trained run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import click
import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig

from egoslots.cache.catalog import store_for_config
from egoslots.cache.store import FeatureStore, StoreError
from egoslots.pipeline.config import resolve
from egoslots.stages.machinery.batch_memory import check_slot_batch
from egoslots.stages.machinery.callbacks import FinalCheckpoint, LossGuard, SlotPictures
from egoslots.stages.machinery.common import StageError, config_command, output_writes
from egoslots.stages.machinery.datamodules import ClipData, example_clip
from egoslots.stages.machinery.locks import check_unlocked, writing_run
from egoslots.stages.machinery.run_paths import path_for_run_file
from egoslots.stages.machinery.rundirs import (
    catch_up_last,
    check_checkpoint_files,
    check_checkpoint_fits,
    checkpoint_step,
    config_changes,
    find_resume_checkpoint,
    read_checkpoint,
    read_json,
    run_dir_of,
    saved_config,
    write_run_files,
)
from egoslots.stages.machinery.runtime import (
    configure_threads,
    device_type,
    set_fast_math,
)
from egoslots.stages.machinery.slot_task import SlotTrainingModule, precision_probe
from egoslots.stages.machinery.training import fit, is_rank_zero, make_trainer, run_precision

log = logging.getLogger("egoslots")


# --------------------------------------------------------------------------------------------
# Inputs: the feature store and the dVAE tokens a run reads
# --------------------------------------------------------------------------------------------
@dataclass
class TrainingInputs:
    store: FeatureStore
    tokens_hash: str | None  # dVAE hash whose tokens the STEVE decoder predicts; None without it
    dvae_run: Path | None

    @property
    def token_grid(self) -> tuple[int, int] | None:
        if self.tokens_hash is None:
            return None
        return tuple(self.store.tokens(self.tokens_hash).shape[1:])  # type: ignore[return-value]

    def describe(self, run_dir: Path) -> dict:
        """inputs.json of the run in ``run_dir`` (paths relative to it)."""
        return {
            "store": path_for_run_file(run_dir, self.store.path),
            "store_fingerprint": self.store.fingerprint,
            "dvae_run": path_for_run_file(run_dir, self.dvae_run) if self.dvae_run else None,
            "dvae_hash": self.tokens_hash,
            "feature_dim": self.store.feature_dim,
            "num_tokens": int(self.store.meta["num_tokens"]),
            "grid": list(self.store.grid),
            "token_grid": list(self.token_grid) if self.token_grid else None,
        }


def dvae_run_dir(cfg: DictConfig) -> Path:
    """The dVAE run whose tokens the STEVE decoder predicts: ``dvae_run``, else dvae.run_name's."""
    return Path(cfg.dvae_run) if cfg.dvae_run else run_dir_of(cfg, cfg.dvae.run_name)


def resolve_inputs(cfg: DictConfig) -> TrainingInputs:
    """Open the store and find the tokens the config needs; errors say which stage to run."""
    try:
        store = store_for_config(cfg)
    except StoreError as err:
        raise StageError(str(err)) from err
    if not cfg.steve_decoder.enabled:
        return TrainingInputs(store, None, None)
    run = dvae_run_dir(cfg)
    check_unlocked(
        run, f"train-slots would read the dVAE of {run} before that command has finished it"
    )
    info = read_json(run / "dvae.json")
    if info is None:
        raise StageError(
            f"globals.USE_STEVE_DECODER is on but there is no trained dVAE at {run} (no dvae.json): run "
            "`egoslots pretrain-dvae CONFIG` with this config first (or set dvae_run=PATH, or "
            "globals.USE_STEVE_DECODER=false for a run without the STEVE decoder)"
        )
    dvae_hash = info["hash"]
    if info.get("store") and info["store"] != store.fingerprint:
        raise StageError(
            f"the dVAE in {run} was trained on store {info['store']}, but this config trains on store "
            f"{store.fingerprint} ({store.path}): run `egoslots pretrain-dvae CONFIG` for this store"
        )
    vocab = info.get("vocab_size")
    if vocab is not None and int(vocab) != int(cfg.dvae.vocab_size):
        raise StageError(
            f"the dVAE in {run} has a vocabulary of {vocab} tokens but dvae.vocab_size={cfg.dvae.vocab_size} "
            f"(globals.VOCAB_SIZE); set globals.VOCAB_SIZE={vocab} or pretrain a dVAE with this vocabulary"
        )
    if f"tokens/{dvae_hash}" not in store.group:
        raise StageError(
            f"no tokens of dVAE {dvae_hash} in store {store.fingerprint} ({store.path}): "
            f"run `egoslots tokenize {run}`"
        )
    try:
        store.tokens(dvae_hash)
    except StoreError as err:
        raise StageError(f"{err} (`egoslots tokenize {run}`)") from err
    return TrainingInputs(store, dvae_hash, run)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def check_same_run(run_dir: Path, cfg_dict: dict, inputs: TrainingInputs) -> None:
    """Refuse to resume a run directory that holds another experiment (config or inputs)."""
    old_cfg = saved_config(run_dir)
    if old_cfg is not None:
        changed = config_changes(old_cfg, cfg_dict)
        if changed:
            raise StageError(
                f"{run_dir} holds a run with a different config ({', '.join(changed[:6])}"
                f"{' ...' if len(changed) > 6 else ''}); choose a new run_name=NAME for this experiment, "
                "use --resume PATH to start a new run from one of its checkpoints, or --overwrite to "
                "train this run again"
            )
    old = read_json(run_dir / "inputs.json")
    if old is not None:
        new = inputs.describe(run_dir)
        for key in ("store_fingerprint", "dvae_hash"):
            if old.get(key) != new.get(key):
                raise StageError(
                    f"{run_dir} was trained with {key} {old.get(key)}, this config gives {new.get(key)}; "
                    "choose a new run_name=NAME, or pass --overwrite to train this run again"
                )


def train(cfg: DictConfig, resume: str | Path | None = None, overwrite: bool = False) -> Path:
    """Train the slot model of ``cfg`` from its caches; returns the run directory.

    Resumes from ``resume`` (a checkpoint path) or from the run's own ``last.ckpt``; returns at
    once when the run already reached ``trainer.max_steps``. ``overwrite`` deletes the run
    directory first (only if egoslots wrote all of it: :func:`remove_run_dir`).
    """
    inputs = resolve_inputs(cfg)
    check_slot_batch(cfg, inputs.store.meta, device_type(cfg.trainer.accelerator) == "cuda")
    cfg_dict = resolve(cfg)
    run_dir = run_dir_of(cfg, cfg.run_name)
    ckpt_dir = run_dir / "checkpoints"
    with writing_run(run_dir, "egoslots train-slots", overwrite, is_rank_zero()):
        check_checkpoint_files(ckpt_dir)
        return _train_locked(cfg, inputs, cfg_dict, run_dir, resume)


def _train_locked(
    cfg: DictConfig, inputs: TrainingInputs, cfg_dict: dict, run_dir: Path, resume
) -> Path:
    """:func:`train` once the run directory's lock is held (on rank 0)."""
    ckpt_dir = run_dir / "checkpoints"
    tc = cfg.trainer

    ckpt_path: Path | None = Path(resume) if resume else None
    if ckpt_path is not None and not ckpt_path.is_file():
        raise StageError(f"--resume {ckpt_path}: no such checkpoint file")
    if ckpt_path is None and ckpt_dir.is_dir():
        check_same_run(run_dir, cfg_dict, inputs)
        ckpt_path = find_resume_checkpoint(ckpt_dir)
        if ckpt_path is not None and ckpt_path.name != "last.ckpt":
            with output_writes(run_dir):
                catch_up_last(ckpt_path)
    if ckpt_path is not None:
        step = checkpoint_step(ckpt_path)
        if step >= int(tc.max_steps):
            log.info(
                "run %s already trained to step %d (trainer.max_steps=%d): nothing to do",
                run_dir,
                step,
                tc.max_steps,
            )
            return run_dir
        log.info("resuming %s from %s (step %d)", run_dir, ckpt_path, step)

    with output_writes(run_dir):
        if is_rank_zero():
            ckpt_dir.mkdir(parents=True, exist_ok=True)  # marks the directory as this run's
            write_run_files(run_dir, cfg, inputs.describe(run_dir))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    set_fast_math(tc.tf32)
    configure_threads(cfg.num_threads, busy_workers=0)  # cache readers: see runtime.py
    device = device_type(tc.accelerator)
    module = build_module(cfg_dict, inputs)
    checkpoint = read_checkpoint(ckpt_path) if ckpt_path is not None else None
    if checkpoint is not None:
        check_checkpoint_fits(
            ckpt_path,
            checkpoint,
            module,
            "this config",
            "Set these keys as they were for the checkpoint (its config is saved in it), "
            "or train without --resume.",
        )
    probe = precision_probe(module, int(cfg.dataset.batch_size), int(cfg.dataset.ep_length), device)
    precision = run_precision(tc, device, probe, checkpoint)
    store = inputs.store
    log.info(
        "stage 3: %s on %s, precision %s, store %s%s",
        run_dir.name,
        device,
        precision,
        store.fingerprint,
        f", dVAE {inputs.tokens_hash}" if inputs.tokens_hash else "",
    )
    if tc.compile:
        module.model.compile()
    data = ClipData(store, cfg, inputs.tokens_hash)
    guard = LossGuard(
        tc.log_every,
        ckpt_dir,
        "training",
        f"If the cached features may hold NaN/inf, `egoslots cache verify {store.path}` names the "
        "bad chunks (--repair, then rerun extract-features, rewrites them). Otherwise try a lower "
        "optimizer.lr, a larger optimizer.warmup_steps, or trainer.precision=32.",
    )
    pictures = SlotPictures(
        tc.image_every,
        example_clip(store, cfg, inputs.tokens_hash),
        store.grid,
        inputs.token_grid,
    )
    progress = TQDMProgressBar(refresh_rate=max(1, min(int(tc.log_every), 20)))
    val_batches = int(tc.val_batches) if data.has_val else 0
    trainer, sigterm = make_trainer(
        run_dir,
        command="egoslots train-slots",
        section="trainer",
        settings=tc,
        precision=precision,
        callbacks=[guard, pictures, FinalCheckpoint(ckpt_dir, guard), progress],
        gradient_clip_val=float(tc.gradient_clip_val) or None,
        gradient_clip_algorithm="norm",
        val_check_interval=int(tc.val_every) if val_batches else None,
        check_val_every_n_epoch=None,
        limit_val_batches=val_batches,
    )
    with output_writes(run_dir):
        fit(trainer, sigterm, module, data, ckpt_path)
    return run_dir


def build_module(cfg_dict: dict, inputs: TrainingInputs) -> SlotTrainingModule:
    store = inputs.store
    try:
        return SlotTrainingModule(
            cfg_dict,
            store.feature_dim,
            int(store.meta["num_tokens"]),
            list(inputs.token_grid) if inputs.token_grid else None,
        )
    except ValueError as err:  # a setting this store cannot serve (a square grid's options)
        h, w = store.grid
        raise StageError(f"{err} (store {store.path}: {h} x {w} tokens)") from None


@config_command(
    "train-slots",
    example="egoslots train-slots configs/base.yaml run_name=slots-10 globals.NUM_SLOTS=10",
)
@click.option(
    "--resume",
    "--continue",
    "resume",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Checkpoint to resume from (default: the run's own checkpoints/last.ckpt, if any).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Delete the run directory <work_dir>/runs/<run_name> first (only what egoslots wrote).",
)
def train_slots(cfg: DictConfig, resume: Path | None = None, overwrite: bool = False):
    """Stage 3: train the slot model (SlotContrast + STEVE decoder) from cached features and tokens.

    Never runs the ViT. Writes <work_dir>/runs/<run_name>/ (config.yaml, inputs.json,
    checkpoints/step=N.ckpt and last.ckpt, tb/). Rerun the same command to resume.
    """
    run_dir = train(cfg, resume=resume, overwrite=overwrite)
    click.echo(f"run: {run_dir}")
