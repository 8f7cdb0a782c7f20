"""`egoslots run`: the whole pipeline end to end on a tiny synthetic config.

Checks that every stage's output is written, that a second run does no work, and that a run
killed inside a stage resumes that stage instead of starting over.
"""

import json
import os
import shutil
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


def test_moved_or_copied_work_dir_goes_on_without_recomputing(finished_run):
    """Issue 26: run files name their store and dVAE relative to the run directory, and a run
    looks for its store in its own work directory first. A moved work directory resumes with
    no work redone; a copy reads and writes its own store, never the original's."""
    from egoslots.stages.machinery.inference import load_trained
    from egoslots.stages.tokenize import _store_of_run

    work, _ = finished_run
    inputs = json.loads((work / "runs" / "demo" / "inputs.json").read_text())
    assert not Path(inputs["store"]).is_absolute() and not Path(inputs["dvae_run"]).is_absolute()
    assert not Path(
        json.loads((work / "runs" / "dvae" / "dvae.json").read_text())["store_path"]
    ).is_absolute()

    moved = work.parent / "moved-work"
    os.rename(work, moved)
    try:
        before = snapshot(moved)
        again = run_cli(moved)
        after = snapshot(moved)
        assert "Traceback" not in again.stderr
        assert [k for k in before if after.get(k) != before[k]] == []
    finally:
        os.rename(moved, work)

    copy = work.parent / "copied-work"
    shutil.copytree(work, copy, symlinks=True)
    original = snapshot(work)
    run = copy / "runs" / "demo"
    _, _, store, _ = load_trained(run)
    assert Path(str(store.path)).resolve().is_relative_to(copy.resolve())
    dvae_run = copy / "runs" / "dvae"
    info = json.loads((dvae_run / "dvae.json").read_text())
    assert Path(str(_store_of_run(dvae_run, info))).resolve().is_relative_to(copy.resolve())
    run_cli(copy)
    assert snapshot(work) == original  # the original work directory was not touched


def test_touched_frame_keeps_the_store_and_changed_data_has_ways_forward(finished_run):
    """Issue 14's dead end: `touch` one frame (or copy without -p), rerun `run`: nothing is
    redone. Data that really changed gives a new store; stage 2 then names `--overwrite`, and
    `run store=OLD` finishes on the old store with no work (`run --overwrite`: the next test)."""
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


@pytest.mark.slow  # retrains the dVAE and the slot model
def test_run_overwrite_redoes_what_changed_data_invalidates(finished_run):
    """The other way forward from changed data: `run --overwrite` extracts the new store and
    redoes the dVAE and slot runs on it (they belong to the old store)."""
    work, _ = finished_run
    frame = sorted((work / "data" / "synthetic").glob("*/*.png"))[0]
    with open(frame, "ab") as f:  # a changed size: the data really changed
        f.write(b"\0" * 16)
    redo = run_cli(work, "--overwrite")
    new_store = max(work.glob("stores/*.zarr"), key=lambda p: p.stat().st_mtime_ns)
    assert "Traceback" not in redo.stderr
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


def test_readme_python_snippet_runs_on_a_finished_run(finished_run):
    """README's "Using a trained model from Python" block, as written, on a finished run."""
    work, _ = finished_run
    readme = (REPO / "README.md").read_text()
    start = readme.index("```python\n", readme.index("## Using a trained model from Python"))
    code = readme[start + len("```python\n") : readme.index("```", start + 10)]
    run_dir = work / "runs" / "demo"
    split = json.loads((run_dir / "metrics.json").read_text())["split"]
    code = code.replace('"egoslots-work/demo/runs/demo"', repr(str(run_dir)))
    code = code.replace('"val"', repr(split))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    slots, masks = scope["slots"], scope["masks"]
    assert slots.shape[:2] == masks.shape[:2] == (2, 4) and masks.shape[2] == slots.shape[2]
