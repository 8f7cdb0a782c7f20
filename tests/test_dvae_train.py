"""Stage 2 (pretrain-dvae, tokenize): run directories, resume, NaN stop, tokens, bad input."""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import egoslots.stages.pretrain_dvae as stage
from egoslots.cache.reader import ClipDataset
from egoslots.cache.store import FeatureStore, StoreError
from egoslots.pipeline.config import ConfigError
from egoslots.pipeline.dvae import load_dvae
from egoslots.stages.machinery import dvae_task
from egoslots.stages.machinery.common import TrainingDiverged
from egoslots.stages.machinery.datamodules import FrameDataset, training_rows
from egoslots.stages.machinery.rundirs import find_resume_checkpoint
from egoslots.stages.tokenize import sha256_16, tokenize_run
from tests.helpers.runs import copy_dvae_run, dvae_cfg
from tests.helpers.stores import frames_store


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared, oversubscribed CPU two threads run these tiny convs ~5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def checkpoint_steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))


# --------------------------------------------------------------------------------------------
def test_run_directory_and_tokens(trained_dvae, tmp_path):
    store_path, run_dir = copy_dvae_run(trained_dvae[0], tmp_path / "w")
    for name in ("config.yaml", "inputs.json", "dvae.pt", "dvae.json", "tb"):
        assert (run_dir / name).exists(), name
    assert checkpoint_steps(run_dir) == ["last.ckpt", "step=3.ckpt", "step=6.ckpt"]
    info = json.loads((run_dir / "dvae.json").read_text())
    assert info["hash"] == sha256_16(run_dir / "dvae.pt") and len(info["hash"]) == 16
    assert info["store"] == "fp-test" and info["vocab_size"] == 32 and info["token_grid"] == [8, 8]
    assert json.loads((run_dir / "inputs.json").read_text())["store_fingerprint"] == "fp-test"

    assert tokenize_run(run_dir) == info["hash"]
    store = FeatureStore.open(store_path)
    ids = store.tokens(info["hash"])
    assert ids.shape == (store.num_frames, 8, 8) and ids.dtype == np.uint16
    # every row (all splits, flipped rows too) holds the argmax ids of its frame
    model = load_dvae(run_dir)
    frames = torch.from_numpy(store.frames[:]).permute(0, 3, 1, 2).float() / 255
    assert np.array_equal(ids[:], model.encode_ids(frames).numpy())
    assert {v.split for v in store.videos} == {"train", "val", "test"} and any(
        v.hflip for v in store.videos
    )
    # stage 3's reader takes these tokens
    clip = ClipDataset(store, split="val", clip_length=2, fields=("tokens",), tokens=info["hash"])[
        0
    ]
    assert clip["tokens"].shape == (2, 8, 8)


