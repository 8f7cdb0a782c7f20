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


def test_touched_frame_keeps_the_store_and_changed_data_has_ways_forward(finished_run):
    """Issue 14's dead end: `touch` one frame (or copy without -p), rerun `run`: nothing is
    redone. Data that really changed gives a new store; stage 2 then names `--overwrite`, and
    `run store=OLD` finishes on the old store with no work; `run --overwrite` redoes the dVAE
    and slot runs on the new store."""
    work, _ = finished_run
    frames = sorted((work / "data" / "synthetic").glob("*/*.png"))
    old_store = only_store_path(work)
    os.utime(frames[0], ns=(1, 1))  # a new mtime, same bytes
    before = snapshot(work)
    run_cli(work)
    after = snapshot(work)
    assert [k for k in before if after.get(k) != before[k]] == []
    assert only_store_path(work) == old_store  # no second store

    with open(frames[0], "ab") as f:  # a changed size: the data really changed
        f.write(b"\0" * 16)
    changed = run_cli(work, check=False)
    assert changed.returncode == 1 and "Traceback" not in changed.stderr
    assert "--overwrite" in changed.stderr and "store" in changed.stderr, changed.stderr
    before = snapshot(work / "runs")
    pinned = run_cli(work, f"store={old_store.stem}")
    assert "using the complete store" in pinned.stdout
    assert [k for k in before if snapshot(work / "runs").get(k) != before[k]] == []

    redo = run_cli(work, "--overwrite")  # the other way forward: redo what the new data changes
    new_store = max(work.glob("stores/*.zarr"), key=lambda p: p.stat().st_mtime_ns)
    assert new_store != old_store and "Traceback" not in redo.stderr
    dvae = json.loads((work / "runs" / "dvae" / "dvae.json").read_text())
    inputs = json.loads((work / "runs" / "demo" / "inputs.json").read_text())
    assert dvae["store"] == inputs["store_fingerprint"] == new_store.stem


def only_store_path(work: Path) -> Path:
    """The store `run` made first (the oldest .zarr in stores/)."""
    stores = sorted((work / "stores").glob("*.zarr"), key=lambda p: p.stat().st_mtime_ns)
    return stores[0]


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
