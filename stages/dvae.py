"""Stage 2: `egoslots pretrain-dvae CONFIG` and `egoslots tokenize RUN`.

`pretrain-dvae` trains STEVE's dVAE (:mod:`pipeline.dvae`) on the frames that stage 1 cached in
the feature store (no video is decoded here), then tokenizes every cached frame. Everything
about one dVAE lives in ``<work_dir>/runs/<dvae.run_name>/``::

    config.yaml     the fully resolved config of the last invocation
    inputs.json     the store it trains on: path and fingerprint
    checkpoints/    step=N.ckpt every dvae.ckpt_every steps, and last.ckpt (Lightning)
    tb/             TensorBoard: train/loss_dvae_recon, train/tau, train/perplexity,
                    train/codes_used, train/geco_beta, frames vs reconstructions
    dvae.pt         the trained weights only (state dict of pipeline.dvae.DVAE)
    dvae.json       hash (sha256 of dvae.pt, 16 hex), store fingerprint, vocab_size, token_grid

Running the same command again resumes from ``checkpoints/last.ckpt`` (or ``--resume PATH``);
once ``dvae.pt`` exists for ``dvae.max_steps`` steps it returns at once (a larger max_steps
continues training and gives a new hash). Tokens go into the store as
``tokens/<hash>/ids`` (F, h, w) uint16, one done flag per chunk written after the chunk's ids,
so an interrupted `tokenize` redoes only the chunks whose flag is 0.

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

import errno
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cache.fingerprint import resolve_store
from cache.location import as_location, store_exists
from cache.store import FeatureStore, StoreError, chunk_bounds, store_path, stores_dir
from pipeline.config import ConfigError, save_resolved
from pipeline.dvae import (
    DVAE,
    MAX_VOCAB,
    PATCH,
    DVAEOutput,
    Geco,
    code_usage,
    gumbel_tau,
    kl_to_uniform,
    load_dvae,
    reconstruction_loss,
)
from stages.common import StageError, config_command, setup_logging
from stages.interrupts import CheckpointOnSigterm, SIGTERMException, ignore_sigterm_in_worker
from stages.training import (
    WRITE_FAULTS,
    RaisingCheckpointIO,
    ResumableRandomSampler,
    find_resume_checkpoint,
    first_bad_step_of_all_ranks,
    output_writes,
    read_checkpoint,
)

log = logging.getLogger("egoslots")

# dvae.* keys that change the network: a run directory cannot resume with other values.
ARCHITECTURE_KEYS = ("vocab_size", "hidden", "arch")
# What a run or checkpoint from before a key existed had (dvae.arch came later: SLATE's blocks).
ARCHITECTURE_BEFORE = {"arch": "slate"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the checkpoints on disk are from before it."""


class TokenWriteError(StoreError, OSError):
    """Writing token ids into the store failed (disk full, read-only, no permission). A StoreError
    (one clear line for the user) and still an OSError for callers that catch those."""

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] strerror"
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------
# Inputs: the store and its frames
# --------------------------------------------------------------------------------------------
def open_store(cfg: DictConfig) -> FeatureStore:
    """The store this config names (``store=`` path or fingerprint, else the matching one)."""
    return resolve_store(cfg)


def check_frames(store: FeatureStore) -> int:
    """The store's frame size, after checking it has frames the dVAE can take."""
    if "frames" not in store.group:
        raise StoreError(
            f"{store.path} holds no cached frames, which the dVAE trains on: re-extract with "
            "`egoslots extract-features CONFIG --overwrite` (a current egoslots always caches frames)"
        )
    size = store.frame_size
    shape = tuple(store.frames.shape[1:])
    if shape != (size, size, 3):
        raise StoreError(f"{store.path}: frames have shape {shape}, expected ({size}, {size}, 3)")
    if size % PATCH:
        raise StoreError(
            f"{store.path} caches {size} px frames, but the dVAE needs a frame size divisible by {PATCH} "
            f"(one token per {PATCH}x{PATCH} pixels): re-extract with extract.frame_size (globals.FRAME_SIZE) "
            f"set to e.g. {size - size % PATCH or PATCH}"
        )
    return size


