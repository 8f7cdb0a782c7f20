"""`egoslots run`: the whole pipeline end to end on a tiny synthetic config.

Checks that every stage's output is written, that a second run does no work, and that a run
killed inside a stage resumes that stage instead of starting over.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.runs import PIPELINE_TINY, run_cli

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, int]:
    """mtime of every file under root: what a run that does no work must leave untouched."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    first = run_cli(work)
    return work, first


def test_run_writes_every_stage_output(finished_run):
    work, first = finished_run
    run_dir = work / "runs" / "demo"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / "metrics.md").read_text().strip()
    assert any(p.suffix == ".png" for p in (run_dir / "viz").iterdir())
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (work / "runs" / "dvae" / "dvae.json").is_file()
    assert len(list((work / "stores").glob("*.zarr"))) == 1
    assert metrics  # the table the command printed comes from this file
    assert "Slot masks over a test video" in first.stdout
    assert "k-means" in first.stdout and "grid" in first.stdout


def test_second_run_does_no_work(finished_run):
    work, _ = finished_run
    before = snapshot(work)
    run_cli(work)
    after = snapshot(work)
    changed = sorted(k for k in before if after.get(k) != before[k])
    added = sorted(set(after) - set(before))
    assert not changed, f"a finished pipeline rewrote {changed[:5]}"
    assert not [
        a for a in added if not a.startswith("runs/demo/tb") and "lightning_logs" not in a
    ], added


def test_run_killed_inside_a_stage_resumes_it(tmp_path):
    """kill -9 during train-slots, rerun: the store and dVAE are reused, training resumes."""
    work = tmp_path / "w"
    cmd = [
        sys.executable,
        "cli.py",
        "run",
        "configs/demo.yaml",
        f"work_dir={work}",
        *PIPELINE_TINY,
        "trainer.max_steps=40",
        "trainer.ckpt_every=4",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpt_dir = work / "runs" / "demo" / "checkpoints"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not (ckpt_dir / "step=4.ckpt").exists():
            assert proc.poll() is None, "run ended before it could be interrupted"
            time.sleep(0.2)
        assert (ckpt_dir / "step=4.ckpt").exists(), "training never reached its first checkpoint"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    store_files = snapshot(work / "stores")
    dvae_files = snapshot(work / "runs" / "dvae")

    second = run_cli(work, "trainer.max_steps=40", "trainer.ckpt_every=4")
    assert snapshot(work / "stores").keys() >= store_files.keys()
    assert {
        k: v for k, v in snapshot(work / "runs" / "dvae").items() if k in dvae_files
    } == dvae_files
    assert (ckpt_dir / "step=40.ckpt").exists()
    assert "resum" in (second.stdout + second.stderr).lower()
