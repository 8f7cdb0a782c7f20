"""Bad inputs, round 2 (issue 14): nothing deleted that egoslots did not write, locks between
stages that depend on each other, pixel ranges decided per video, and no traceback for the
issue's named settings, options and files. Rows 44- of docs/bad-inputs.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image

from egoslots.cache.catalog import NewStore, _matching_store
from egoslots.cache.store import StoreError
from egoslots.cli import main
from egoslots.pipeline.config import ConfigError
from egoslots.pipeline.data.frames import FrameFolderSource
from egoslots.pipeline.data.hdf5 import Hdf5Source
from egoslots.stages.machinery.common import StageError
from egoslots.stages.machinery.locks import check_unlocked, run_lock
from egoslots.stages.machinery.rundirs import LOCK_NAME, RUN_MARKER, remove_run_dir
from tests.helpers.errors import one_error_line
from tests.helpers.runs import make_dvae_run, slot_args, slot_cfg
from tests.helpers.stores import slot_store

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``egoslots ARGS`` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "cli.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def user_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------
# Nothing deleted that egoslots did not write
# --------------------------------------------------------------------------------------------
def test_export_overwrite_never_replaces_a_foreign_folder(tmp_path, monkeypatch):
    """`export-slots RUN OUT --overwrite` with OUT = `.`, `~`, or a folder of user files: refused
    before any work (RUN need not even load), every file kept."""
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "photos" / "cat.jpg").write_bytes(b"meow")
    (home / "notes.txt").write_text("mine")
    ours = tmp_path / "old.zarr"  # an export of ours, plus a file the user put in it
    zarr.open_group(str(ours), mode="w").attrs["egoslots_export"] = {"run": "x"}
    (ours / "README").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    before = user_files(home)
    runner = CliRunner()
    for out, why in (
        (".", "it is not an egoslots export"),
        ("~", "it is not an egoslots export"),
        (str(home / "photos"), "it is not an egoslots export"),
        (str(ours), "it holds files an export never writes (README)"),
    ):
        result = runner.invoke(main, ["export-slots", str(tmp_path / "run"), out, "--overwrite"])
        assert result.exit_code == 1, result.output
        assert "refusing to replace" in result.output and why in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert user_files(home) == before and (ours / "README").is_file()


def test_run_dir_overwrite_removes_only_egoslots_run_directories(tmp_path):
    ours = tmp_path / "runs" / "dvae"
    (ours / "checkpoints").mkdir(parents=True)
    (ours / RUN_MARKER).write_text("{}")
    (ours / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (ours / "dvae.pt").write_bytes(b"x")
    remove_run_dir(ours)
    assert not ours.exists()

    mixed = tmp_path / "runs" / "mixed"
    mixed.mkdir(parents=True)
    (mixed / "config.yaml").write_text("a: 1")
    (mixed / "my-notes.txt").write_text("mine")
    with pytest.raises(StageError, match=r"holds files egoslots never writes \(my-notes.txt\)"):
        remove_run_dir(mixed)
    foreign = tmp_path / "runs" / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(StageError, match="not an egoslots run directory"):
        remove_run_dir(foreign)
    assert (mixed / "my-notes.txt").is_file() and (foreign / "cat.jpg").is_file()


def test_train_slots_overwrite_refuses_a_run_dir_with_user_files(tmp_path):
    slot_store(tmp_path)
    make_dvae_run(tmp_path)
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / "inputs.json").write_text("{}")
    (run / "thesis.tex").write_text("mine")
    result = CliRunner().invoke(
        main,
        [
            "train-slots",
            str(REPO / "configs" / "demo.yaml"),
            *slot_args(tmp_path),
            "--overwrite",
        ],
    )
    assert result.exit_code == 1 and "refusing to delete" in result.output, result.output
    assert "thesis.tex" in result.output and (run / "thesis.tex").is_file()


def test_extract_overwrite_and_cache_rm_never_delete_a_foreign_folder(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "frame0.png").write_bytes(b"mine")
    new = NewStore(target, "0" * 16, {}, {}, "")
    with pytest.raises(StoreError, match="refusing to replace .*not an egoslots feature store"):
        _matching_store(new, overwrite=True)
    result = CliRunner().invoke(main, ["cache", "rm", str(target), "--yes"])
    assert result.exit_code == 1 and "refusing to delete" in result.output, result.output
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array(
        "x", shape=(2,), dtype="f4"
    )
    result = CliRunner().invoke(main, ["cache", "rm", str(tmp_path / "other.zarr"), "--yes"])
    assert result.exit_code == 1 and "not an egoslots feature store" in result.output
    assert (target / "frame0.png").read_bytes() == b"mine" and (tmp_path / "other.zarr").is_dir()


# --------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------
def test_train_slots_refuses_a_dvae_run_still_being_written_and_stale_locks_are_taken(
    tmp_path, caplog
):
    slot_store(tmp_path)
    run = make_dvae_run(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_NAME).write_text(
            json.dumps(
                {
                    "pid": holder.pid,
                    "host": os.uname().nodename,
                    "command": "egoslots pretrain-dvae",
                    "started": "now",
                }
            )
        )
        from egoslots.stages.train_slots import resolve_inputs

        with pytest.raises(StageError) as err:
            resolve_inputs(slot_cfg(tmp_path))
        message = str(err.value)
        assert f"in use by `egoslots pretrain-dvae` (pid {holder.pid}" in message
        assert "train-slots would read the dVAE" in message and "wait for it to finish" in message
        with pytest.raises(StageError, match="two commands must not write one run at once"):
            with run_lock(run, "egoslots tokenize"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over and said so in the log
    check_unlocked(run, "anything")
    with caplog.at_level("WARNING", logger="egoslots"):
        with run_lock(run, "egoslots tokenize"):
            assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
            with run_lock(run, "egoslots tokenize"):  # re-entrant in one process
                pass
            assert (run / LOCK_NAME).exists()
    assert not (run / LOCK_NAME).exists()
    assert f"pid {holder.pid} is no longer running" in caplog.text


# --------------------------------------------------------------------------------------------
# Pixel range once per video
# --------------------------------------------------------------------------------------------
def test_pixel_range_is_decided_per_video_not_per_frame(tmp_path):
    unit = np.full((1, 3, 4, 4, 3), 0.5, np.float32)  # a [0, 1] video ...
    unit[0, 1, 0, 0, 0] = 1.02  # ... with one overshooting pixel in frame 1
    byte = np.full((1, 3, 4, 4, 3), 200.0, np.float32)  # a [0, 255] video ...
    byte[0, 2] = 0.8  # ... with a dark frame 2
    for name, images in (("unit.h5", unit), ("byte.h5", byte)):
        with h5py.File(tmp_path / name, "w") as f:
            f["image"] = images
    unit_frames = [
        f.rgb for f in Hdf5Source(tmp_path / "unit.h5", mask_key=None).read_frames("000000")
    ]
    assert [int(f[1, 1, 0]) for f in unit_frames] == [128, 128, 128]  # frame 1 not blacked out
    assert int(unit_frames[1][0, 0, 0]) == 255
    byte_frames = [
        f.rgb for f in Hdf5Source(tmp_path / "byte.h5", mask_key=None).read_frames("000000")
    ]
    assert [int(f[0, 0, 0]) for f in byte_frames] == [200, 200, 0]  # the dark frame stays dark

    (tmp_path / "v").mkdir()
    Image.fromarray(np.full((4, 4), 51400, np.uint16)).save(tmp_path / "v" / "f0.png")
    Image.fromarray(np.full((4, 4), 200, np.uint16)).save(tmp_path / "v" / "f1.png")  # dark
    frames = [f.rgb for f in FrameFolderSource(tmp_path).read_frames("v")]
    assert [int(f[0, 0, 0]) for f in frames] == [200, 0]  # both divided by 257


# --------------------------------------------------------------------------------------------
# No traceback: the named settings, options and files (subprocess: what a user sees)
# --------------------------------------------------------------------------------------------
def test_named_settings_end_in_one_line_before_any_work(tmp_path):
    data = tmp_path / "data" / "v"
    data.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "f0.png")
    base = ["extract-features", str(REPO / "configs" / "demo.yaml"), f"work_dir={tmp_path / 'w'}"]
    frames = ["dataset.source=frames", f"dataset.path={tmp_path / 'data'}"]
    one_error_line(cli(*base, *frames, "extract.frames_per_chunk=0"), "extract.frames_per_chunk=0")
    assert not list((tmp_path / "w").rglob("*.tmp-*"))  # no orphan .zarr.tmp-*
    # every config command checks the config the same way first: inspect-data is the light one
    light = ["inspect-data", *base[1:]]
    for setting in (
        "globals.SLOT_DIM=0",
        "globals.BATCH_SIZE_PER_GPU=0",
        "trainer.max_steps=-1",
        "optimizer.lr=.nan",
    ):
        one_error_line(cli(*light, setting), setting.split("=")[0], "must be")
    one_error_line(cli(*light, "run_name=../../x"), "run_name='../../x'", "plain folder name")
    (tmp_path / "a_file").write_text("")
    one_error_line(cli(*light, f"work_dir={tmp_path / 'a_file'}"), "work_dir=", "is a file")
    assert not (REPO / "$HOME").exists()


def test_named_options_are_range_checked_by_click(tmp_path):
    runner = CliRunner()
    for args, expected in (
        (["evaluate", str(tmp_path), "--max-videos", "-1"], "-1 is not in the range x>=1"),
        (["evaluate", str(tmp_path), "--split", "bogus"], "'bogus' is not one of"),
        (["export-slots", str(tmp_path), "o.zarr", "--max-videos", "-1"], "x>=1"),
        (["export-slots", str(tmp_path), "o.zarr", "--split", "bogus"], "is not one of"),
        (["extract-features", "c.yaml", "--num-shards", "0"], "x>=1"),
        (["tokenize", str(tmp_path), "--batch-size", "0"], "x>=1"),
        (["make-synthetic", str(tmp_path / "s"), "--fps", "0"], "0<x<=1000"),
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output, (args, result.output)
    assert not (tmp_path / "metrics.json").exists()
    (tmp_path / "a_file").write_text("")
    result = runner.invoke(main, ["cache", "ls", str(tmp_path / "a_file")])
    assert result.exit_code == 1 and "is a file, not a work directory" in result.output


def test_lightning_refusing_the_trainer_settings_is_one_config_error(tmp_path):
    from omegaconf import OmegaConf

    from egoslots.stages.machinery.training import make_trainer

    settings = OmegaConf.create(
        {"max_steps": 1, "ckpt_every": 1, "log_every": 1, "accelerator": "cpu", "devices": 1,
         "num_nodes": 1, "strategy": "bogus"}
    )  # fmt: skip
    for command, section in (
        ("train-slots", "trainer"),
        ("pretrain-dvae", "dvae"),
        ("pretrain-encoder", "pretrain_encoder"),
    ):
        with pytest.raises(ConfigError, match=rf"^{section}.accelerator / devices .*'bogus'"):
            make_trainer(
                tmp_path,
                command=f"egoslots {command}",
                section=section,
                settings=settings,
                precision="32-true",
                callbacks=[],
            )


def test_extract_device_cuda_without_a_gpu_is_one_config_error(monkeypatch):
    from egoslots.stages.machinery.runtime import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"extract.device=cuda: torch sees no GPU"):
        pick_device("cuda", "extract.device")
    with pytest.raises(ConfigError, match=r"extract.device='tpu' is not a device"):
        pick_device("tpu", "extract.device")


def test_damaged_run_files_and_a_last_ckpt_folder_are_one_line(tmp_path):
    from egoslots.stages.train_slots import train

    slot_store(tmp_path)
    make_dvae_run(tmp_path)
    run = tmp_path / "runs" / "t"
    (run / "checkpoints" / "last.ckpt").mkdir(parents=True)
    with pytest.raises(StageError, match=r"last.ckpt is not a file \(a folder\?\)"):
        train(slot_cfg(tmp_path))
    (run / "checkpoints" / "last.ckpt").rmdir()
    (run / "inputs.json").write_text('{"store": ')
    (run / "checkpoints" / "step=2.ckpt").write_bytes(b"")
    with pytest.raises(StageError, match=r"cannot read .*inputs.json .*damaged"):
        train(slot_cfg(tmp_path))
    (tmp_path / "runs" / "dvae" / "dvae.json").write_text("not json")
    with pytest.raises(StageError, match=r"dvae.json .*damaged"):
        train(slot_cfg(tmp_path))


def test_symlink_loop_in_the_data_folder_is_named(tmp_path):
    from egoslots.pipeline.data.base import SourceError

    root = tmp_path / "data"
    (root / "v").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "v" / "f0.png")
    os.symlink(root / "loop", root / "loop")  # a link to itself
    with pytest.raises(SourceError, match=r"data/loop: a symbolic link that loops"):
        FrameFolderSource(root).videos()
    os.unlink(root / "loop")
    os.symlink(root, root / "v" / "up")  # a link back to a folder above it
    with pytest.raises(SourceError, match=r"v/up: a symbolic link that loops .*above it"):
        FrameFolderSource(root).videos()
    os.unlink(root / "v" / "up")
    os.symlink(root / "v", root / "w")  # a link to a sibling is no loop
    assert [r.video_id for r in FrameFolderSource(root).videos()] == ["v", "w"]


def test_a_write_refused_where_no_stage_expected_it_is_one_line(tmp_path, monkeypatch):
    """A work_dir the user may not write (here: the synthetic videos' folder) ends in one line
    naming the path and what to do, not a traceback."""
    import errno

    from egoslots.stages import make_synthetic as synthetic

    def refused(out, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(out))

    monkeypatch.setattr(synthetic, "generate_dataset", refused)
    result = CliRunner().invoke(
        main, ["run", str(REPO / "configs" / "demo.yaml"), f"work_dir={tmp_path / 'work'}"]
    )
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # click's clean exit, not a traceback
    assert "cannot write" in result.output and "Permission denied (EACCES)" in result.output
    assert "set work_dir to a directory you can write" in result.output
    assert str(tmp_path / "work" / "data" / "synthetic") in result.output