def test_finished_run_returns_at_once(trained_dvae, tmp_path, monkeypatch):
    store_path, run_dir = copy_dvae_run(trained_dvae[0], tmp_path / "w")
    before = (run_dir / "dvae.pt").stat().st_mtime_ns
    monkeypatch.setattr(
        stage, "_train", lambda *a, **k: pytest.fail("a finished run must not train again")
    )
    cfg = dvae_cfg(tmp_path / "w", store_path, "dvae.max_steps=6", "dvae.ckpt_every=3")
    assert stage.pretrain(cfg) == run_dir  # tokenizes, does not train
    assert (run_dir / "dvae.pt").stat().st_mtime_ns == before
    info = json.loads((run_dir / "dvae.json").read_text())
    FeatureStore.open(store_path).tokens(info["hash"])  # complete


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    frames_store(tmp_path / "store.zarr")
    cfg = dvae_cfg(tmp_path, tmp_path / "store.zarr", "dvae.max_steps=20", "dvae.ckpt_every=3")
    real = dvae_task.reconstruction_loss
    calls = {"n": 0}

    def poisoned(recon, frames):  # the 8th step sees a NaN reconstruction
        calls["n"] += 1
        if calls["n"] == 8:
            recon = recon * float("nan")
        return real(recon, frames)

    monkeypatch.setattr(dvae_task, "reconstruction_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="at step 8"):
        stage.pretrain(cfg)
    run_dir = tmp_path / "runs" / "dvae"
    assert checkpoint_steps(run_dir) == ["last.ckpt", "step=3.ckpt", "step=6.ckpt"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6
    assert all(
        torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point()
    )
    assert not (run_dir / "dvae.pt").exists()


def test_tokenize_resumes_after_failure_and_matches_one_shot(trained_dvae, tmp_path, monkeypatch):
    store_path, run_dir = copy_dvae_run(trained_dvae[0], tmp_path / "a")
    ref_store_path, ref_run_dir = copy_dvae_run(trained_dvae[0], tmp_path / "b")
    dvae_hash = tokenize_run(ref_run_dir)  # one shot

    real_setitem = zarr.Array.__setitem__
    writes = {"n": 0, "fail_at": 3}

    def flaky(self, key, value):
        if self.path.endswith("/ids"):
            writes["n"] += 1
            if writes["n"] == writes["fail_at"]:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real_setitem(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", flaky)
    with pytest.raises(OSError, match="No space left"):
        tokenize_run(run_dir)
    store = FeatureStore.open(store_path)
    sub = store.group[f"tokens/{dvae_hash}"]
    assert list(sub["done"][:]) == [1, 1, 0, 0, 0, 0]
    with pytest.raises(StoreError, match="incomplete"):
        store.tokens(dvae_hash)

    writes.update(n=0, fail_at=-1)
    assert tokenize_run(run_dir) == dvae_hash
    assert writes["n"] == 4  # only the pending chunks were encoded again
    ids = FeatureStore.open(store_path).tokens(dvae_hash)[:]
    ref = FeatureStore.open(ref_store_path).tokens(dvae_hash)[:]
    assert ids.dtype == ref.dtype == np.uint16
    assert ids.tobytes() == ref.tobytes()
    writes.update(n=0)
    tokenize_run(run_dir)  # complete: nothing to do
    assert writes["n"] == 0


def test_tokens_of_another_dvae_are_refused(trained_dvae, tmp_path):
    store_path, run_dir = copy_dvae_run(trained_dvae[0], tmp_path / "w")
    dvae_hash = tokenize_run(run_dir)
    store = FeatureStore.open(store_path)
    other = "0123456789abcdef"
    with pytest.raises(StoreError, match=f"no tokens of dVAE {other}.*{dvae_hash}"):
        store.tokens(other)
    with pytest.raises(StoreError, match=other):
        ClipDataset(store, fields=("tokens",), tokens=other)
    # weights changed after export: their hash no longer matches dvae.json
    state = torch.load(run_dir / "dvae.pt", weights_only=True)
    state["decoder.11.bias"] += 1
    torch.save(state, run_dir / "dvae.pt")
    with pytest.raises(StoreError, match="does not match the hash"):
        tokenize_run(run_dir)


def test_run_directory_of_another_store_is_refused(trained_dvae, tmp_path):
    store_path, run_dir = copy_dvae_run(trained_dvae[0], tmp_path / "w")
    frames_store(tmp_path / "other.zarr", fingerprint="fp-other", seed=3)
    cfg = dvae_cfg(tmp_path / "w", tmp_path / "other.zarr", "dvae.max_steps=6")
    with pytest.raises(StoreError, match="trained on store fp-test.*fp-other"):
        stage.pretrain(cfg)
    with pytest.raises(ConfigError, match="dvae.vocab_size=32.*64"):
        stage.pretrain(
            dvae_cfg(tmp_path / "w", store_path, "dvae.max_steps=6", "dvae.vocab_size=64")
        )


def test_bad_inputs(tmp_path):
    odd = frames_store(tmp_path / "odd.zarr", size=30)
    with pytest.raises(StoreError, match="30 px.*divisible by 4"):
        stage.pretrain(dvae_cfg(tmp_path, odd.path))
    with pytest.raises(ConfigError, match="dvae.vocab_size=70000"):
        stage.pretrain(dvae_cfg(tmp_path, odd.path, "dvae.vocab_size=70000"))
    bare = frames_store(tmp_path / "bare.zarr")
    del bare.group["frames"]  # what an old store without frames, or a damaged one, looks like
    with pytest.raises(StoreError, match="no 'frames' array.*re-extract"):
        stage.pretrain(dvae_cfg(tmp_path, bare.path))
    partial = frames_store(tmp_path / "partial.zarr", complete=False)
    with pytest.raises(StoreError, match="incomplete"):
        stage.pretrain(dvae_cfg(tmp_path, partial.path))
    assert not (tmp_path / "runs").exists()  # nothing written for bad input


def test_geco_state_is_trained_and_checkpointed(tmp_path):
    frames_store(tmp_path / "store.zarr")
    cfg = dvae_cfg(
        tmp_path,
        tmp_path / "store.zarr",
        "dvae.max_steps=4",
        "dvae.ckpt_every=4",
        "dvae.kl_weight=0.1",
        "dvae.geco.enabled=true",
        "dvae.geco.warmup_steps=0",
        "dvae.geco.target=0.001",
        "dvae.geco.eta=0.001",
    )
    run_dir = stage.pretrain(cfg, tokenize=False)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert float(state["geco.beta"]) > 1.0  # error far above the 0.001 target: the multiplier rose
    assert set(torch.load(run_dir / "dvae.pt", weights_only=True)) == set(
        load_dvae(run_dir).state_dict()
    )


def test_cli_commands(trained_dvae, tmp_path):
    from egoslots.cli import main

    store_path, run_dir = copy_dvae_run(trained_dvae[0], tmp_path / "w")
    runner = CliRunner()
    result = runner.invoke(main, ["pretrain-dvae", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output and "--resume" in result.output
    result = runner.invoke(main, ["tokenize", "--help"])
    assert result.exit_code == 0 and "egoslots tokenize" in result.output
    result = runner.invoke(main, ["tokenize", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "dvae.json").read_text())["hash"] in result.output
    result = runner.invoke(main, ["tokenize", str(tmp_path)])
    assert (
        result.exit_code == 1
        and "no trained dVAE" in result.output
        and "Traceback" not in result.output
    )


def test_training_frames_are_train_split_with_flips(tmp_path):
    store = frames_store(tmp_path / "store.zarr")
    rows = training_rows(store)
    expected = [r for v in store.videos if v.split == "train" for r in range(v.first, v.stop)]
    assert sorted(rows.tolist()) == sorted(expected)
    assert any(v.hflip and v.first in rows for v in store.videos)
    data = FrameDataset(store, rows)
    clone = pickle.loads(pickle.dumps(data))  # what a spawned DataLoader worker receives
    assert clone._store is None
    frame = clone[3]
    assert frame.dtype == torch.uint8 and frame.shape == (32, 32, 3)
    assert np.array_equal(frame.numpy(), store.frames[int(rows[3])])


def test_damaged_last_checkpoint_falls_back_to_newest_step(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    for step in (3, 6):
        torch.save({"global_step": step}, ckpt_dir / f"step={step}.ckpt")
    assert find_resume_checkpoint(ckpt_dir) == ckpt_dir / "step=6.ckpt"
    (ckpt_dir / "last.ckpt").write_bytes((ckpt_dir / "step=6.ckpt").read_bytes()[:100])  # truncated
    assert find_resume_checkpoint(ckpt_dir) == ckpt_dir / "step=6.ckpt"
    torch.save({"global_step": 6}, ckpt_dir / "last.ckpt")
    assert find_resume_checkpoint(ckpt_dir) == ckpt_dir / "last.ckpt"
    assert find_resume_checkpoint(tmp_path / "none") is None


@pytest.mark.slow
def test_cli_killed_mid_training_resumes(tmp_path):
    """The real command, SIGKILLed after its first checkpoint, finishes when run again."""
    import os
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    frames_store(tmp_path / "store.zarr", frames_per_video=16)
    cfg = tmp_path / "dvae.yaml"
    cfg.write_text(
        f"work_dir: {tmp_path}\nstore: {tmp_path / 'store.zarr'}\n"
        "dvae: {vocab_size: 32, hidden: 16, batch_size: 8, num_workers: 2, max_steps: 200, ckpt_every: 20,\n"
        "       log_every: 10, image_every: 100, tau_steps: 200, accelerator: cpu}\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "cli.py", "pretrain-dvae", str(cfg)]
    proc = subprocess.Popen(
        command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = tmp_path / "runs" / "dvae" / "checkpoints" / "step=20.ckpt"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert first.exists() and not (tmp_path / "runs" / "dvae" / "dvae.json").exists()
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr
    info = json.loads((tmp_path / "runs" / "dvae" / "dvae.json").read_text())
    assert info["steps"] == 200
    FeatureStore.open(tmp_path / "store.zarr").tokens(info["hash"])  # complete
