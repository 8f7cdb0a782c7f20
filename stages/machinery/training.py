"""The training scaffold all three training stages share: pretrain-encoder, pretrain-dvae and
train-slots. Nothing here knows which model is trained.

- Data order: :class:`ResumableRandomSampler`, a seeded stream of indices that a resumed run
  (or every DDP rank's slice of it) continues exactly where the uninterrupted run would be.
- Several processes: :func:`gather_with_grad` all-gathers a batch with gradients flowing back
  to the rank that produced each row; :func:`is_rank_zero` tells rank 0 before the Trainer
  exists.
- The Trainer: :func:`make_trainer` from a stage's config section (its run-machinery keys),
  with what every stage wants (periodic and last checkpoints, SIGTERM checkpoints, TensorBoard,
  atomic checkpoint writes that raise when they fail: :class:`RaisingCheckpointIO`, the
  precision recorded for a resume: :class:`RecordPrecision`); :func:`run_precision`, the one
  precision choice; :func:`fit` that turns a SIGTERM stop into exit 143; :func:`require_steps`,
  the one "training finished" test.

Run directories and checkpoint files are ``stages/machinery/rundirs.py``; the NaN guard (with its
agreement across DDP ranks) and pictures are ``stages/machinery/callbacks.py``; the data
``stages/machinery/datamodules.py``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig
from torch.utils.data import Sampler

from egoslots.cache.location import as_location, write_file
from egoslots.pipeline.config import ConfigError
from egoslots.stages.machinery.interrupts import CheckpointOnSigterm, SIGTERMException
from egoslots.stages.machinery.runtime import choose_precision, several_processes

log = logging.getLogger("egoslots")


# --------------------------------------------------------------------------------------------
# Data order: a seeded, resumable stream of indices
# --------------------------------------------------------------------------------------------
class ResumableRandomSampler(Sampler[int]):
    """Indices drawn uniformly with replacement (a seeded RandomSampler) from position ``start``.

    Index i of the stream depends only on (seed, i), so a run resumed at step s (``start`` =
    s * batch size) reads exactly the clips the uninterrupted run would have read.

    Under DDP every rank reads the same global stream and takes its own ``batch``-sized slice of
    each global batch of ``batch * world`` draws: rank r's step-s batch is global positions
    s*batch*world + r*batch ... + batch - 1. The ranks' batches are disjoint parts of the global
    batch and, concatenated in rank order, equal the batch a 1-process run with batch size
    ``batch * world`` draws at step s (same seed). ``total`` and ``start`` count this rank's draws.
    """

    BLOCK = 1 << 16

    def __init__(
        self,
        size: int,
        total: int,
        seed: int,
        start: int = 0,
        batch: int = 1,
        rank: int = 0,
        world: int = 1,
    ):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.size, self.total, self.seed, self.start = size, total, seed, start
        self.batch, self.rank, self.world = max(1, int(batch)), int(rank), int(world)

    def __len__(self) -> int:
        # The whole stream, also when iteration resumes at ``start``: Lightning restores its
        # in-epoch batch counter to the resumed step and ends the epoch when that counter
        # reaches len(loader). With the remaining length instead (total - start) a run resumed
        # at step s < max_steps / 2 ended its "epoch" early, restarted the stream at ``start``
        # and trained its last steps on clips it had already seen.
        return self.total

    def _global_positions(self, local: torch.Tensor) -> torch.Tensor:
        b, w = self.batch, self.world
        return (local // b) * b * w + self.rank * b + local % b

    def _draws(self, pos: torch.Tensor) -> torch.Tensor:
        """The global stream's values at positions ``pos`` (increasing), one generator per block."""
        out = torch.empty_like(pos)
        blocks = pos // self.BLOCK
        for block in torch.unique_consecutive(blocks).tolist():
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
            draws = torch.randint(self.size, (self.BLOCK,), generator=g)
            here = blocks == block
            out[here] = draws[pos[here] - block * self.BLOCK]
        return out

    def __iter__(self) -> Iterator[int]:
        pos = self.start
        while pos < self.total:
            stop = min(self.total, (pos // self.BLOCK + 1) * self.BLOCK)
            yield from self._draws(self._global_positions(torch.arange(pos, stop))).tolist()
            pos = stop


# --------------------------------------------------------------------------------------------
# Several processes (DDP)
# --------------------------------------------------------------------------------------------
class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward all-reduces (sums) the gradient and keeps this rank's
    slice: every rank's loss of the gathered batch sends its gradient back to the rank that
    produced each row. (torch.distributed.nn.all_gather, behind Lightning's all_gather with
    sync_grads, returned wrong gradients on gloo in torch 2.14: tests/test_ddp.py.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world*B, ...) in rank order, with gradients to every rank."""
    return _GatherWithGrad.apply(x)


# --------------------------------------------------------------------------------------------
# The Trainer
# --------------------------------------------------------------------------------------------
class RaisingCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, except that a failed write raises and a local write is atomic.

    Lightning 2.6's ``_atomic_save`` swallows PermissionError (EACCES/EPERM): the run would go on
    for days with no checkpoint saved and no word said. Its local "atomic" write also stages the
    whole file in the system temp dir and moves it over (a copy when /tmp is another disk). Here
    every checkpoint goes through egoslots' one atomic writer (``egoslots.cache.location.write_file``: a
    hidden temporary beside it, fsynced and renamed; one upload for a remote path), so last.ckpt
    is either the old or the new one, and every OSError reaches ``egoslots.stages.machinery.common.output_writes``.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"storage_options is not supported by {type(self).__name__}")
        write_file(as_location(path), lambda f: torch.save(checkpoint, f))


PRECISION_KEY = "egoslots_precision"


class RecordPrecision(Callback):
    """Stores the precision a run trains in inside each checkpoint: a resumed ``precision:
    auto`` run keeps it instead of measuring again (:func:`stored_precision`)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[PRECISION_KEY] = str(trainer.precision)


def stored_precision(checkpoint: dict | None) -> str | None:
    """The precision a checkpoint's run trained in (None: no checkpoint, or an older one)."""
    return (checkpoint or {}).get(PRECISION_KEY)


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 of a DDP launch (or not under DDP at all).

    Known before the Trainer starts: Lightning reads RANK / LOCAL_RANK / SLURM_PROCID into
    ``rank_zero_only.rank``; NODE_RANK / GROUP_RANK > 0 is another node of a multi-node launch.
    """
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)) or 0)
    return getattr(rank_zero_only, "rank", 0) == 0 and node == 0


def run_precision(settings: DictConfig, device: str, probe, checkpoint: dict | None) -> str:
    """The precision a training stage trains in: ``settings.precision`` (``auto`` measured by
    ``probe``, the stage's own step), the precision a resumed ``checkpoint`` recorded, or one
    that several processes agree on (``stages/machinery/runtime.choose_precision``)."""
    several = several_processes(settings.devices, settings.num_nodes)
    return choose_precision(
        settings.precision, device, probe, stored_precision(checkpoint), several
    )


def make_trainer(
    run_dir: Path,
    *,
    command: str,
    section: str,
    settings: DictConfig,
    precision: str,
    callbacks: Sequence[Callback],
    save_on_epoch_end: bool | None = False,
    **trainer_kwargs,
) -> tuple[L.Trainer, CheckpointOnSigterm]:
    """The Trainer of every training stage, writing into ``run_dir``.

    The run-machinery keys come from the stage's config section ``settings`` (``section`` names
    it in errors: ``trainer``, ``dvae`` or ``pretrain_encoder``): ``max_steps``, checkpoints
    (``checkpoints/step=N.ckpt`` every ``ckpt_every`` steps, and ``last.ckpt``), ``log_every``
    (TensorBoard in ``tb/``), ``accelerator``, ``devices``, ``num_nodes``, ``strategy``. A SIGTERM
    saves a checkpoint (``command`` is named in the message). ``callbacks`` run first; the rest
    (gradient clipping, validation) as given. ``save_on_epoch_end``: Lightning's
    ``save_on_train_epoch_end`` for the periodic checkpoint (None: Lightning decides, which
    stage 0 relies on for its final checkpoint).
    """
    ckpt_dir = run_dir / "checkpoints"
    sigterm = CheckpointOnSigterm(ckpt_dir, command)
    periodic = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="step={step}",
        auto_insert_metric_name=False,
        every_n_train_steps=int(settings.ckpt_every),
        save_top_k=-1,
        save_last=True,
        save_on_train_epoch_end=save_on_epoch_end,
    )
    try:
        trainer = L.Trainer(
            default_root_dir=str(run_dir),
            max_steps=int(settings.max_steps),
            max_epochs=-1,
            logger=TensorBoardLogger(str(run_dir), name="tb", version="", default_hp_metric=False),
            callbacks=[*callbacks, RecordPrecision(), periodic, sigterm],
            log_every_n_steps=int(settings.log_every),
            use_distributed_sampler=False,  # the datamodules slice the sample stream by rank
            num_sanity_val_steps=0,
            enable_model_summary=False,
            plugins=[RaisingCheckpointIO()],  # a checkpoint that cannot be written stops the run
            accelerator=str(settings.accelerator),
            devices=settings.devices,
            num_nodes=int(settings.num_nodes),
            strategy=str(settings.strategy),
            precision=precision,
            **trainer_kwargs,
        )
    except (MisconfigurationException, ValueError) as err:  # accelerator=gpu on no GPU, strategy=x
        raise ConfigError(
            f"{section}.accelerator / devices / num_nodes / strategy / precision: this machine "
            f"cannot train with these settings ({str(err).strip().splitlines()[0]})"
        ) from err
    return trainer, sigterm


def fit(
    trainer: L.Trainer, sigterm: CheckpointOnSigterm, module, data, resume: Path | None
) -> None:
    """``trainer.fit`` from ``resume`` (a checkpoint, or None); a SIGTERM stop becomes one line and
    exit status 143 once its checkpoint is saved."""
    try:
        trainer.fit(
            module, datamodule=data, ckpt_path=str(resume) if resume else None, weights_only=True
        )
    except SIGTERMException:
        raise sigterm.stopped() from None


def require_steps(trainer: L.Trainer, max_steps: int, what: str, error: type[Exception]) -> None:
    """After :func:`fit`: training that stopped short of ``max_steps`` (a guard stopped it) is an
    ``error`` saying the run resumes when rerun."""
    if trainer.global_step < int(max_steps):
        raise error(
            f"{what} training stopped at step {trainer.global_step} of {max_steps}; rerun to resume"
        )
