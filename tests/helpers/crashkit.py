"""A small harness for crash tests: run the real `cli.py`, kill -9 it at a seeded random point.

A kill point is "once `progress()` has reached k, plus a short extra delay", with k and the
delay drawn from ``random.Random(seed)``: k counts things the command writes as it goes (chunk
done flags, checkpoint files), so the kill lands inside the run whatever the machine's speed,
and the extra delay moves it off the moment a flag appears (into the next chunk's writes or the
next checkpoint's save). The process runs in its own session and its whole process group is
killed, DataLoader workers included, exactly what `kill -9` of a job does.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# One thread per process: steady timings on a shared 2-core machine, and the same float results
# in every process (a reduction split over threads may round differently).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def cli(command: str, *args: object) -> list[str]:
    """`python cli.py COMMAND ARGS...` (never the installed `egoslots` script: it may be another checkout)."""
    return [sys.executable, "cli.py", command, *map(str, args)]


def extract_cli(config: Path, work_dir: Path, *flags: str) -> list[str]:
    """`python cli.py extract-features CONFIG work_dir=WORK_DIR FLAGS...`."""
    return cli("extract-features", config, f"work_dir={work_dir}", *flags)


def run_to_end(args: Sequence[str], log: Path | None = None, timeout: float = 300) -> str:
    """Run a command to completion; fail the test with its last output if it fails. Returns stdout+stderr."""
    result = subprocess.run(
        list(args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    if log is not None:
        log.write_text(output)
    assert result.returncode == 0, f"{' '.join(args[2:4])} failed:\n{output[-3000:]}"
    return output


@dataclass
class KillPoint:
    """Where a seeded kill lands: once ``progress() >= after``, then ``delay`` seconds more."""

    after: int
    delay: float

    @classmethod
    def draw(cls, seed: int, low: int, high: int, max_delay: float) -> KillPoint:
        rng = random.Random(seed)
        return cls(rng.randint(low, high), rng.uniform(0.0, max_delay))


@dataclass
class Killed:
    point: KillPoint
    progress: int  # progress() right after the process died
    output: str  # what it printed before it died


def kill_mid_run(
    args: Sequence[str],
    progress: Callable[[], int],
    point: KillPoint,
    log: Path,
    timeout: float = 240,
    poll: float = 0.002,
) -> Killed:
    """Start ``args`` and SIGKILL its process group at ``point``; assert the kill, not an exit, ended it.

    ``progress`` is polled every ``poll`` seconds. Output goes to ``log`` (kept for debugging
    and returned). Fails if the command exits on its own before the kill point or the timeout.
    """
    deadline = time.monotonic() + timeout
    with open(log, "w") as out:
        proc = subprocess.Popen(
            list(args),
            cwd=REPO,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            reached = False
            while proc.poll() is None and time.monotonic() < deadline:
                reached = progress() >= point.after
                if reached:
                    break
                time.sleep(poll)
            if reached:
                time.sleep(point.delay)
            alive = proc.poll() is None
            if reached and alive:
                os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:  # timeout or an error in progress(): never leave it running
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert reached, (
        f"progress never reached {point.after} in {timeout} s (at {progress()}):\n{output[-2000:]}"
    )
    assert alive and proc.returncode == -signal.SIGKILL, (
        f"the command ended (exit {proc.returncode}) before the kill point {point} "
        f"(progress {progress()}):\n{output[-2000:]}"
    )
    done = progress()
    print(
        f"{args[2]}: killed with progress {done} at {point}"
    )  # shown with the output of a failing test
    return Killed(point, done, output)


def count_files(root: Path, pattern: str) -> Callable[[], int]:
    """A progress function: how many files under ``root`` match the glob ``pattern`` (checkpoints)."""
    return lambda: sum(1 for _ in root.glob(pattern))


def count_done_flags(root: Path, pattern: str) -> Callable[[], int]:
    """A progress function: set chunk done flags (1-byte files, not 0) under ``root`` matching ``pattern``.

    A store's ``done/c/<chunk>`` files (and ``tokens/<hash>/done/c/<chunk>``) appear when a
    chunk is flagged; reading the byte also ignores a flag file written as 0.
    """

    def flags() -> int:
        total = 0
        for path in root.glob(pattern):
            try:
                total += path.read_bytes() not in (b"", b"\x00")
            except OSError:  # removed or being replaced right now
                pass
        return total

    return flags
