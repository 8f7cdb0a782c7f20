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

Speed: bf16 autocast where the hardware supports it (checked at start, fp32 otherwise), TF32 on
GPUs, no host-device synchronisation inside a step (losses are logged as tensors; NaN checks
and progress bars look only every few steps), and DataLoader workers that read ahead.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from cache.fingerprint import resolve_store
from cache.reader import ClipDataset
from cache.store import FeatureStore, StoreError
from pipeline.config import resolve, save_resolved
from pipeline.schedules import lr_factor
from stages.common import StageError, config_command
from stages.interrupts import CheckpointOnSigterm, SIGTERMException, ignore_sigterm_in_worker
from stages.training import (
    RaisingCheckpointIO,
    ResumableRandomSampler,
    catch_up_last,
    checkpoint_step,
    find_resume_checkpoint,
    first_bad_step_of_all_ranks,
    gather_with_grad,
    output_writes,
    read_checkpoint,
)

log = logging.getLogger("egoslots")

# Config keys that may change when a run resumes in its own directory (they do not change
# what is being trained). Anything else differing is an error: start a new run_name instead.
RESUMABLE_CHANGES = (
    "trainer.",
    "evaluate.",
    "dataset.num_workers",
    "store",
    "dvae_run",
    "dvae.",
    "extract.",
    "work_dir",
    "backbone.checkpoint",
    "dataset.path",
)


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

    def describe(self) -> dict:
        return {
            "store": str(self.store.path),
            "store_fingerprint": self.store.fingerprint,
            "dvae_run": str(self.dvae_run) if self.dvae_run else None,
            "dvae_hash": self.tokens_hash,
            "feature_dim": self.store.feature_dim,
            "num_tokens": int(self.store.meta["num_tokens"]),
            "grid": list(self.store.grid),
            "token_grid": list(self.token_grid) if self.token_grid else None,
        }


def open_store(cfg: DictConfig) -> FeatureStore:
    """The store this config trains on: ``store=`` (path or fingerprint) or the matching one."""
    try:
        return resolve_store(cfg)
    except StoreError as err:
        raise StageError(f"{err}") from err


def dvae_run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.dvae_run) if cfg.dvae_run else Path(cfg.work_dir) / "runs" / cfg.dvae.run_name


