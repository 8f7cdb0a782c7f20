"""SIGTERM (preemption, scancel, kill) stops training cleanly: the step in flight finishes, its
checkpoint is written, the command exits 143 naming it, and the rerun resumes from that step.

The signal goes to the whole process group, as a job scheduler sends it, so DataLoader workers
get it too (they must leave it to the training process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers.runs import make_dvae_run, slot_cfg_args
from tests.helpers.stores import frames_store, slot_store

REPO = Path(__file__).resolve().parents[1]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "cli.py", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def sigterm_after(
    proc: subprocess.Popen,
    marker: Path,
    delay: float,
    timeout: float = 240,
    sig: int = signal.SIGTERM,
) -> tuple[str, str]:
    """Wait for ``marker`` to exist, then ``delay`` s more, then signal the process group (as a
    scheduler's SIGTERM, or a terminal's Ctrl-C, reaches every process of the job)."""
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    assert proc.poll() is None, (
        "the run ended before it could be stopped: " + proc.stderr.read()[-2000:]
    )
    os.killpg(proc.pid, sig)
    return proc.communicate(timeout=120)


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def test_sigterm_saves_the_current_step_and_the_rerun_resumes_there(tmp_path):
    slot_store(tmp_path)
    make_dvae_run(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("globals:\n  NUM_SLOTS: 3\n")
    args = [
        "train-slots",
        str(config),
        *slot_cfg_args(tmp_path),
        "dataset.num_workers=1",
        "trainer.max_steps=300",
        "trainer.ckpt_every=20",
        "trainer.log_every=10",
    ]
    ckpts = tmp_path / "runs" / "t" / "checkpoints"
    proc = start(args)
    _, err = sigterm_after(proc, ckpts / "step=20.ckpt", delay=0.7)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err, err[-3000:]
    step = step_of(ckpts / "last.ckpt")
    assert 20 < step < 300 and (ckpts / f"step={step}.ckpt").is_file()
    assert f"after step {step}" in err

    rerun = start(args)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert f"(step {step})" in err  # "resuming ... from ... (step N)"
    assert step_of(ckpts / "last.ckpt") == 300


def dvae_config(tmp_path: Path) -> Path:
    """A store and a 300-step pretrain-dvae config (checkpoints every 20 steps, one worker)."""
    frames_store(tmp_path / "store.zarr", frames_per_video=16)
    config = tmp_path / "dvae.yaml"
    config.write_text(
        f"work_dir: {tmp_path}\nstore: {tmp_path / 'store.zarr'}\n"
        "dvae: {vocab_size: 32, hidden: 16, batch_size: 8, num_workers: 1, max_steps: 300, ckpt_every: 20,\n"
        "       log_every: 10, image_every: 1000, tau_steps: 300, accelerator: cpu}\n"
    )
    return config


def test_sigterm_stops_pretrain_dvae_with_a_checkpoint_of_that_step(tmp_path):

    config = dvae_config(tmp_path)
    ckpts = tmp_path / "runs" / "dvae" / "checkpoints"
    proc = start(["pretrain-dvae", str(config)])
    _, err = sigterm_after(proc, ckpts / "step=20.ckpt", delay=0.7)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err, err[-3000:]
    step = step_of(ckpts / "last.ckpt")
    assert 20 < step < 300 and (ckpts / f"step={step}.ckpt").is_file()
    assert not (tmp_path / "runs" / "dvae" / "dvae.json").exists()  # not exported: not finished


def test_ctrl_c_stops_pretrain_dvae_with_a_checkpoint_and_a_hint_exit_130(tmp_path):
    """Ctrl-C (SIGINT to the process group, workers included) is a clean stop too: the step in
    flight is saved, the message says how to resume, exit status 130."""
    config = dvae_config(tmp_path)
    ckpts = tmp_path / "runs" / "dvae" / "checkpoints"
    proc = start(["pretrain-dvae", str(config)])
    _, err = sigterm_after(proc, ckpts / "step=20.ckpt", delay=0.7, sig=signal.SIGINT)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped by Ctrl-C after step" in err and "Traceback" not in err, err[-3000:]
    assert "rerun the same `egoslots pretrain-dvae` command to resume" in err
    step = step_of(ckpts / "last.ckpt")
    assert 20 < step < 300 and (ckpts / f"step={step}.ckpt").is_file()
    assert f"after step {step}" in err
