"""Feature stores on object storage: a real S3-compatible server (moto) on loopback.

Extraction writes an ``s3://`` store (in process and as a real `cli.py` killed with -9 and
rerun), later stages find and read it (DataLoader workers included), `cache` commands list,
verify and repair it; every array equals the local store's bytes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from egoslots.cache.catalog import store_for_config
from egoslots.cache.location import filesystem
from egoslots.cache.reader import ClipDataset
from egoslots.cache.store import FeatureStore, StoreError
from egoslots.stages.cache import cache
from egoslots.stages.extract_features import extract
from tests.helpers.crashkit import REPO, KillPoint, extract_cli, kill_mid_run, run_to_end
from tests.helpers.data import extract_cfg, memory_source
from tests.helpers.runs import PIPELINE_TINY
from tests.helpers.stores import assert_same_store, snapshot

BUCKET = "egoslots-test"


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port; the environment fsspec/botocore read for it."""
    from moto import server as moto_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}",
    }
    yield env
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket; this process and its children talk to the loopback server."""
    import fsspec.config

    import tests.helpers.crashkit as crashkit

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(
        crashkit, "ENV", {**crashkit.ENV, **s3_server}
    )  # its children's environment
    monkeypatch.setitem(
        fsspec.config.conf, "s3", {"endpoint_url": s3_server["FSSPEC_S3_ENDPOINT_URL"]}
    )
    fs, _ = filesystem(f"s3://{BUCKET}")
    if fs.exists(BUCKET):
        fs.rm(BUCKET, recursive=True)
    fs.mkdir(BUCKET)
    fs.invalidate_cache()
    yield fs
    fs.invalidate_cache()


def test_extract_to_s3_equals_local_and_later_stages_read_it(s3, tmp_path):
    local = extract(extract_cfg(tmp_path / "local"), source=memory_source())
    cfg = extract_cfg(tmp_path / "work", f"store_dir=s3://{BUCKET}/stores")
    url = extract(cfg, source=memory_source())
    assert url == f"s3://{BUCKET}/stores/{local.stem}.zarr"
    assert not (tmp_path / "work" / "stores").exists()  # nothing written locally
    assert s3.exists(f"{BUCKET}/stores/{local.stem}.config.yaml")
    assert_same_store(url, local)

    store = store_for_config(cfg)  # found by its settings, in the remote stores folder
    assert store.path == url and store.complete
    again = extract(cfg, source=memory_source())  # a rerun on a complete remote store does nothing
    assert again == url

    # clips through DataLoader workers (forked: zarr and s3fs must cope) equal the local reads
    remote_clips, local_clips = ClipDataset(url, split=None), ClipDataset(local, split=None)
    loader = torch.utils.data.DataLoader(remote_clips, batch_size=3, num_workers=2)
    got = torch.cat([batch["features"] for batch in loader])
    want = torch.stack([local_clips[i]["features"] for i in range(len(local_clips))])
    assert got.shape == want.shape and torch.equal(got, want)


def test_cache_commands_on_s3_list_verify_repair_and_remove(s3, tmp_path):
    cfg = extract_cfg(tmp_path / "work", f"store_dir=s3://{BUCKET}/stores")
    url = extract(cfg, source=memory_source())
    fingerprint = url.rsplit("/", 1)[-1].removesuffix(".zarr")
    runner = CliRunner()
    listed = runner.invoke(cache, ["ls", "--store-dir", f"s3://{BUCKET}/stores"])
    assert listed.exit_code == 0 and fingerprint in listed.output and "complete" in listed.output, (
        listed.output
    )
    assert runner.invoke(cache, ["verify", url]).exit_code == 0

    # overwrite chunk 1 of features with garbage of the same size, and delete chunk 3 of frames
    store = FeatureStore.open(url)
    key = f"{BUCKET}/stores/{fingerprint}.zarr/{store.chunk_key('features', 1)}"
    s3.pipe_file(key, os.urandom(len(s3.cat_file(key))))
    s3.rm_file(f"{BUCKET}/stores/{fingerprint}.zarr/{store.chunk_key('frames', 3)}")
    original = snapshot(extract(extract_cfg(tmp_path / "local"), source=memory_source()))

    found = runner.invoke(
        cache, ["verify", fingerprint[:8], "--store-dir", f"s3://{BUCKET}/stores"]
    )
    assert found.exit_code != 0
    assert "chunk 1 of 'features'" in found.output and "unreadable" in found.output
    assert "chunk 3 of 'frames'" in found.output and "missing" in found.output
    repaired = runner.invoke(cache, ["verify", url, "--repair"])
    assert "chunk(s) 1, 3" in repaired.output, repaired.output
    with pytest.raises(StoreError, match="incomplete"):
        store_for_config(cfg)
    extract(cfg, source=memory_source())
    assert runner.invoke(cache, ["verify", url]).exit_code == 0
    after = snapshot(url)
    for name, values in original["arrays"].items():
        assert after["arrays"][name].tobytes() == values.tobytes(), name

    removed = runner.invoke(
        cache, ["rm", fingerprint, "--store-dir", f"s3://{BUCKET}/stores", "--yes"]
    )
    assert removed.exit_code == 0, removed.output
    s3.invalidate_cache()
    assert s3.find(f"{BUCKET}/stores") == []  # the store and its config.yaml


def test_unreachable_or_missing_remote_store_is_a_clear_error(s3, tmp_path):
    with pytest.raises(StoreError, match=f"no feature store at s3://{BUCKET}/nope.zarr"):
        FeatureStore.open(f"s3://{BUCKET}/nope.zarr")
    cfg = extract_cfg(tmp_path, "store_dir=s3://no-such-bucket-here/stores")
    with pytest.raises(StoreError, match="no feature store in s3://no-such-bucket-here/stores"):
        store_for_config(cfg)


@pytest.mark.slow  # like test_crash.py's kill -9 tests: `-m slow` (CI runs it)
@pytest.mark.parametrize("seed", [0, 1])
def test_s3_extraction_killed_with_9_resumes_to_the_same_bytes(s3, dataset, tmp_path, seed):  # noqa: F811
    """The real command writing to S3, SIGKILLed at a seeded random chunk, finishes on rerun and
    equals the local uninterrupted run byte for byte."""
    _, config, reference = dataset
    target = f"store_dir=s3://{BUCKET}/killed"
    flags = f"{BUCKET}/killed/{reference.stem}.zarr/done/c"

    def flags_written() -> int:
        s3.invalidate_cache()
        return len(s3.ls(flags)) if s3.exists(flags) else 0

    total = FeatureStore.open(reference).progress()[1]
    point = KillPoint.draw(seed, 2, total - 8, max_delay=0.05)
    killed = kill_mid_run(
        extract_cli(config, tmp_path, target), flags_written, point, tmp_path / "killed.log"
    )
    url = f"s3://{BUCKET}/killed/{reference.stem}.zarr"
    done, _ = FeatureStore.open(url, require_complete=False).progress()
    assert point.after <= killed.progress == done < total  # interrupted, finished chunks kept

    rerun = run_to_end(extract_cli(config, tmp_path, target))
    assert "store complete" in rerun
    assert_same_store(url, reference)
    assert np.asarray(FeatureStore.open(url).group["done"][:]).all()


@pytest.mark.slow  # the whole pipeline end to end: minutes on 2 cores
def test_whole_pipeline_runs_on_an_s3_store(s3, tmp_path):
    """`egoslots run` with store_dir on S3: every stage reads and writes the remote store (tokens
    included), and a second run finds every stage done."""
    import sys

    command = [
        sys.executable,
        "cli.py",
        "run",
        "configs/demo.yaml",
        f"work_dir={tmp_path}",
        f"store_dir=s3://{BUCKET}/stores",
        *PIPELINE_TINY,
    ]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (tmp_path / "stores").exists()
    (url,) = [f"s3://{p}" for p in s3.ls(f"{BUCKET}/stores") if p.endswith(".zarr")]
    store = FeatureStore.open(url)
    (dvae_hash,) = store.token_group_names()
    assert store.tokens(dvae_hash).shape[0] == store.num_frames  # complete, else tokens() raises
    assert (tmp_path / "runs" / "demo" / "metrics.json").is_file()
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "is complete" in second.stdout, second.stderr[-3000:]


def test_two_shards_writing_one_s3_store_equal_one_process(s3, dataset, tmp_path):  # noqa: F811
    """Shard 1 starts first and waits for shard 0 to create the remote store; together they
    write every chunk once and `cache verify` passes."""
    _, config, reference = dataset
    target = f"store_dir=s3://{BUCKET}/sharded"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for shard in (1, 0):
        procs.append(
            subprocess.Popen(
                extract_cli(
                    config, tmp_path, target, "--num-shards", "2", "--shard-id", str(shard)
                ),
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        time.sleep(1.0 if shard == 1 else 0)
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert sum("store complete" in out for out, _ in outputs) >= 1
    url = f"s3://{BUCKET}/sharded/{reference.stem}.zarr"
    assert_same_store(url, reference)
    assert CliRunner().invoke(cache, ["verify", url]).exit_code == 0


def test_file_urls_are_local_paths(tmp_path):
    """`store_dir=file:///...` is the local folder (fast local reads, fsync, flock apply)."""
    cfg = extract_cfg(tmp_path / "work", f"store_dir=file://{tmp_path}/elsewhere")
    path = extract(cfg, source=memory_source())
    assert path.parent == tmp_path / "elsewhere" and path.is_dir()
    store = store_for_config(cfg)
    assert store.path == path and store._fast_reader("features") is not None
    assert CliRunner().invoke(cache, ["verify", f"file://{path}"]).exit_code == 0


def test_remote_store_whose_creation_was_killed_is_recreated(s3, tmp_path):
    """A kill inside FeatureStore.create leaves arrays without the egoslots attrs (written last):
    the rerun recognises that and recreates the store; a foreign zarr group is never touched."""
    import zarr

    from egoslots.cache.store import ATTRS_KEY

    cfg = extract_cfg(tmp_path, f"store_dir=s3://{BUCKET}/stores")
    url = extract(cfg, source=memory_source())
    reference = snapshot(url)
    group = zarr.open_group(url, mode="r+", zarr_format=3)
    del group.attrs[
        ATTRS_KEY
    ]  # what a kill between creating the arrays and writing the attrs leaves
    assert FeatureStore.unfinished_creation(url)
    assert extract(cfg, source=memory_source()) == url
    after = snapshot(url)
    for name, values in reference["arrays"].items():
        assert after["arrays"][name].tobytes() == values.tobytes(), name

    foreign = zarr.open_group(f"s3://{BUCKET}/stores/other.zarr", mode="w", zarr_format=3)
    foreign.create_array("images", shape=(2,), dtype="uint8")
    assert not FeatureStore.unfinished_creation(f"s3://{BUCKET}/stores/other.zarr")
    with pytest.raises(StoreError, match="not an egoslots feature store"):
        extract(
            extract_cfg(tmp_path, f"store=s3://{BUCKET}/stores/other.zarr"), source=memory_source()
        )
