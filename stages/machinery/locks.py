"""One writer per run directory: a lock file holding the writer's pid, host and command.

``pretrain-dvae`` (with its tokenization), ``tokenize`` and ``train-slots`` hold the lock of the
run directory they write (``<run>/.egoslots-lock``) while they work; a second command on the
same run directory, and ``train-slots`` about to read the tokens of a dVAE that is still being
trained there, stop with one line naming the holder instead of silently reading the old dVAE.

A lock whose process is gone (killed, the machine rebooted) is stale: the next command takes it
over and says so in the log. A lock held on another host (a shared disk) cannot be checked
from here: the message names the host and the file to delete if that job is gone. Under DDP
only rank 0 takes the lock (:func:`egoslots.stages.machinery.training.is_rank_zero`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from egoslots.cache.location import process_running
from egoslots.stages.machinery.common import StageError
from egoslots.stages.machinery.rundirs import LOCK_NAME, remove_run_dir

log = logging.getLogger("egoslots")


def _holder(path: Path) -> dict | None:
    """The lock's content, or None when there is no lock (a damaged one counts as stale)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": -1, "host": socket.gethostname(), "command": "unknown (damaged lock)"}


def _alive(holder: dict) -> bool:
    """Whether the holder still runs; a holder on another host is taken to be alive."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", -1))
    return pid > 0 and process_running(pid)


def _busy_message(path: Path, holder: dict, what: str) -> str:
    started = holder.get("started", "?")
    where = (
        f"pid {holder.get('pid')}"
        if holder.get("host") == socket.gethostname()
        else f"pid {holder.get('pid')} on host {holder.get('host')}"
    )
    return (
        f"{path.parent} is in use by `{holder.get('command')}` ({where}, since {started}): "
        f"{what}; wait for it to finish (or stop it), then rerun. If no such process runs any "
        f"more, delete {path}"
    )


def check_unlocked(run_dir: Path, what: str) -> None:
    """Refuse to read ``run_dir`` while another process writes it (``what``: why that matters)."""
    path = Path(run_dir) / LOCK_NAME
    holder = _holder(path)
    if holder is not None and int(holder.get("pid", -1)) != os.getpid() and _alive(holder):
        raise StageError(_busy_message(path, holder, what))


def make_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` (and its parents); a file in its place, or above it, is one
    StageError naming it (before: a FileExistsError traceback from mkdir)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        place = next(
            (p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), run_dir
        )
        raise StageError(
            f"{place} is a file, not a folder: egoslots keeps each run in a folder "
            f"<work_dir>/runs/<run_name>; choose another run_name (or work_dir), or move the file away"
        ) from err


@contextmanager
def run_lock(run_dir: Path, command: str) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block (re-entrant within one process); a live holder is
    one StageError, a stale lock is taken over with a warning."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    holder = _holder(path)
    if holder is not None and int(holder.get("pid", -1)) == os.getpid():
        yield  # this process holds it already (pretrain-dvae calling tokenize)
        return
    created = not run_dir.exists()
    make_run_dir(run_dir)
    mine = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None:
                continue  # released just now: try again
            if _alive(holder):
                raise StageError(
                    _busy_message(path, holder, "two commands must not write one run at once")
                ) from None
            log.warning(
                "taking over the stale lock %s of `%s` (pid %s is no longer running)",
                path,
                holder.get("command"),
                holder.get("pid"),
            )
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        break
    try:
        yield
    finally:
        if (_holder(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()  # refused before writing anything: leave no empty run directory


@contextmanager
def writing_run(run_dir: Path, command: str, overwrite: bool, rank_zero: bool) -> Iterator[None]:
    """A training stage's hold on its run directory: with ``overwrite``, first delete it (only
    when no one writes it, and only what egoslots wrote: ``rundirs.remove_run_dir``), then hold
    its lock for the block. DDP ranks other than 0 neither delete nor lock."""
    if not rank_zero:
        yield
        return
    if overwrite:
        check_unlocked(run_dir, "it cannot be deleted while it trains")
        remove_run_dir(run_dir)
    with run_lock(run_dir, command):
        yield
