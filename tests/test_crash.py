"""kill -9 every stage at seeded random points, rerun, and compare with an uninterrupted run.

Each test starts the real `cli.py` command in a subprocess, SIGKILLs its process group at a
point drawn from ``random.Random(seed)`` (tests/crashkit.py), checks the kill really landed
mid-run, reruns the same command to the end and compares the result with one uninterrupted run
of the same command:

- extract-features: the store is byte-identical (array data, done flags, video table), and the
  chunks finished before the kill were not written again;
- tokenize: the token ids are byte-identical;
- pretrain-dvae and train-slots: the rerun resumes at the newest readable checkpoint's step,
  and from there every checkpoint (weights, optimizer state, step, lr schedule) and the final
  weights are bit-identical to the uninterrupted run's (CPU, fp32, fixed seed).

The seeded kills are `slow` (CI runs them after the default set); one seed of the cheapest
test runs by default.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.store import FeatureStore
from tests.crashkit import KillPoint, cli, count_done_flags, count_files, kill_mid_run, run_to_end
from tests.test_extract import write_config as write_extract_config
from tests.test_extract import write_frame_folder
from tests.test_store import assert_same_store

SEEDS = [0, 1, 2]
SLOW_SEEDS = [pytest.param(seed, marks=pytest.mark.slow) for seed in SEEDS]


def only_store(work_dir: Path) -> Path:
    stores = list((work_dir / "stores").glob("*.zarr"))
    assert len(stores) == 1, stores
    return stores[0]


def file_times(root: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.glob(pattern)}


# --------------------------------------------------------------------------------------------
# Stage 1: extract-features
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def extraction(tmp_path_factory):
    """Frame folder + config (vit-tiny-test on 64 px) and one uninterrupted run's store.

    240x320 PNGs decode slowly enough (~25 ms per 8-frame chunk on a busy 2-core machine) for
    the kill to land between any two chunk flags.
    """
    root = tmp_path_factory.mktemp("extract")
    data = write_frame_folder(root / "frames", videos=4, frames=24, size=(240, 320), seed=1)
    config = write_extract_config(root, data)
    overrides = ["globals.BACKBONE=vit-tiny-test"]
    run_to_end(cli("extract-features", config, f"work_dir={root / 'reference'}", *overrides))
    return config, overrides, only_store(root / "reference")


@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_extract_killed_at_random_chunk_then_rerun_is_byte_identical(extraction, tmp_path, seed):
    config, overrides, reference = extraction
    total = FeatureStore.open(reference).progress()[1]
    work = tmp_path / "work"
    command = cli("extract-features", config, f"work_dir={work}", *overrides)
    # after 1 .. total-6 chunk flags, then up to one chunk's time more
    point = KillPoint.draw(seed, 1, total - 6, max_delay=0.03)
    killed = kill_mid_run(command, count_done_flags(work, "stores/*.zarr/done/c/*"), point, tmp_path / "killed.log")

    store = only_store(work)
    done, chunks = FeatureStore.open(store, require_complete=False).progress()
    assert point.after <= done < chunks == total, (point, done)  # really interrupted, finished chunks kept
    assert not FeatureStore.open(store, require_complete=False).complete
    kept = file_times(store, "done/c/*") | file_times(store, "features/c/*/0/0")

    rerun = run_to_end(command, tmp_path / "rerun.log")
    assert "store complete" in rerun
    assert_same_store(store, reference)
    after = file_times(store, "done/c/*") | file_times(store, "features/c/*/0/0")
    flagged = {k for k in kept if k.startswith("done/")}
    assert len(flagged) == killed.progress
    redone = [k for k in kept if after[k] != kept[k] and (k in flagged or f"done/c/{k.split('/')[2]}" in flagged)]
    assert not redone, f"the rerun wrote chunks that were already done: {redone[:5]}"
