"""Stopping training on request without losing steps: SIGTERM (preemption, `scancel`, `kill`).

Lightning already turns SIGTERM into a clean stop: it finishes the step in flight, then raises
``SIGTERMException`` on every rank. :class:`CheckpointOnSigterm` writes that step's checkpoint
(``step=N.ckpt`` and ``last.ckpt``) at that moment, so the rerun resumes at step N instead of
at the last periodic checkpoint; :meth:`CheckpointOnSigterm.stopped` turns the exception into one line for the user
and exit status 143 (128 + SIGTERM), the status job schedulers expect from a terminated job.

DataLoader workers ignore SIGTERM (:func:`ignore_sigterm_in_worker`): a scheduler signals
every process of the job, and a worker that died first would turn the clean stop into a
"DataLoader worker exited unexpectedly" crash. The parent shuts its workers down itself (and
kills any still alive at exit).

Under DDP every rank must get SIGTERM (schedulers and ``kill`` of the process group do this):
Lightning stops each rank at the end of the step in which it saw the signal, so ranks signalled
at different moments may wait on each other. Lightning's own SLURM auto-requeue (SIGUSR1 with
``#SBATCH --signal``) saves from inside the signal handler, possibly mid-step: prefer SIGTERM
and ``--requeue``.

Ctrl-C (SIGINT) is not handled here: it can land in the middle of an optimizer step, so the
weights at that moment are not a consistent checkpoint. Use ``kill -TERM PID`` to stop a run
and keep its last step.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from stages.common import StageError

log = logging.getLogger("egoslots")

__all__ = ["CheckpointOnSigterm", "SIGTERMException", "Stopped", "ignore_sigterm_in_worker"]


class Stopped(StageError):
    """Training stopped by SIGTERM after writing a checkpoint; rerunning resumes it."""

    exit_code = 128 + signal.SIGTERM


class CheckpointOnSigterm(Callback):
    """Saves the finished step when Lightning stops for SIGTERM (see the module docstring)."""

    def __init__(self, ckpt_dir: Path, command: str):
        self.ckpt_dir = Path(ckpt_dir)
        self.command = command  # named in the message, e.g. "egoslots train-slots"
        self.saved: Path | None = None
        self.step = 0
        _kill_daemon_children_at_exit()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.step = int(trainer.global_step)
        if self.step == 0:
            return  # nothing trained yet: nothing worth a checkpoint
        path = self.ckpt_dir / f"step={self.step}.ckpt"
        try:
            # every rank takes part in the (collective) saves: decide on rank 0's view of the disk
            if not trainer.strategy.broadcast(path.exists()):
                trainer.save_checkpoint(path)
            trainer.save_checkpoint(self.ckpt_dir / "last.ckpt")
            self.saved = path
        except Exception:  # noqa: BLE001 - a failed save must not stop Lightning's teardown
            log.exception("could not save the checkpoint of step %d on SIGTERM", self.step)

    def stopped(self) -> Stopped:
        """The error to raise once ``trainer.fit`` has raised ``SIGTERMException``."""
        if self.saved is None:
            return Stopped(
                f"stopped by SIGTERM before the first step finished; rerun the same `{self.command}` "
                "command to start again"
            )
        return Stopped(
            f"stopped by SIGTERM after step {self.step}; saved {self.saved}; rerun the same "
            f"`{self.command}` command to resume from it"
        )


def _kill_daemon_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


@functools.cache
def _kill_daemon_children_at_exit() -> None:
    """At exit, SIGKILL daemon children (DataLoader workers) still alive.

    multiprocessing's own exit handler stops them with SIGTERM, which workers ignore here, and
    then waits for them without a timeout: a run whose teardown was skipped would hang. atexit
    runs handlers last-registered first, and multiprocessing registered its handler on import.
    """
    atexit.register(_kill_daemon_children)


def ignore_sigterm_in_worker(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: leave SIGTERM to the training process (and seed the worker
    as Lightning's own ``worker_init_fn`` would, which a custom one replaces)."""
    from lightning.fabric.utilities.seed import pl_worker_init_function

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pl_worker_init_function(worker_id)
