"""scripts/slurm_extract.sbatch: shard identity from SLURM's variables, shards run one after another.

The script runs as SLURM would run each task (SLURM_PROCID / SLURM_NTASKS set, no srun here: SRUN="")
on a tiny frame-folder dataset; after both tasks the store is complete and byte-equal to the store of
one plain process.
"""

from __future__ import annotations

import os
import subprocess
import sys

from egoslots.cache.store import FeatureStore
from tests.helpers.crashkit import REPO, extract_cli, run_to_end
from tests.helpers.data import write_extract_config, write_frame_folder
from tests.helpers.stores import assert_same_store, only_store

SCRIPT = REPO / "scripts" / "slurm_extract.sbatch"


def run_task(config, work, procid: int, ntasks: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(
        OMP_NUM_THREADS="1",
        SLURM_PROCID=str(procid),
        SLURM_NTASKS=str(ntasks),
        SLURM_CPUS_PER_TASK="0",
        RANK="5",
        WORLD_SIZE="9",  # stray torchrun variables: the script must drop them
        SRUN="",
        EGOSLOTS=f"{sys.executable} cli.py",
    )
    result = subprocess.run(
        ["bash", str(SCRIPT), str(config), f"work_dir={work}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_slurm_tasks_in_sequence_build_the_one_process_store(tmp_path):
    data = write_frame_folder(tmp_path / "frames", videos=3, frames=12, size=(40, 48))
    config = write_extract_config(tmp_path, data)
    run_to_end(extract_cli(config, tmp_path / "single"))
    reference = only_store(tmp_path / "single")

    work = tmp_path / "slurm"
    first = run_task(config, work, 0, 2)
    assert "shard 0/2" in first.stdout + first.stderr
    store = FeatureStore.open(only_store(work), require_complete=False)
    assert not store.complete  # shard 1's chunks are still missing
    assert store.pending_chunks(1, 2) and not store.pending_chunks(0, 2)

    second = run_task(config, work, 1, 2)
    assert "shard 1/2" in second.stderr and "store complete" in second.stdout
    assert FeatureStore.open(only_store(work)).complete
    assert_same_store(only_store(work), reference)