def check_vocab(cfg: DictConfig) -> int:
    vocab = int(cfg.dvae.vocab_size)
    if not 2 <= vocab <= MAX_VOCAB:
        raise ConfigError(
            f"dvae.vocab_size={vocab} is outside [2, {MAX_VOCAB}]: token ids are cached as uint16 "
            "(set globals.VOCAB_SIZE or dvae.vocab_size)"
        )
    return vocab


class FrameDataset(Dataset):
    """Single frames (S, S, 3) uint8 of some store rows (train split, flipped rows included).

    Frames stay uint8 until the training step converts them to float in [0, 1] on the device
    (four times less to copy). The zarr handle is reopened in each DataLoader worker.
    """

    def __init__(self, store: FeatureStore, rows: np.ndarray):
        self.path = str(store.path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self._store: FeatureStore | None = None  # opened on first use, in whichever process reads

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._store is None:
            self._store = FeatureStore.open(self.path)
        row = int(self.rows[index])
        return torch.from_numpy(
            np.ascontiguousarray(self._store.read_rows("frames", row, row + 1)[0])
        )

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None  # reopened in the worker process
        return state


def training_rows(store: FeatureStore) -> np.ndarray:
    """Frame rows of the train split (flipped variants included); all rows if it is empty."""
    videos = store.videos_in("train", hflip=None)
    if not videos:
        log.warning(
            "%s has no train-split videos: the dVAE trains on all %d frames",
            store.path,
            store.num_frames,
        )
        videos = store.videos_in(None, hflip=None)
    return np.concatenate([np.arange(v.first, v.stop) for v in videos])


# --------------------------------------------------------------------------------------------
# The Lightning module
# --------------------------------------------------------------------------------------------
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
        image_every: int = 1000,
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
        # First step whose loss was not finite (-1: none). Kept on the device so that watching
        # it costs no synchronisation; read before every checkpoint and every few steps.
        self.register_buffer("first_bad_step", torch.tensor(-1, dtype=torch.long), persistent=False)
        self.frames: FrameDataset | None = None  # set by _train(), read by train_dataloader()
        self.loader: dict = {}  # batch_size, num_workers, max_steps

    @property
    def seed(self) -> int:
        return int(self.hparams.get("seed", 0))

    @property
    def world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def train_dataloader(self) -> DataLoader:
        """This rank's slice of one seeded stream of frames, from the step training (re)starts at.

        Rank r's step-s batch is draws s*B*W + r*B ... of the stream (stage 3's sampler), so the
        ranks together read the batch of one process with batch B*W, and a resumed run reads
        what the uninterrupted run would have read.
        """
        if self.frames is None:
            raise RuntimeError("DVAETask.frames is not set; train with stages.dvae.pretrain()")
        o = self.loader
        batch, workers = int(o["batch_size"]), int(o["num_workers"])
        start = self.trainer.global_step if self._trainer is not None else 0
        sampler = ResumableRandomSampler(
            len(self.frames),
            total=int(o["max_steps"]) * batch,
            seed=self.seed,
            start=min(start, int(o["max_steps"])) * batch,
            batch=batch,
            rank=self.global_rank,
            world=self.world,
        )
        return DataLoader(
            self.frames,
            batch_size=batch,
            sampler=sampler,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_sigterm_in_worker if workers > 0 else None,
        )

    def gumbel_noise(self, log_probs: torch.Tensor, step: int) -> torch.Tensor:
        """Gumbel(0, 1) noise like ``log_probs`` (B, V, h, w), one seeded generator per frame.

        The generator of a frame is keyed by its position in the global sample stream, so DDP
        ranks (each with a slice of the global batch) and resumed runs draw exactly the noise
        one uninterrupted process draws.
        """
        batch = log_probs.shape[0]
        first = (
            step * self.world + self.global_rank
        ) * batch  # global position of this rank's frame 0
        noise = torch.empty_like(log_probs)
        for i in range(batch):
            g = torch.Generator(device=log_probs.device).manual_seed((self.seed << 40) + first + i)
            noise[i].exponential_(generator=g)
        return -noise.log()  # as F.gumbel_softmax: -log(Exp(1))

    def sample(self, frames: torch.Tensor, tau: float, step: int) -> DVAEOutput:
        """DVAE.forward with :meth:`gumbel_noise` in place of F.gumbel_softmax's global RNG."""
        log_probs = self.dvae.log_probs(frames)  # (B, V, h, w)
        z_soft = ((log_probs + self.gumbel_noise(log_probs, step)) / tau).softmax(
            dim=1
        )  # (B, V, h, w)
        ids = z_soft.detach().argmax(dim=1)  # (B, h, w)
        return DVAEOutput(recon=self.dvae.decoder(z_soft), log_probs=log_probs, ids=ids)

    def tau(self, step: int) -> float:
        h = self.hparams
        return gumbel_tau(step, h.tau_start, h.tau_final, h.tau_steps)

    def configure_optimizers(self):
        return torch.optim.Adam(self.dvae.parameters(), lr=self.hparams.lr)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        step = self.global_step
        frames = batch.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, S, S) in [0, 1]
        tau = self.tau(step)
        out = self.sample(frames, tau, step)
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
        self._watch(loss, step)

        perplexity, used = code_usage(out.ids, self.hparams.vocab_size)
        self.log("train/loss_dvae_recon", recon, prog_bar=True, sync_dist=sync)
        self.log("train/loss", loss, sync_dist=sync)
        self.log(
            "train/mse", recon / frames[0].numel(), sync_dist=sync
        )  # per pixel value, comparable across sizes
        self.log("train/tau", tau, prog_bar=True)
        self.log("train/perplexity", perplexity, sync_dist=sync)
        self.log("train/codes_used", used, sync_dist=sync)
        if (
            self.hparams.image_every
            and step % self.hparams.image_every == 0
            and self.global_rank == 0
        ):
            self._log_pictures(frames, out.recon, step)
        return loss

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

    # -------------------------------------------------------------- NaN / Inf watch
    def _watch(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(
            bad & (self.first_bad_step < 0), step, self.first_bad_step
        )

    def check_finite(self, all_ranks: bool = True) -> None:
        """Raise TrainingDiverged if the loss was ever NaN/Inf. Under DDP every rank checks at the
        same steps and they agree on the first bad step of any rank, so all stop together."""
        bad = int(first_bad_step_of_all_ranks(self) if all_ranks else self.first_bad_step)
        if bad >= 0:
            raise TrainingDiverged(
                f"the dVAE loss became NaN/Inf at step {bad}; stopped without saving a checkpoint after it. "
                "Lower dvae.lr or check the cached frames, then rerun to resume from the last checkpoint"
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
    def _log_pictures(
        self, frames: torch.Tensor, recon: torch.Tensor, step: int, count: int = 8
    ) -> None:
        """Rows: input frames, reconstructions from the relaxed sample, from the argmax tokens."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        from torchvision.utils import make_grid

        x = frames[:count]
        hard = self.dvae.decode_ids(self.dvae.encode_ids(x))
        rows = torch.cat([x, recon[:count].float(), hard.float()]).clamp(0, 1)
        experiment.add_image("train/reconstructions", make_grid(rows, nrow=len(x), padding=1), step)


# --------------------------------------------------------------------------------------------
# Run directory bookkeeping
# --------------------------------------------------------------------------------------------
def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.work_dir) / "runs" / cfg.dvae.run_name


def sha256_16(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def check_run_dir(run_dir: Path, cfg: DictConfig, store: FeatureStore) -> None:
    """Refuse a run directory that belongs to another store or another dVAE architecture."""
    inputs = _read_json(run_dir / "inputs.json")
    if inputs and inputs.get("store_fingerprint") != store.fingerprint:
        raise StoreError(
            f"the dVAE run directory {run_dir} was trained on store {inputs.get('store_fingerprint')} "
            f"({inputs.get('store')}), but this config names store {store.fingerprint} ({store.path}): "
            "choose another dvae.run_name, or pass --overwrite to start this run again"
        )
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = OmegaConf.load(saved).get("dvae", {})
        for key in ARCHITECTURE_KEYS:
            was = old.get(key, ARCHITECTURE_BEFORE.get(key))
            if was is not None and str(was) != str(cfg.dvae[key]):
                raise ConfigError(
                    f"the dVAE run directory {run_dir} holds a dVAE with dvae.{key}={was}, this config "
                    f"asks for {cfg.dvae[key]}: choose another dvae.run_name, or pass --overwrite"
                )


def finished(run_dir: Path, cfg: DictConfig, store: FeatureStore) -> bool:
    """Whether ``dvae.pt`` holds this config's finished training (so nothing is left to train)."""
    info = _read_json(run_dir / "dvae.json")
    weights = run_dir / "dvae.pt"
    return bool(
        info
        and weights.is_file()
        and info.get("store") == store.fingerprint
        and int(info.get("steps", -1)) >= int(cfg.dvae.max_steps)
        and sha256_16(weights) == info.get("hash")
    )


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint that loads (``last.ckpt`` or a ``step=N.ckpt``), as train-slots
    picks it (:func:`stages.training.find_resume_checkpoint`); None if none."""
    path = find_resume_checkpoint(ckpt_dir)
    return str(path) if path else None


def check_resume_checkpoint(path: Path, cfg: DictConfig) -> None:
    """A ``--resume`` checkpoint must be a pretrain-dvae checkpoint of this vocab_size / hidden."""
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
    tmp = weights.with_suffix(".pt.tmp")
    state = {k: v.detach().cpu() for k, v in task.dvae.state_dict().items()}
    torch.save(state, tmp)
    dvae_hash = sha256_16(tmp)
    tmp.replace(weights)
    size = store.frame_size
    _write_json(
        run_dir / "dvae.json",
        {
            "hash": dvae_hash,
            "store": store.fingerprint,
            "store_path": str(store.path),
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
def _device_settings(cfg: DictConfig) -> tuple[str, str]:
    """(Lightning accelerator, precision) from dvae.accelerator / dvae.precision."""
    accelerator = str(cfg.dvae.accelerator)
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    setting = str(cfg.dvae.precision)
    if setting == "auto":
        precision = "bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "32-true"
    else:
        precision = {"32": "32-true", "fp32": "32-true", "bf16": "bf16-mixed"}.get(setting, setting)
    if cuda:
        torch.set_float32_matmul_precision("high")
    return accelerator, precision


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
        image_every=int(d.image_every),
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
    store = open_store(cfg)
    frame_size = check_frames(store)
    run_dir = run_dir_of(cfg)
    # Under DDP (torchrun, SLURM or Lightning's own launcher) every rank runs this function;
    # only rank 0 writes into the run directory and the store. All ranks must agree on whether
    # to train, so only rank 0 deletes, and the other ranks of an --overwrite run always train.
    zero = is_rank_zero()
    if zero:
        if overwrite and run_dir.exists():
            log.info("--overwrite: removing %s", run_dir)
            shutil.rmtree(run_dir)
        check_run_dir(run_dir, cfg, store)

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
                _write_run_files(run_dir, cfg, store)
            _train(cfg, store, frame_size, vocab, run_dir, resume, callbacks)
    if tokenize and zero:  # tokenization is one encoder pass over the store: rank 0 alone does it
        tokenize_run(run_dir)
    return run_dir


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 of a DDP launch (or not under DDP at all).

    Known before the Trainer starts: Lightning reads RANK / LOCAL_RANK / SLURM_PROCID into
    ``rank_zero_only.rank``; NODE_RANK / GROUP_RANK > 0 is another node of a multi-node launch.
    """
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)) or 0)
    return getattr(rank_zero_only, "rank", 0) == 0 and node == 0