def resolve_inputs(cfg: DictConfig) -> TrainingInputs:
    """Open the store and find the tokens the config needs; errors say which stage to run."""
    store = open_store(cfg)
    if not cfg.steve_decoder.enabled:
        return TrainingInputs(store, None, None)
    run = dvae_run_dir(cfg)
    info_path = run / "dvae.json"
    if not info_path.is_file():
        raise StageError(
            f"globals.USE_STEVE_DECODER is on but there is no trained dVAE at {run} (no dvae.json): run "
            "`egoslots pretrain-dvae CONFIG` with this config first (or set dvae_run=PATH, or "
            "globals.USE_STEVE_DECODER=false for a run without the STEVE decoder)"
        )
    info = json.loads(info_path.read_text())
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
# Precision and hardware settings
# --------------------------------------------------------------------------------------------
def device_type(cfg: DictConfig) -> str:
    acc = str(cfg.trainer.accelerator)
    if acc in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def bf16_supported(device: str) -> bool:
    """Whether bf16 autocast runs natively (not emulated) on this device: checked, then probed."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # AVX-512 BF16 / AMX (oneDNN)
    except Exception:  # pragma: no cover - builds without oneDNN
        native = False
    if not native:
        return False
    try:  # a tiny probe: autocast must give bf16 results that are right
        a = torch.randn(16, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c = a @ a
        return c.dtype == torch.bfloat16 and torch.allclose(c.float(), a @ a, atol=0.5, rtol=0.05)
    except Exception:  # pragma: no cover
        return False


def resolve_precision(cfg: DictConfig) -> str:
    """trainer.precision -> a Lightning precision string; ``auto`` = bf16-mixed where native."""
    setting = str(cfg.trainer.precision)
    device = device_type(cfg)
    if setting == "auto":
        return "bf16-mixed" if bf16_supported(device) else "32-true"
    if setting in ("32", "32-true", "fp32"):
        return "32-true"
    if setting in ("bf16", "bf16-mixed"):
        if not bf16_supported(device):
            log.warning(
                "trainer.precision=%s: bf16 is not native on this %s; it will be slow",
                setting,
                device,
            )
        return "bf16-mixed"
    return setting  # anything else Lightning understands (16-mixed, ...)


def set_fast_math(cfg: DictConfig) -> None:
    if cfg.trainer.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")


# --------------------------------------------------------------------------------------------
# Optimizer: per-module learning rates
# --------------------------------------------------------------------------------------------
def build_param_groups(named_parameters, groups_cfg, base_lr: float) -> list[dict]:
    """Adam parameter groups from ``optimizer.param_groups`` ({regex, lr}, first match wins).

    Regexes are matched (``re.match``, anchored at the start) against parameter names of the
    slot model (e.g. ``decoder.mlp.0.weight``). Unmatched parameters use ``base_lr``; a regex
    that matches nothing is an error naming it.
    """
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    rules = []
    for i, g in enumerate(groups_cfg or []):
        try:
            rules.append((re.compile(str(g["regex"])), float(g["lr"]), str(g["regex"])))
        except re.error as err:
            raise StageError(
                f"optimizer.param_groups[{i}].regex '{g['regex']}' is not a valid regex: {err}"
            ) from err
    buckets: list[list] = [[] for _ in rules]
    rest = []
    for name, p in named:
        for i, (rx, _, _) in enumerate(rules):
            if rx.match(name):
                buckets[i].append(p)
                break
        else:
            rest.append(p)
    for i, (_, _, text) in enumerate(rules):
        if not buckets[i]:
            tops = sorted({n.split(".")[0] for n, _ in named})
            raise StageError(
                f"optimizer.param_groups[{i}].regex '{text}' matches no trainable parameter "
                f"(or only ones an earlier group took); parameter names start with: {', '.join(tops)}"
            )
    groups = [{"params": ps, "lr": lr, "name": text} for (_, lr, text), ps in zip(rules, buckets)]
    if rest:
        groups.append({"params": rest, "lr": float(base_lr), "name": "default"})
    return groups


# --------------------------------------------------------------------------------------------
# Data: the fields of a clip (the seeded, resumable clip order is stages/training.py)
# --------------------------------------------------------------------------------------------
def clip_fields(cfg: DictConfig, tokens_hash: str | None) -> tuple[str, ...]:
    return ("features", "tokens") if tokens_hash else ("features",)


# --------------------------------------------------------------------------------------------
# The LightningModule
# --------------------------------------------------------------------------------------------
class SlotTrainingModule(L.LightningModule):
    """SlotModel + its optimizer, schedule and logging; runs on batches of cached clips.

    Load a trained one with ``SlotTrainingModule.load_from_checkpoint(path)``: the resolved
    config and the store's shapes are saved as hyperparameters, so nothing else is needed.
    A batch is a dict with ``features`` (B, T, N, F) and, with the STEVE decoder, ``tokens``
    (B, T, h, w) token ids.
    """

    def __init__(
        self, config: dict, feature_dim: int, num_tokens: int, token_grid: tuple | None = None
    ):
        super().__init__()
        self.save_hyperparameters()
        from pipeline.model import SlotModel

        self.cfg = OmegaConf.create(config)
        grid = tuple(token_grid) if token_grid is not None else None
        self.model = SlotModel.from_config(self.cfg, feature_dim, num_tokens, grid)
        # First step whose loss was not finite (-1: none). Kept on the device: no sync per step.
        self.register_buffer("first_bad_step", torch.tensor(-1, dtype=torch.long), persistent=False)
        self.data_stream: dict | None = None  # set by train(): store path, split, ... for loaders
        self.example_clip: dict | None = None  # fixed clip (with frames) for pictures

    # ------------------------------------------------------------------ model
    def forward(self, features: torch.Tensor, tokens: torch.Tensor | None = None) -> dict:
        return self.model(features, tokens)

    def _step(self, batch: dict) -> tuple[dict, dict]:
        # Clips arrive in the store's dtype (float16: half the bytes through the loader); widened
        # here, on the training device, to exactly the float32 values the store holds.
        outputs = self.model(batch["features"].float(), batch.get("tokens"))
        return outputs, self.model.losses(outputs, gather=self._gather())

    def _gather(self):
        """DDP with losses.loss_ss.all_gather: contrast slots against the global batch."""
        if (
            not self.cfg.losses.loss_ss.get("all_gather", False)
            or self._trainer is None
            or self.trainer.world_size < 1
            or self.trainer.world_size == 1
        ):
            return None
        return gather_with_grad  # (B, T, K, D) -> (world*B, T, K, D)

    def on_train_batch_start(self, batch, batch_idx):
        # Dropout and sampled slot inits draw from a stream seeded by the step: a resumed run
        # draws what the uninterrupted run drew.
        rank = self.global_rank if self.trainer is not None else 0
        torch.manual_seed(int(self.cfg.seed) * 1_000_003 + self.global_step * 1009 + rank)

    def training_step(self, batch: dict, batch_idx: int):
        _, losses = self._step(batch)
        loss = losses["loss"]
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(
            bad & (self.first_bad_step < 0),
            torch.full_like(self.first_bad_step, self.global_step),
            self.first_bad_step,
        )
        size = batch["features"].shape[0]
        # Under DDP the logged losses are the mean over ranks (= the global batch's losses).
        sync = self._trainer is not None and self.trainer.world_size > 1
        self.log_dict(
            {f"train/{k}": v.detach().float() for k, v in losses.items()},
            on_step=True,
            on_epoch=False,
            batch_size=size,
            sync_dist=sync,
        )
        self.log(
            "loss",
            loss.detach().float(),
            on_step=True,
            on_epoch=False,
            prog_bar=True,
            logger=False,
            batch_size=size,
            sync_dist=sync,
        )
        opt = self.optimizers(use_pl_optimizer=False) if self._trainer is not None else None
        if opt is not None:
            self.log(
                "train/lr",
                float(opt.param_groups[-1]["lr"]),
                on_step=True,
                on_epoch=False,
                batch_size=size,
            )
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        outputs, losses = self._step(batch)
        size = batch["features"].shape[0]
        self.log_dict(
            {f"val/{k}": v.detach().float() for k, v in losses.items()},
            on_step=False,
            on_epoch=True,
            batch_size=size,
            sync_dist=True,
        )
        if "masks" in batch:
            for key, name in (("decoder", ""), ("corrector", "_corrector")):
                scores = clip_metrics(outputs, batch["masks"], key, self.store_grid)
                if scores is None:
                    break
                for metric, values in scores.items():
                    self.log(
                        f"val/{metric}{name}",
                        values.mean(),
                        on_step=False,
                        on_epoch=True,
                        batch_size=size,
                        sync_dist=True,
                    )

    @property
    def store_grid(self) -> tuple[int, int]:
        n = int(self.hparams.num_tokens)
        side = int(round(math.sqrt(n)))
        return (side, n // side)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        opt_cfg = self.cfg.optimizer
        groups = build_param_groups(self.model.named_parameters(), opt_cfg.param_groups, opt_cfg.lr)
        fused = self.device.type == "cuda"
        optimizer = torch.optim.Adam(groups, lr=float(opt_cfg.lr), fused=fused or None)
        factor = lr_factor(
            int(opt_cfg.warmup_steps), int(self.cfg.trainer.max_steps), bool(opt_cfg.decay)
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_train_start(self):
        # A run resumed with a new optimizer.lr / param-group lr uses the new rates: the restored
        # scheduler would otherwise keep the checkpoint's base rates.
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            groups = sched.optimizer.param_groups
            wanted = {
                g["name"]: g["lr"]
                for g in build_param_groups(
                    self.model.named_parameters(),
                    self.cfg.optimizer.param_groups,
                    self.cfg.optimizer.lr,
                )
            }
            for i, group in enumerate(groups):
                if group.get("name") in wanted:
                    sched.base_lrs[i] = wanted[group["name"]]
                    group["initial_lr"] = wanted[group["name"]]
                    group["lr"] = wanted[group["name"]] * sched.lr_lambdas[i](sched.last_epoch)

    # ------------------------------------------------------------------ data
    def train_dataloader(self):
        d = self.data_stream
        if d is None:
            raise RuntimeError(
                "SlotTrainingModule.data_stream is not set; train with stages.train_slots.train()"
            )
        cfg = self.cfg
        dataset = ClipDataset(
            d["store"],
            "train",
            cfg.dataset.ep_length,
            cfg.dataset.clip_stride,
            cfg.dataset.frame_step,
            fields=clip_fields(cfg, d["tokens"]),
            tokens=d["tokens"],
            include_flipped=True,
            feature_dtype="stored",
        )
        if len(dataset) == 0:
            raise StageError(
                f"the train split of {d['store']} has no clip of {cfg.dataset.ep_length} frames "
                f"(frame step {cfg.dataset.frame_step}): lower dataset.ep_length"
            )
        batch = int(cfg.dataset.batch_size)
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        start_step = self.trainer.global_step if self._trainer is not None else 0
        # Every rank reads its own slice of one global stream: the union of the ranks' batches is
        # the batch a 1-process run with batch size batch * world reads (see the sampler).
        sampler = ResumableRandomSampler(
            len(dataset),
            total=int(cfg.trainer.max_steps) * batch,
            seed=int(cfg.seed),
            start=start_step * batch,
            batch=batch,
            rank=rank,
            world=world,
        )
        return _loader(dataset, batch, sampler, cfg, drop_last=True)

    def val_dataloader(self):
        d = self.data_stream
        if d is None or not d.get("val"):
            return []
        cfg = self.cfg
        fields = clip_fields(cfg, d["tokens"]) + (("masks",) if d["masks"] else ())
        dataset = ClipDataset(
            d["store"],
            "val",
            cfg.dataset.ep_length,
            cfg.dataset.ep_length,
            cfg.dataset.frame_step,
            fields=fields,
            tokens=d["tokens"],
            include_flipped=False,
        )
        return _loader(dataset, int(cfg.dataset.batch_size), None, cfg, drop_last=False)


def _loader(dataset, batch: int, sampler, cfg: DictConfig, drop_last: bool) -> DataLoader:
    workers = int(cfg.dataset.num_workers)
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        shuffle=False,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        collate_fn=collate_clips,
        worker_init_fn=ignore_sigterm_in_worker if workers > 0 else None,
    )


def collate_clips(items: list[dict]) -> dict:
    """Stack tensors; keep ids as lists (the default collate would also work, this is explicit)."""
    out: dict = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if torch.is_tensor(values[0]) else values
    return out


def clip_metrics(outputs: dict, masks: torch.Tensor, key: str, grid) -> dict | None:
    """Video FG-ARI and mBO of each clip, from pipeline.metrics (None when it is not available)."""
    try:
        from pipeline.metrics import evaluate_masks
    except ImportError:  # the evaluate stage's metrics are not in this build: val losses only
        return None
    pred = (
        outputs["decoder"]["masks"]
        if key == "decoder"
        else outputs["processor"]["corrector"]["masks"]
    )
    pred = pred.detach().float().cpu()
    masks = masks.cpu()
    ari, mbo = [], []
    for b in range(pred.shape[0]):
        m = evaluate_masks(pred[b], masks[b], grid)
        ari.append(m["video_fg_ari"])
        mbo.append(m["video_mbo"])
    to_t = lambda v: torch.tensor([x for x in v if x == x] or [float("nan")])  # noqa: E731 (drop NaN)
    return {"fg_ari": to_t(ari), "mbo": to_t(mbo)}


# --------------------------------------------------------------------------------------------
# Callbacks: NaN guard, final checkpoint, pictures
# --------------------------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, checkpoint: Path | None, store: str | None = None):
        where = (
            f"the last good checkpoint is {checkpoint}"
            if checkpoint
            else "no checkpoint was written yet"
        )
        super().__init__(
            f"the training loss became NaN/inf at step {step}; training stopped and {where}. "
            f"If the cached features may hold NaN/inf, `egoslots cache verify {store or 'STORE'}` names the bad "
            "chunks (--repair, then rerun extract-features, rewrites them). Otherwise try a lower optimizer.lr, "
            "a larger optimizer.warmup_steps, or trainer.precision=32."
        )
        self.step = step


class NonFiniteGuard(Callback):
    """Stops on a NaN/inf loss before any checkpoint holds the damage (one sync every few steps)."""

    def __init__(self, every: list[int], ckpt_dir: Path, store: str | None = None):
        self.every = [max(1, int(e)) for e in every]
        self.ckpt_dir = ckpt_dir
        self.store = (
            store  # named in the error: `egoslots cache verify STORE` finds NaN/inf features
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if any(step % e == 0 for e in self.every) or step >= (trainer.max_steps or 0):
            self.check(pl_module)

    def check(self, pl_module) -> None:
        bad = int(first_bad_step_of_all_ranks(pl_module))
        if bad >= 0:
            last = self.ckpt_dir / "last.ckpt"
            raise NonFiniteLossError(bad + 1, last if last.exists() else None, self.store)


class FinalCheckpoint(Callback):
    """At the end: step=N.ckpt when N is not a multiple of ckpt_every, and last.ckpt whenever it
    is not step N (e.g. a write of last.ckpt failed, and the rerun resumed from step=N.ckpt)."""

    def __init__(self, ckpt_dir: Path, guard: NonFiniteGuard):
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


PALETTE = (
    torch.tensor(
        [  # one fixed colour per slot (tab20), so a slot keeps its colour over time
            [31, 119, 180],
            [255, 127, 14],
            [44, 160, 44],
            [214, 39, 40],
            [148, 103, 189],
            [140, 86, 75],
            [227, 119, 194],
            [127, 127, 127],
            [188, 189, 34],
            [23, 190, 207],
            [174, 199, 232],
            [255, 187, 120],
            [152, 223, 138],
            [255, 152, 150],
            [197, 176, 213],
            [196, 156, 148],
            [247, 182, 210],
            [199, 199, 199],
            [219, 219, 141],
            [158, 218, 229],
        ],
        dtype=torch.float32,
    )
    / 255.0
)


def mask_overlay(
    frames: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int], alpha: float = 0.55
) -> torch.Tensor:
    """Frames (T, S, S, 3) uint8 and soft masks (T, K, N) -> (T, 3, S, S) in [0, 1], each
    pixel tinted with the colour of its arg-max slot (masks upsampled bilinearly)."""
    t, k, _ = masks.shape
    size = frames.shape[1:3]
    m = masks.float().reshape(t, k, *grid)
    m = torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)
    labels = m.argmax(dim=1)  # (T, S, S)
    colours = PALETTE[labels % len(PALETTE)].permute(0, 3, 1, 2)  # (T, 3, S, S)
    img = frames.permute(0, 3, 1, 2).float() / 255.0
    return (1 - alpha) * img + alpha * colours


class SlotPictures(Callback):
    """Every ``every`` steps: slot masks over the frames of one fixed clip, in TensorBoard."""

    def __init__(
        self, every: int, clip: dict | None, grid: tuple[int, int], token_grid: tuple | None
    ):
        self.every, self.clip, self.grid, self.token_grid = (
            max(1, int(every)),
            clip,
            grid,
            token_grid,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.clip is None or not (step == 1 or step % self.every == 0):
            return
        self.draw(trainer, pl_module, step)

    @rank_zero_only
    def draw(self, trainer, pl_module, step: int) -> None:
        import torchvision

        logger = trainer.logger
        if logger is None or not hasattr(logger.experiment, "add_image"):
            return
        clip = self.clip
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad(), torch.autocast(pl_module.device.type, enabled=False):
            feats = clip["features"][None].to(pl_module.device)
            tokens = clip["tokens"][None].to(pl_module.device) if "tokens" in clip else None
            out = pl_module.model(feats, tokens)
        pl_module.train(was_training)
        frames = clip["frames"]
        rows = [
            frames.permute(0, 3, 1, 2).float() / 255.0,
            mask_overlay(frames, out["decoder"]["masks"][0].cpu(), self.grid),
            mask_overlay(frames, out["processor"]["corrector"]["masks"][0].cpu(), self.grid),
        ]
        names = "rows: frames | feature-decoder masks | slot-attention masks"
        steve = out.get("steve", {}).get("masks") if isinstance(out.get("steve"), dict) else None
        if steve is not None and self.token_grid is not None:
            rows.append(mask_overlay(frames, steve[0].cpu(), tuple(self.token_grid)))
            names += " | STEVE attention masks"
        grid_img = torchvision.utils.make_grid(torch.cat(rows), nrow=frames.shape[0], padding=2)
        logger.experiment.add_image("slots/masks_over_time", grid_img.clamp(0, 1), step)
        logger.experiment.add_text("slots/legend", names, step)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.work_dir) / "runs" / str(cfg.run_name)


def check_checkpoint_fits(
    path: Path, ckpt: dict, expected: SlotTrainingModule, against: str, remedy: str
) -> None:
    """Refuse a checkpoint whose slot model differs from ``expected`` (another NUM_SLOTS, SLOT_DIM,
    vocabulary, store, ...): one error naming the checkpoint, the weights whose names or shapes
    differ and the config keys behind them, instead of load_state_dict's traceback."""
    hp = ckpt.get("hyper_parameters") or {}
    if not isinstance(hp.get("config"), dict):
        raise StageError(
            f"{path} is not a train-slots checkpoint (it has no slot-model config; a "
            "pretrain-dvae checkpoint?)"
        )
    state, own = ckpt["state_dict"], expected.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return

    def listed(items):
        return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")

    parts = []
    if shapes:
        parts.append(
            f"{len(shapes)} weights differ in shape (checkpoint vs expected): {listed(shapes)}"
        )
    if missing:
        parts.append(f"{len(missing)} weights missing from the checkpoint: {listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} weights only in the checkpoint: {listed(unexpected)}")
    ours = dict(expected.hparams)
    keys = [
        f"{k}={_flat(hp['config']).get(k)} (checkpoint) vs {_flat(ours['config']).get(k)}"
        for k in config_changes(hp["config"], ours["config"])
    ]
    keys += [
        f"store {name}: {hp.get(name)} (checkpoint) vs {ours.get(name)}"
        for name in ("feature_dim", "num_tokens", "token_grid")
        if (list(hp[name]) if isinstance(hp.get(name), (list, tuple)) else hp.get(name))
        != (list(ours[name]) if isinstance(ours.get(name), (list, tuple)) else ours.get(name))
    ]
    keys.sort(key=lambda k: not k.startswith(("globals.", "store ")))  # the usual culprits first
    raise StageError(
        f"checkpoint {path} holds another slot model than {against}: {'; '.join(parts)}. "
        + (f"Config differences: {listed(keys)}. " if keys else "")
        + remedy
    )


