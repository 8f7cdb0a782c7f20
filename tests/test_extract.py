"""extract-features as users run it: real `cli.py` processes on a frame folder.

kill -9 in the middle and a rerun give the same bytes as one uninterrupted run; two shard
processes running at once give the same bytes as one process; shard identity comes from the
flags, torchrun or SLURM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from egoslots.cache.store import FeatureStore
from egoslots.pipeline.config import ConfigError
from egoslots.stages.extract_features import shard_identity
from tests.helpers.crashkit import REPO, extract_cli, run_to_end
from tests.helpers.data import write_extract_config, write_frame_folder
from tests.helpers.stores import assert_same_store, only_store


def test_uninterrupted_store_is_complete_and_verifies(dataset):
    from click.testing import CliRunner

    from egoslots.stages.cache import cache

    _, _, store = dataset
    st = FeatureStore.open(store)
    assert st.num_frames == 6 * 20 * 2 and len(st.videos) == 12 and st.has_masks
    assert [v.hflip for v in st.videos[:2]] == [False, True]
    assert CliRunner().invoke(cache, ["verify", str(store)]).exit_code == 0
    assert store.with_name(store.stem + ".config.yaml").is_file()


@pytest.mark.slow  # three CLI runs on 640 frames of 240x320 PNG: ~30 s on 2 busy cores
def test_kill_9_then_rerun_gives_the_same_bytes(dataset, tmp_path):
    data, _, reference = dataset
    # a bigger copy of the data so that the kill lands mid-run: 240 px frames decode slowly enough
    big = write_frame_folder(tmp_path / "big", videos=8, frames=40, size=(240, 320), seed=1)
    config = write_extract_config(tmp_path, big)
    full = tmp_path / "full"
    run_to_end(extract_cli(config, full))
    work = tmp_path / "killed"
    proc = subprocess.Popen(
        extract_cli(config, work),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    done_at_kill, deadline = 0, time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            flags = list(work.glob("stores/*.zarr/done/c/*"))
            if len(flags) >= 3:
                os.kill(proc.pid, signal.SIGKILL)
                done_at_kill = len(flags)
                break
            time.sleep(0.01)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the extraction ended before it could be killed"
    killed = only_store(work)
    done, total = FeatureStore.open(killed, require_complete=False).progress()
    assert 3 <= done_at_kill <= done < total  # really interrupted, finished chunks kept
    rerun = run_to_end(extract_cli(config, work))
    assert "store complete" in rerun
    assert_same_store(killed, only_store(full))


def test_two_shard_processes_equal_one_process(dataset, tmp_path):
    _, config, reference = dataset
    work = tmp_path / "sharded"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            extract_cli(config, work, "--num-shards", "2", "--shard-id", str(i)),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert (
        sum("store complete" in out for out, _ in outputs) >= 1
    )  # the last shard to finish completes it
    assert_same_store(only_store(work), reference)


def test_torchrun_two_processes_write_one_store(dataset, tmp_path):
    """`torchrun --no-python --nproc-per-node 2 egoslots extract-features ...`: each rank takes its
    shard from RANK/WORLD_SIZE; the store equals one process's and `cache verify` passes."""
    from click.testing import CliRunner

    from egoslots.stages.cache import cache

    _, config, reference = dataset
    work = tmp_path / "torchrun"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--no-python",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        *extract_cli(config, work),
    ]
    result = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "shard 0/2" in result.stderr and "shard 1/2" in result.stderr  # really two shards
    store = only_store(work)
    assert_same_store(store, reference)
    assert CliRunner().invoke(cache, ["verify", str(store)]).exit_code == 0


def test_shard_identity_from_flags_torchrun_or_slurm(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert shard_identity() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert shard_identity() == (3, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert shard_identity() == (1, 2)  # torchrun before SLURM
    assert shard_identity(num_shards=5, shard_id=4) == (4, 5)  # flags before both
    with pytest.raises(ConfigError, match="--shard-id 2"):
        shard_identity(num_shards=2, shard_id=2)


def test_corrupt_frame_file_is_named_and_skip_bad_finishes(tmp_path):
    from egoslots.pipeline.config import load_config
    from egoslots.pipeline.data.base import SourceError
    from egoslots.stages.extract_features import extract

    data = write_frame_folder(tmp_path / "frames", videos=3, frames=12, size=(32, 40))
    bad = data / "clip01" / "0005.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG: header fine, pixels missing
    cfg = load_config(write_extract_config(tmp_path, data), [f"work_dir={tmp_path / 'w'}"])
    with pytest.raises(SourceError, match=r"clip01.*0005\.png"):
        extract(cfg)
    kept = FeatureStore.open(only_store(tmp_path / "w"), require_complete=False).done_chunks()
    assert kept[:3].all() and not kept.all()  # clip00's chunks (and its flips') were kept
    extract(cfg, skip_bad=True)
    store = FeatureStore.open(only_store(tmp_path / "w"))
    assert sorted({v.id for v in store.videos}) == ["clip00", "clip02"]
    assert {r["id"] for r in store.meta["skipped_videos"]} == {"clip01"}
