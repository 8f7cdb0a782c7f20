"""Stopping training on request without losing steps: SIGTERM (preemption, `scancel`, `kill`)
and Ctrl-C (SIGINT).

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

Ctrl-C (SIGINT) takes the same path: it can land in the middle of an optimizer step, so it only
raises Lightning's stop flag (as SIGTERM does); the step in flight finishes, its checkpoint is
written and the command ends with a hint how to resume and exit status 130 (128 + SIGINT). A
second Ctrl-C stops at once (Python's KeyboardInterrupt), losing the steps since the last
checkpoint. Workers ignore SIGINT too: a terminal sends it to the whole process group.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import signal
import threading
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from egoslots.stages.machinery.common import StageError
from egoslots.stages.machinery.runtime import quiet_when_the_main_process_hangs_up

log = logging.getLogger("egoslots")

__all__ = ["CheckpointOnSigterm", "SIGTERMException", "Stopped", "ignore_sigterm_in_worker"]


class Stopped(StageError):
    """Training stopped by SIGTERM or Ctrl-C after writing a checkpoint; rerunning resumes it."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + signum  # 143 for SIGTERM, 130 for Ctrl-C, as shells report them


class CheckpointOnSigterm(Callback):
    """Saves the finished step when Lightning stops for SIGTERM (see the module docstring)."""

    def __init__(self, ckpt_dir: Path, command: str):
        self.ckpt_dir = Path(ckpt_dir)
        self.command = command  # named in the message, e.g. "egoslots train-slots"
        self.saved: Path | None = None
        self.step = 0
        self.signum = signal.SIGTERM  # which signal stopped the run
        self._previous_sigint = None
        _kill_daemon_children_at_exit()

    def on_train_start(self, trainer, pl_module) -> None:
        """Ctrl-C raises Lightning's stop flag instead of KeyboardInterrupt (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def on_sigint(signum, frame):
            if trainer._signal_connector.received_sigterm:  # the second Ctrl-C: stop now
                raise KeyboardInterrupt
            log.warning(
                "Ctrl-C: stopping after this step and saving its checkpoint (Ctrl-C again to "
                "stop at once, losing the steps since the last checkpoint)"
            )
            self.signum = signal.SIGINT
            # Lightning's own SIGTERM flag (no public setter): the step in flight finishes, then
            # every loop raises SIGTERMException, handled below like a real SIGTERM.
            trainer._signal_connector.received_sigterm = True

        self._previous_sigint = signal.signal(signal.SIGINT, on_sigint)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

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
            log.exception("could not save the checkpoint of step %d on %s", self.step, self.name)

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else "SIGTERM"

    def stopped(self) -> Stopped:
        """The error to raise once ``trainer.fit`` has raised ``SIGTERMException``."""
        if self.saved is None:
            return Stopped(
                f"stopped by {self.name} before the first step finished; rerun the same "
                f"`{self.command}` command to start again",
                self.signum,
            )
        return Stopped(
            f"stopped by {self.name} after step {self.step}; saved {self.saved}; rerun the same "
            f"`{self.command}` command to resume from it",
            self.signum,
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
    """DataLoader ``worker_init_fn``: leave SIGTERM and Ctrl-C to the training process (and seed
    the worker as Lightning's own ``worker_init_fn`` would, which a custom one replaces)."""
    from lightning.fabric.utilities.seed import pl_worker_init_function

    quiet_when_the_main_process_hangs_up(worker_id)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pl_worker_init_function(worker_id)