def _flat(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_changes(old: dict, new: dict) -> list[str]:
    """Keys (dotted) whose values differ and that matter for what is trained."""
    a, b = _flat(old), _flat(new)
    keys = sorted(set(a) | set(b))
    return [
        k
        for k in keys
        if a.get(k) != b.get(k)
        and not any(
            k == p or k.startswith(p) if p.endswith(".") else k == p for p in RESUMABLE_CHANGES
        )
    ]


def _check_same_run(run_dir: Path, cfg_dict: dict, inputs: TrainingInputs) -> None:
    old_cfg = run_dir / "config.yaml"
    if old_cfg.is_file():
        changed = config_changes(OmegaConf.to_container(OmegaConf.load(old_cfg)), cfg_dict)
        if changed:
            raise StageError(
                f"{run_dir} holds a run with a different config ({', '.join(changed[:6])}"
                f"{' ...' if len(changed) > 6 else ''}); choose a new run_name=NAME for this experiment, "
                "or use --resume PATH to start a new run from one of its checkpoints"
            )
    old_inputs = run_dir / "inputs.json"
    if old_inputs.is_file():
        old = json.loads(old_inputs.read_text())
        new = inputs.describe()
        for key in ("store_fingerprint", "dvae_hash"):
            if old.get(key) != new.get(key):
                raise StageError(
                    f"{run_dir} was trained with {key} {old.get(key)}, this config gives {new.get(key)}; "
                    "choose a new run_name=NAME"
                )


@rank_zero_only
def _write_run_files(run_dir: Path, cfg: DictConfig, inputs: TrainingInputs) -> None:
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    RaisingCheckpointIO.remove_leftovers(run_dir / "checkpoints")
    save_resolved(cfg, run_dir / "config.yaml")
    tmp = run_dir / "inputs.json.tmp"
    tmp.write_text(json.dumps(inputs.describe(), indent=2) + "\n")
    tmp.replace(run_dir / "inputs.json")


def example_clip(store: FeatureStore, cfg: DictConfig, tokens_hash: str | None) -> dict | None:
    """The first clip of the val split (else train) with its frames, for pictures."""
    fields = clip_fields(cfg, tokens_hash) + ("frames",)
    for split in ("val", "train"):
        ds = ClipDataset(
            store,
            split,
            cfg.dataset.ep_length,
            1,
            cfg.dataset.frame_step,
            fields=fields,
            tokens=tokens_hash,
            include_flipped=False,
        )
        if len(ds):
            return ds[0]
    return None


def build_module(cfg_dict: dict, inputs: TrainingInputs) -> SlotTrainingModule:
    store = inputs.store
    return SlotTrainingModule(
        cfg_dict,
        store.feature_dim,
        int(store.meta["num_tokens"]),
        list(inputs.token_grid) if inputs.token_grid else None,
    )


def train(cfg: DictConfig, resume: str | Path | None = None) -> Path:
    """Train the slot model of ``cfg`` from its caches; returns the run directory.

    Resumes from ``resume`` (a checkpoint path) or from the run's own ``last.ckpt``; returns at
    once when the run already reached ``trainer.max_steps``.
    """
    inputs = resolve_inputs(cfg)
    cfg_dict = resolve(cfg)
    run_dir = run_dir_of(cfg)
    ckpt_dir = run_dir / "checkpoints"
    tc = cfg.trainer

    ckpt_path: Path | None = Path(resume) if resume else None
    if ckpt_path is not None and not ckpt_path.is_file():
        raise StageError(f"--resume {ckpt_path}: no such checkpoint file")
    if ckpt_path is None and ckpt_dir.is_dir():
        _check_same_run(run_dir, cfg_dict, inputs)
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
        _write_run_files(run_dir, cfg, inputs)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    set_fast_math(cfg)
    precision = resolve_precision(cfg)
    log.info(
        "stage 3: %s on %s, precision %s, store %s%s",
        run_dir.name,
        device_type(cfg),
        precision,
        inputs.store.fingerprint,
        f", dVAE {inputs.tokens_hash}" if inputs.tokens_hash else "",
    )

    module = build_module(cfg_dict, inputs)
    if ckpt_path is not None:
        check_checkpoint_fits(
            ckpt_path,
            read_checkpoint(ckpt_path),
            module,
            "this config",
            "Set these keys as they were for the checkpoint (its config is saved in it), "
            "or train without --resume.",
        )
    if tc.compile:
        module.model.compile()
    store = inputs.store
    has_val = len(store.videos_in("val")) > 0
    module.data_stream = {
        "store": str(store.path),
        "tokens": inputs.tokens_hash,
        "masks": store.has_masks,
        "val": has_val,
    }

    guard = NonFiniteGuard([tc.log_every, tc.ckpt_every], ckpt_dir, str(store.path))
    callbacks = [
        guard,
        SlotPictures(
            tc.image_every,
            example_clip(store, cfg, inputs.tokens_hash),
            store.grid,
            inputs.token_grid,
        ),
        FinalCheckpoint(ckpt_dir, guard),
        TQDMProgressBar(refresh_rate=max(1, min(int(tc.log_every), 20))),
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step={step}",
            auto_insert_metric_name=False,
            every_n_train_steps=int(tc.ckpt_every),
            save_top_k=-1,
            save_last=True,
            save_on_train_epoch_end=False,
        ),
        sigterm := CheckpointOnSigterm(ckpt_dir, "egoslots train-slots"),
    ]
    val_batches = int(tc.get("val_batches", 50)) if has_val else 0
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        max_steps=int(tc.max_steps),
        max_epochs=-1,
        gradient_clip_val=float(tc.gradient_clip_val) or None,
        gradient_clip_algorithm="norm",
        precision=precision,
        accelerator=str(tc.accelerator),
        devices=tc.devices,
        num_nodes=int(tc.num_nodes),
        strategy=str(tc.strategy),
        logger=TensorBoardLogger(str(run_dir), name="tb", version="", default_hp_metric=False),
        callbacks=callbacks,
        log_every_n_steps=int(tc.log_every),
        val_check_interval=int(tc.val_every) if val_batches else None,
        check_val_every_n_epoch=None,
        limit_val_batches=val_batches,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        enable_model_summary=False,
        plugins=[RaisingCheckpointIO()],
    )
    try:
        with output_writes(run_dir):
            trainer.fit(module, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    except NonFiniteLossError as err:
        raise StageError(str(err)) from err
    except SIGTERMException:
        raise sigterm.stopped() from None
    return run_dir


# --------------------------------------------------------------------------------------------
# Loading a trained run (evaluate, export, visualize)
# --------------------------------------------------------------------------------------------
def checkpoint_path(run_dir: str | Path, checkpoint: str | int | Path = "last") -> Path:
    """``last``, a step number, ``step=N`` or a path -> the checkpoint file of a run."""
    run_dir = Path(run_dir)
    if isinstance(checkpoint, Path) or (
        isinstance(checkpoint, str) and checkpoint.endswith(".ckpt")
    ):
        path = Path(checkpoint)
    elif checkpoint == "last":
        path = run_dir / "checkpoints" / "last.ckpt"
    else:
        step = str(checkpoint).removeprefix("step=")
        path = run_dir / "checkpoints" / f"step={step}.ckpt"
    if not path.is_file():
        have = (
            sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
            if (run_dir / "checkpoints").is_dir()
            else []
        )
        raise StageError(
            f"no checkpoint {path} (have: {', '.join(have) or 'none'}); "
            f"train it with `egoslots train-slots {run_dir / 'config.yaml'}`"
        )
    return path


def load_trained(
    run_dir: str | Path, checkpoint: str | int | Path = "last", map_location: str = "cpu"
):
    """A trained run -> (SlotModel in eval mode, resolved cfg, FeatureStore, tokens hash | None)."""
    run_dir = Path(run_dir)
    path = checkpoint_path(run_dir, checkpoint)
    ckpt = read_checkpoint(path)
    inputs_path = run_dir / "inputs.json"
    if not inputs_path.is_file():
        raise StageError(f"{run_dir} has no inputs.json: it is not a train-slots run directory")
    inputs = json.loads(inputs_path.read_text())
    try:
        store = FeatureStore.open(inputs["store"])
    except StoreError as err:
        raise StageError(f"{err} (the store run {run_dir} was trained on)") from err
    if store.fingerprint != inputs["store_fingerprint"]:
        raise StageError(
            f"{inputs['store']} now holds store {store.fingerprint}, but {run_dir} was trained on "
            f"{inputs['store_fingerprint']}: re-extract with the run's config.yaml"
        )
    _check_checkpoint_of_run(path, ckpt, run_dir, store, inputs)
    module = SlotTrainingModule.load_from_checkpoint(
        path, map_location=map_location, weights_only=True
    )
    cfg = OmegaConf.create(module.hparams.config)
    return module.model.eval(), cfg, store, inputs.get("dvae_hash")


def _check_checkpoint_of_run(
    path: Path, ckpt: dict, run_dir: Path, store: FeatureStore, inputs: dict
) -> None:
    """The checkpoint must hold the slot model of the run's config.yaml on the run's store (a
    checkpoint copied in from another run would otherwise fail deep inside the model)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():  # nothing to compare with; load_from_checkpoint needs the saved config
        if not isinstance((ckpt.get("hyper_parameters") or {}).get("config"), dict):
            raise StageError(
                f"{path} is not a train-slots checkpoint (it has no slot-model config)"
            )
        return
    cfg_dict = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    grid = inputs.get("token_grid")
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = SlotTrainingModule(
            cfg_dict, store.feature_dim, int(store.meta["num_tokens"]), list(grid) if grid else None
        )
    check_checkpoint_fits(
        path,
        ckpt,
        expected,
        f"run {run_dir} (its config.yaml and store)",
        f"The checkpoint comes from another run: use that run's directory, or move it out of "
        f"{run_dir / 'checkpoints'}.",
    )


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
def train_slots(cfg: DictConfig, resume: Path | None = None):
    """Stage 3: train the slot model (SlotContrast + STEVE decoder) from cached features and tokens.

    Never runs the ViT. Writes <work_dir>/runs/<run_name>/ (config.yaml, inputs.json,
    checkpoints/step=N.ckpt and last.ckpt, tb/). Rerun the same command to resume.
    """
    run_dir = train(cfg, resume=resume)
    click.echo(f"run: {run_dir}")