def _write_run_files(run_dir: Path, cfg: DictConfig, store: FeatureStore) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    RaisingCheckpointIO.remove_leftovers(run_dir / "checkpoints")
    save_resolved(cfg, run_dir / "config.yaml")
    _write_json(
        run_dir / "inputs.json", {"store": str(store.path), "store_fingerprint": store.fingerprint}
    )


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
    # Lightning warnings that are expected here: resuming mid-"epoch" is fine with random frames,
    # and a resumed run's checkpoint directory is of course not empty.
    warnings.filterwarnings(
        "ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*"
    )
    warnings.filterwarnings(
        "ignore", message=r".*Checkpoint directory .* exists and is not empty.*"
    )
    ckpt_dir = run_dir / "checkpoints"
    if resume and not Path(resume).is_file():
        raise StoreError(f"--resume {resume}: no such checkpoint file")
    ckpt = str(resume) if resume else latest_checkpoint(ckpt_dir)
    if resume:
        check_resume_checkpoint(Path(resume), cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    rows = training_rows(store)
    accelerator, precision = _device_settings(cfg)
    task = make_task(cfg, frame_size)
    # one "epoch" covers the whole run, so the progress bar counts steps to max_steps
    task.frames = FrameDataset(store, rows)
    task.loader = {
        "batch_size": int(d.batch_size),
        "num_workers": int(d.num_workers),
        "max_steps": int(d.max_steps),
    }
    trainer = L.Trainer(
        default_root_dir=run_dir,
        accelerator=accelerator,
        devices=d.devices,
        num_nodes=int(d.num_nodes),
        strategy=str(d.strategy),
        use_distributed_sampler=False,  # train_dataloader() slices the sample stream by rank itself
        precision=precision,
        max_steps=int(d.max_steps),
        max_epochs=-1,
        logger=TensorBoardLogger(
            save_dir=str(run_dir), name="tb", version="", default_hp_metric=False
        ),
        log_every_n_steps=int(d.log_every),
        callbacks=[
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="step={step}",
                auto_insert_metric_name=False,
                every_n_train_steps=int(d.ckpt_every),
                save_top_k=-1,
                save_last=True,
            ),
            sigterm := CheckpointOnSigterm(ckpt_dir, "egoslots pretrain-dvae"),
            *callbacks,
        ],
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=[RaisingCheckpointIO()],  # a checkpoint that cannot be written stops the run
    )
    log.info(
        "dVAE: %d train frames of %d px, vocab %d, %d steps, %s, %s -> %s%s",
        len(rows),
        frame_size,
        vocab,
        d.max_steps,
        accelerator,
        precision,
        run_dir,
        f" (resuming {ckpt})" if ckpt else "",
    )
    try:
        trainer.fit(task, ckpt_path=ckpt, weights_only=True)
    except SIGTERMException:
        raise sigterm.stopped() from None
    task.check_finite(all_ranks=False)  # the ranks agreed at every check during training
    if trainer.global_step < int(d.max_steps):
        raise TrainingDiverged(
            f"dVAE training stopped at step {trainer.global_step} of {d.max_steps}; rerun to resume"
        )
    if not trainer.is_global_zero:
        return None
    dvae_hash = export_weights(run_dir, task, store, trainer.global_step)
    log.info("dVAE %s written to %s", dvae_hash, run_dir / "dvae.pt")
    return dvae_hash


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------
def _store_of_run(run_dir: Path, info: dict):
    """The store a dVAE run trained on: inputs.json's path, else work_dir/stores/<fingerprint>."""
    inputs = _read_json(run_dir / "inputs.json") or {}
    candidates = [inputs.get("store"), info.get("store_path")]
    saved = run_dir / "config.yaml"
    if saved.is_file():
        saved_cfg = OmegaConf.load(saved)
        if saved_cfg.get("work_dir"):
            folder = stores_dir(saved_cfg.work_dir, saved_cfg.get("store_dir"))
            candidates.append(str(store_path(folder, info["store"])))
    for path in candidates:
        if path and store_exists(path):
            return as_location(path)
    raise StoreError(
        f"the store dVAE run {run_dir} was trained on ({info['store']}) is not at "
        f"{', '.join(str(p) for p in candidates if p)}; was it moved or removed?"
    )


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def tokenize_run(
    run_dir: str | Path, batch_size: int | None = None, device: str | None = None
) -> str:
    """Encode every cached frame of the run's store to argmax token ids; returns the dVAE hash.

    Writes ``tokens/<hash>/ids`` (F, h, w) uint16 chunk by chunk, each chunk's done flag after its
    ids; resumes with the pending chunks only and returns at once when the tokens are complete.
    """
    run_dir = Path(run_dir)
    info = _read_json(run_dir / "dvae.json")
    if info is None or not (run_dir / "dvae.pt").is_file():
        raise StoreError(
            f"{run_dir} holds no trained dVAE (dvae.json / dvae.pt): run `egoslots pretrain-dvae CONFIG`"
        )
    dvae_hash = info["hash"]
    if sha256_16(run_dir / "dvae.pt") != dvae_hash:
        raise StoreError(
            f"{run_dir / 'dvae.pt'} does not match the hash {dvae_hash} in dvae.json (modified or corrupt): "
            "rerun `egoslots pretrain-dvae CONFIG` to export it again"
        )
    store = FeatureStore.open(_store_of_run(run_dir, info), mode="r+")
    if store.fingerprint != info["store"]:
        raise StoreError(
            f"{store.path} has fingerprint {store.fingerprint}, but the dVAE in {run_dir} was trained on "
            f"store {info['store']}"
        )
    frame_size = check_frames(store)
    grid = (frame_size // PATCH, frame_size // PATCH)
    if list(grid) != list(info["token_grid"]):
        raise StoreError(
            f"{store.path} caches {frame_size} px frames; the dVAE in {run_dir} expects "
            f"a token grid of {info['token_grid']}"
        )

    try:
        sub = store.create_tokens(
            dvae_hash, grid, {"vocab_size": info["vocab_size"], "dvae_run": str(run_dir)}
        )
    except OSError as err:
        raise _token_write_error(
            err, f"cannot create tokens/{dvae_hash} in {store.path}", run_dir
        ) from err
    if sub.attrs.get("complete"):
        return dvae_hash
    done = store.done_chunks(f"tokens/{dvae_hash}/done")
    pending = [c for c in range(done.size) if not done[c]]
    saved = run_dir / "config.yaml"
    dcfg = OmegaConf.load(saved).get("dvae", {}) if saved.is_file() else {}
    batch_size = int(batch_size or dcfg.get("tokenize_batch_size", 64))
    device = _pick_device(device or dcfg.get("tokenize_device", "auto"))
    model = load_dvae(run_dir).to(device)

    bounds = [chunk_bounds(c, store.chunk_len, store.num_frames) for c in pending]
    total = sum(b - a for a, b in bounds)
    log.info(
        "tokenizing %d frames (%d of %d chunks) of %s with dVAE %s on %s",
        total,
        len(pending),
        done.size,
        store.path,
        dvae_hash,
        device,
    )
    # writable(): every chunk file is written, even all-zero ones, so `cache verify` can check them
    ids_array = store.writable(f"tokens/{dvae_hash}/ids")
    done_array = store.writable(f"tokens/{dvae_hash}/done")
    with (
        ThreadPoolExecutor(max_workers=1) as reader,
        tqdm(total=total, unit="frame", desc=f"tokenize {dvae_hash}", dynamic_ncols=True) as bar,
    ):
        # read chunk i+1 while chunk i is being encoded
        next_frames = reader.submit(store.read_rows, "frames", *bounds[0]) if bounds else None
        for i, (chunk, (start, stop)) in enumerate(zip(pending, bounds)):
            frames = next_frames.result()  # (n, S, S, 3) uint8
            if i + 1 < len(bounds):
                next_frames = reader.submit(store.read_rows, "frames", *bounds[i + 1])
            ids = encode_frames(model, frames, batch_size, device)  # (n, h, w) uint16
            try:
                ids_array[start:stop] = ids
                store.fsync_chunk(f"tokens/{dvae_hash}/ids", chunk)
                done_array[chunk] = 1  # last: the chunk counts only once its ids are on disk
                store.fsync_chunk(f"tokens/{dvae_hash}/done", chunk)
            except OSError as err:
                raise _token_write_error(
                    err, f"cannot write token chunk {chunk} of {store.path}", run_dir
                ) from err
            bar.update(stop - start)
    store.remove_partial_files(f"tokens/{dvae_hash}")  # what writes killed mid-way left
    try:
        sub.attrs.update({"complete": True, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except OSError as err:
        raise _token_write_error(
            err,
            f"every token chunk of {store.path} is written but marking them complete failed",
            run_dir,
        ) from err
    log.info("tokens of dVAE %s complete in %s", dvae_hash, store.path)
    return dvae_hash


def _token_write_error(err: OSError, what: str, run_dir: Path) -> OSError:
    """The clear error for a failed token write (like extraction's): what failed, the errno's
    meaning, that finished chunks are kept, and the command that resumes."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        what = what.replace("cannot write", "disk full while writing", 1)
        hint = WRITE_FAULTS[err.errno]
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = (
            "tokens are written into the feature store, so it must be writable: make it writable, or copy "
            'it to a writable disk and point the dVAE run\'s inputs.json "store" at the copy'
        )
    else:
        hint = "check the store's disk"
    wrapped = TokenWriteError(
        f"{what} ({err}): {hint}; finished token chunks are kept: rerun "
        f"`egoslots tokenize {run_dir}` (or the same pretrain-dvae command) to resume"
    )
    wrapped.errno, wrapped.filename = err.errno, err.filename
    return wrapped


@torch.no_grad()
def encode_frames(
    model: DVAE, frames: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """(n, S, S, 3) uint8 -> (n, S/4, S/4) uint16 argmax token ids, in batches."""
    out = []
    for i in range(0, len(frames), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(frames[i : i + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, S, S)
        out.append(model.encode_ids(x).to(torch.int32).cpu().numpy().astype(np.uint16))
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
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
    try:
        run_dir = pretrain(cfg, resume=resume, overwrite=overwrite)
    except TrainingDiverged as err:
        raise StageError(str(err)) from err
    click.echo(f"dVAE run: {run_dir}")


@click.command(
    "tokenize",
    epilog="\b\nExample:\n  egoslots tokenize egoslots-work/runs/dvae",
)
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Frames per forward pass (default dvae.tokenize_batch_size).",
)
@click.option(
    "--device", default=None, help="auto | cpu | cuda | cuda:N (default dvae.tokenize_device)."
)
def tokenize(run: Path, batch_size: int | None, device: str | None):
    """Stage 2: write a trained dVAE's token ids for every cached frame into its store.

    RUN is a `pretrain-dvae` run directory. Resumable: rerun after an interruption and only
    the unfinished chunks are encoded.
    """
    setup_logging()
    try:
        dvae_hash = tokenize_run(run, batch_size=batch_size, device=device)
    except (StoreError, ConfigError) as err:
        raise StageError(str(err)) from err
    click.echo(f"tokens: {dvae_hash}")
