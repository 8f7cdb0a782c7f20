"""Training machinery that both training stages share: pretrain-dvae (stages/dvae.py) and
train-slots (stages/train_slots.py). Nothing here knows which model is trained.

- Data order: :class:`ResumableRandomSampler`, a seeded stream of indices that a resumed run
  (or every DDP rank's slice of it) continues exactly where the uninterrupted run would be.
- Several processes: :func:`first_bad_step_of_all_ranks` makes every rank agree on the first
  NaN/inf step so they stop together; :func:`gather_with_grad` all-gathers a batch with
  gradients flowing back to the rank that produced each row.
- Checkpoints: :func:`find_resume_checkpoint` picks the newest one that loads,
  :func:`catch_up_last` brings last.ckpt up to it, :func:`read_checkpoint` loads one safely
  (``weights_only=True``) with one clear error, and :class:`RaisingCheckpointIO` writes them
  atomically and raises when a write fails (Lightning alone swallows permission errors).
- Write faults: :func:`output_writes` turns a permission / read-only / disk-full OSError into one
  StageError naming the file and what to do (:data:`WRITE_FAULTS`), with no traceback.

Kept apart from the stages so that reading one stage does not mean reading the other.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import Sampler

from stages.common import StageError

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
# Checkpoints: finding, reading, catching up
# --------------------------------------------------------------------------------------------
def find_resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint of the highest step that loads: last.ckpt or the newest step=N.ckpt.

    Lightning writes step=N.ckpt before last.ckpt, so a kill between the two leaves last.ckpt one
    interval behind; resuming from it would redo those steps and save them as step=N-v1.ckpt
    beside step=N.ckpt. An unreadable file (damaged) is skipped with a warning.
    """
    best, best_step = None, -1
    candidates = [ckpt_dir / "last.ckpt"] + sorted(
        ckpt_dir.glob("step=*.ckpt"), key=lambda p: _step_of(p), reverse=True
    )
    for path in candidates:
        if not path.is_file():
            continue
        try:
            step = int(
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
            )
        except Exception as err:  # noqa: BLE001 - a truncated file: try the next one
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, err)
            continue
        if step > best_step:
            best, best_step = path, step
        if path.name != "last.ckpt":
            break  # step=N files come newest first: the first that loads is the newest
    return best


@rank_zero_only
def catch_up_last(newest: Path) -> None:
    """Copy ``newest`` (a step=N.ckpt) over last.ckpt, which a kill between the two writes left
    older (or damaged): evaluate, export and visualize read last.ckpt, also when the run has
    nothing left to train. Atomic, as every checkpoint write."""
    tmp = newest.with_name(f".last.ckpt.tmp-{os.getpid()}")
    try:
        with open(newest, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, newest.with_name("last.ckpt"))
    finally:
        tmp.unlink(missing_ok=True)


def _step_of(path: Path) -> int:
    m = re.match(r"step=(\d+)", path.stem)
    return int(m.group(1)) if m else -1


def checkpoint_step(path: Path) -> int:
    return int(read_checkpoint(path)["global_step"])


def read_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint, loaded with ``weights_only=True``: tensors and plain containers only
    (all a checkpoint of ours holds), so a .ckpt carrying other Python objects is refused, never run."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise StageError(
            f"refused to load {path}: it holds Python objects other than tensors and plain "
            f"containers, which egoslots checkpoints never do (torch.load weights_only=True: "
            f"{reason})"
        ) from err
    except Exception as err:  # noqa: BLE001 - truncated, not a torch file, ...
        raise StageError(
            f"cannot read checkpoint {path} ({type(err).__name__}: {err}): is it a truncated "
            "file or not a checkpoint?"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise StageError(
            f"{path} is not a Lightning checkpoint (no state_dict / global_step): give a "
            "checkpoints/*.ckpt file of a train-slots or pretrain-dvae run"
        )
    return ckpt


# --------------------------------------------------------------------------------------------
# Writes: atomic checkpoints and clear messages for failed writes
# --------------------------------------------------------------------------------------------
# What a failed write means, by errno, and what the user can do about it.
WRITE_FAULTS = {
    errno.EACCES: "make it writable for this user, or set work_dir to a directory you can write",
    errno.EPERM: "make it writable for this user, or set work_dir to a directory you can write",
    errno.EROFS: "the file system is mounted read-only: set work_dir to a writable disk",
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is exceeded: free some space or raise the quota",
}


def write_fault(err: OSError, out_dir: Path, kept: str, resume: str) -> str | None:
    """The one-line message for an OSError of writing into ``out_dir``; None if not a write fault."""
    hint = WRITE_FAULTS.get(err.errno)
    if hint is None:
        return None
    target = Path(err.filename) if err.filename else out_dir
    try:
        inside = target.resolve().is_relative_to(out_dir.resolve())
    except (OSError, ValueError):
        inside = False
    verb = "write" if inside or not err.filename else "access"
    return (
        f"cannot {verb} {target}: {os.strerror(err.errno)} ({errno.errorcode[err.errno]}): {hint}. "
        f"{kept}; {resume}"
    )


class RaisingCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, except that a failed write raises and a local write is atomic.

    Lightning 2.6's ``_atomic_save`` swallows PermissionError (EACCES/EPERM): the run would go on
    for days with no checkpoint saved and no word said. Its local "atomic" write also stages the
    whole file in the system temp dir and moves it over (a copy when /tmp is another disk). Here
    a local checkpoint goes to a hidden temporary file next to it, is fsynced and renamed into
    place, so last.ckpt is either the old or the new one; remote paths use fsspec. Every OSError
    reaches :func:`output_writes`.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"storage_options is not supported by {type(self).__name__}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        fs, urlpath = fsspec.core.url_to_fs(str(path))
        fs.makedirs(os.path.dirname(urlpath), exist_ok=True)
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        if "file" not in protocols:  # object stores: one upload, whole or nothing
            fs.pipe_file(urlpath, buffer.getvalue())
            return
        target = Path(urlpath)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as err:  # name the checkpoint, not its temporary file
            raise type(err)(err.errno, err.strerror, str(target)) from err
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def remove_leftovers(ckpt_dir: Path) -> None:
        """Delete the temporary files of checkpoint writes that a kill -9 or power cut cut short
        (``.NAME.ckpt.tmp-PID`` of a process no longer running). Each is as large as a
        checkpoint, and a job killed again and again would pile them up. Rank 0, before training."""
        for tmp in Path(ckpt_dir).glob(".*.ckpt.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _process_running(int(pid)):
                tmp.unlink(missing_ok=True)


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


@contextmanager
def output_writes(
    out_dir: Path, kept: str = "", resume: str = "then rerun the same command to resume"
):
    """Turn a permission / read-only / disk-full OSError inside the block into one StageError
    naming the file and the errno's meaning (no traceback); other errors pass unchanged."""
    try:
        yield
    except OSError as err:
        message = write_fault(
            err,
            out_dir,
            kept or f"Checkpoints already in {out_dir / 'checkpoints'} are kept",
            resume,
        )
        if message is None:
            raise
        raise StageError(message) from err
