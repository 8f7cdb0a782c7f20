"""Bad inputs, round 3 sweep (issue 26, second part): what a new sweep of 40 inputs and faults
found (docs/bad-inputs.md "Round 3 sweep", rows 95-). Memory-sizing batch options bounded by the
memory available, integer pixels beyond 8 bits refused instead of clipped, a ``store_dir``
that is a file refused by the config."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from egoslots.cache.store import FeatureStore
from egoslots.pipeline.config import ConfigError, load_config
from egoslots.pipeline.data import SourceError
from egoslots.pipeline.data.base import to_rgb_uint8
from egoslots.pipeline.data.hdf5 import Hdf5Source
from egoslots.stages.machinery import batch_memory, common
from tests.helpers.data import write_frame_folder
from tests.helpers.errors import one_error_line
from tests.helpers.runs import make_dvae_run, slot_cfg
from tests.helpers.stores import slot_store

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``egoslots ARGS`` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def memory(monkeypatch, available: int, gpu: int | None = None) -> None:
    """Pretend ``available`` bytes of host memory are free (and ``gpu`` of a GPU's, else the
    same)."""

    def available_memory(on_gpu=None):
        if on_gpu and gpu is not None:
            return gpu, "GPU memory"
        return available, "memory"

    monkeypatch.setattr(common, "available_memory", available_memory)


# --------------------------------------------------------------------------------------------
# Memory-sizing options: an upper bound from the memory available
# --------------------------------------------------------------------------------------------
EXTRACT = [
    "globals.BACKBONE=patch-pixels", "backbone.patch_size=8", "backbone.checkpoint=null",
    "globals.IMAGE_SIZE=32", "globals.FRAME_SIZE=16", "extract.num_workers=0",
    "extract.compute=fp32", "extract.device=cpu",
]  # fmt: skip


def test_extraction_chunk_beyond_memory_is_one_line_before_any_chunk(tmp_path):
    """``extract.frames_per_chunk=1048576`` at 8192 px over more frames than memory holds
    (sized here from the memory available, so the test holds on any machine): one line naming
    the key, the estimate and the bound, and no store written (before: the whole chunk's images
    were decoded into memory until the machine ran out). The same key over a store of fewer
    frames than its chunk is no error: a chunk never holds more frames than the store."""
    from PIL import Image

    per_frame, _ = batch_memory.extraction_bytes(8192, 16, (8192 // 8) ** 2, 8 * 8 * 3)
    frames = int(2 * common.available_memory(False)[0] // per_frame) + 2
    folder = tmp_path / "data" / "clip"
    folder.mkdir(parents=True)
    for i in range(frames):  # 8 px frames: tiny files, whatever the chunk costs in memory
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(folder / f"{i:05d}.png")
    work = tmp_path / "work"
    args = [
        "extract-features", "configs/demo.yaml", f"work_dir={work}", "dataset.source=frames",
        f"dataset.path={tmp_path / 'data'}", *EXTRACT, "globals.IMAGE_SIZE=8192",
        "extract.frames_per_chunk=1048576",
    ]  # fmt: skip
    line = one_error_line(
        cli(*args), f"extract.frames_per_chunk=1048576: {frames} frames need about"
    )
    assert re.search(r"available now: use at most extract\.frames_per_chunk=\d+$", line), line
    assert not (work / "stores").exists() or not list((work / "stores").iterdir())
    # a chunk never holds more than the store's frames: a few frames fit whatever the key says
    few = tmp_path / "few" / "clip"
    few.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(few / f"{i}.png")
    from egoslots.stages.extract_features import extract

    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [f"work_dir={tmp_path / 'w2'}", "dataset.source=frames", f"dataset.path={few.parent}",
         *EXTRACT, "extract.frames_per_chunk=1048576"],
    )  # fmt: skip
    assert FeatureStore.open(extract(cfg)).complete  # at 32 px (EXTRACT): 3 frames fit


def test_extraction_bounds_follow_the_backbone_and_the_chunk(monkeypatch):
    """The batch is sized at min(batch, chunk): a large batch over small chunks is no error;
    the bound is the largest value that fits, and that value passes."""
    cfg = load_config(REPO / "configs" / "demo.yaml", [*EXTRACT, "extract.frames_per_chunk=8"])

    class Backbone:
        input_size, num_tokens, feature_dim = 32, 16, 192

    per_chunk, per_batch = batch_memory.extraction_bytes(32, 16, 16, 192)
    assert per_chunk >= 3 * 32 * 32 + 2 * 4 * 16 * 192 and per_batch >= 4 * 3 * 32 * 32
    memory(monkeypatch, 8 * per_chunk + 8 * per_batch)
    cfg.extract.batch_size = 1 << 20  # never more than one chunk (8 frames) at a time
    batch_memory.check_extraction(cfg, Backbone, on_gpu=False)
    # the chunk is held in host memory, the batch on the extraction device (here a GPU)
    memory(monkeypatch, 8 * per_chunk + 8 * per_batch, gpu=5 * per_batch + 1)
    batch_memory.check_extraction(cfg, Backbone, on_gpu=False)
    with pytest.raises(ConfigError, match=r"^extract\.batch_size=1048576: 8 frames need .* of GPU memory available now: use at most extract\.batch_size=5$"):  # fmt: skip
        batch_memory.check_extraction(cfg, Backbone, on_gpu=True)
    cfg.extract.batch_size = 5
    batch_memory.check_extraction(cfg, Backbone, on_gpu=True)
    cfg.extract.frames_per_chunk = 9
    memory(monkeypatch, 8 * per_chunk, gpu=1 << 40)
    with pytest.raises(ConfigError, match=r"^extract\.frames_per_chunk=9: .*=8$"):
        batch_memory.check_extraction(cfg, Backbone, on_gpu=True)


def test_slot_batch_beyond_memory_is_refused_before_the_run_directory(tmp_path, monkeypatch):
    """``globals.BATCH_SIZE_PER_GPU=1048576`` (train-slots) allocated 20 GB within a minute
    before the sweep stopped it: now one ConfigError naming dataset.batch_size and the bound,
    before the run directory is written."""
    from egoslots.stages.train_slots import train

    slot_store(tmp_path)
    make_dvae_run(tmp_path)
    cfg = slot_cfg(tmp_path, "globals.BATCH_SIZE_PER_GPU=1048576", "trainer.accelerator=cpu")
    meta = {"num_tokens": 16, "feature_dim": 8}
    per_clip = batch_memory.clip_bytes(int(cfg.dataset.ep_length), 16, 8, 3, 32)
    memory(monkeypatch, 3 * per_clip + 1)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    msg = str(err.value)
    assert msg.startswith("dataset.batch_size=1048576: 1048576 clips need about"), msg
    assert "globals.BATCH_SIZE_PER_GPU sets it" in msg and msg.endswith(
        "use at most dataset.batch_size=3"
    ), msg
    assert not (tmp_path / "runs" / "t").exists()
    cfg.dataset.batch_size = 3
    batch_memory.check_slot_batch(cfg, meta, on_gpu=False)  # what fits is accepted


def test_dvae_and_tokenize_batches_beyond_memory_name_the_key_or_option(monkeypatch):
    """``dvae.batch_size`` (pretrain-dvae), ``dvae.tokenize_batch_size`` and ``tokenize
    --batch-size``: one line each with the bound; a tokenize batch is sized at one chunk."""
    import click

    cfg = load_config(None, ["dvae.vocab_size=64", "dvae.hidden=16", "dvae.batch_size=1048576"])
    per = batch_memory.dvae_train_bytes(64, 16, 64)
    assert per > 4 * 4 * 64 * 16 * 16  # the vocabulary maps alone: 4 x (64 x 16 x 16) floats
    memory(monkeypatch, 7 * per + 3)
    with pytest.raises(ConfigError, match=r"^dvae\.batch_size=1048576: .* use at most dvae\.batch_size=7$"):  # fmt: skip
        batch_memory.check_dvae_batch(cfg, 64, on_gpu=False)
    cfg.dvae.batch_size = 7
    batch_memory.check_dvae_batch(cfg, 64, on_gpu=False)

    per = batch_memory.tokenize_bytes(64, 16, 64)
    memory(monkeypatch, 10 * per)
    batch_memory.check_tokenize_batch(10**8, 8, 64, 16, 64, False, "--batch-size")  # chunk: 8
    with pytest.raises(click.BadParameter, match=r"use at most --batch-size 10$"):
        batch_memory.check_tokenize_batch(10**8, 4096, 64, 16, 64, False, "--batch-size")
    with pytest.raises(ConfigError, match=r"^dvae\.tokenize_batch_size=4096: .*=10$"):
        batch_memory.check_tokenize_batch(4096, 4096, 64, 16, 64, False, None)


# --------------------------------------------------------------------------------------------
# Integer pixels beyond 8 bits
# --------------------------------------------------------------------------------------------
def test_integer_pixels_beyond_8_bits_are_refused_not_clipped(tmp_path):
    """An HDF5 ``image`` array of int64 or uint16 values up to 70000 was clipped to 255 (a white
    video) without a word: now one SourceError naming the file, the dtype and the range. Integer
    arrays holding 0..255 (numpy's default int64) still read as they are."""
    path = tmp_path / "x.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["image"] = rng.integers(0, 70000, (1, 2, 8, 8, 3)).astype(np.int64)
    src = Hdf5Source(path, mask_key=None)
    (vid,) = [v.video_id for v in src.videos()]
    with pytest.raises(SourceError) as err:
        list(src.read_frames(vid))
    msg = str(err.value)
    assert str(path) in msg and re.search(
        r"int64 pixels \d+\.\.6\d{4} do not fit 8-bit colour", msg
    )
    assert "divide by 257" in msg
    with pytest.raises(SourceError, match=r"int16 pixels -3\.\.4 do not fit"):
        to_rgb_uint8(np.array([[-3, 4]], np.int16), "f")
    fine = rng.integers(0, 256, (4, 4, 3)).astype(np.int64)
    assert np.array_equal(to_rgb_uint8(fine, "f"), fine.astype(np.uint8))


# --------------------------------------------------------------------------------------------
# store_dir that is a file
# --------------------------------------------------------------------------------------------
def test_store_dir_that_is_a_file_is_a_config_error(tmp_path):
    """``store_dir=FILE`` ended extract-features in a FileExistsError traceback from mkdir:
    now the config refuses it, as it does work_dir (row 53)."""
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"store_dir='.*/f' is a file: must be a folder"):
        load_config(None, [f"work_dir={tmp_path}", f"store_dir={afile}"])
    with pytest.raises(ConfigError, match=r"store_dir='.*/f/stores' is inside the file"):
        load_config(None, [f"work_dir={tmp_path}", f"store_dir={afile}/stores"])
    load_config(None, [f"work_dir={tmp_path}", f"store_dir={tmp_path}/stores"])
    load_config(None, [f"work_dir={tmp_path}", "store_dir=s3://bucket/stores"])


def test_float_pixels_far_beyond_either_range_are_refused_not_clipped():
    """A float video of 0..943 (a webdataset member scaled by mistake, a depth map) was clipped
    to 255 without a word; a little overshoot (1.02 in [0, 1], 255.3 in [0, 255]) still clips."""
    wild = np.linspace(0, 943, 12, dtype=np.float64).reshape(2, 2, 3)
    with pytest.raises(SourceError, match=r"float64 pixels 0\.\.943 fit neither \[0, 1\] nor"):
        to_rgb_uint8(wild, "f", float_scale=1.0)
    assert to_rgb_uint8(np.full((2, 2, 3), 1.02), "f", 255.0).max() == 255
    assert to_rgb_uint8(np.full((2, 2, 3), 255.3), "f", 1.0).max() == 255
    assert to_rgb_uint8(np.full((2, 2, 3), -0.01), "f", 255.0).max() == 0


# --------------------------------------------------------------------------------------------
# Run directories: another stage's run, a file in a run's place
# --------------------------------------------------------------------------------------------
def test_evaluate_visualize_export_on_a_dvae_run_name_the_run_kind(tmp_path):
    """``evaluate runs/dvae`` (also visualize, export-slots) ended in a ValueError traceback
    from the slot model ("needs the token grid"): one line naming the run's kind and the
    train-slots runs beside it."""
    from click.testing import CliRunner

    from cli import main

    runs = tmp_path / "runs"
    for name, record in (("dvae", "dvae.json"), ("enc", "encoder.json"), ("slots", None)):
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "checkpoints" / "last.ckpt").write_bytes(b"PK")
        (runs / name / "inputs.json").write_text("{}")
        if record:
            (runs / name / record).write_text("{}")
    for args in (["evaluate"], ["visualize"], ["export-slots"]):
        for name, stage in (("dvae", "pretrain-dvae"), ("enc", "pretrain-encoder")):
            extra = [str(tmp_path / "x.npz")] if args == ["export-slots"] else []
            result = CliRunner().invoke(main, [*args, str(runs / name), *extra])
            assert result.exit_code == 1, result.output
            assert isinstance(result.exception, SystemExit), result.exception
            lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
            assert lines == [
                f"Error: {runs / name} is a {stage} run directory (it holds "
                f"{'dvae' if name == 'dvae' else 'encoder'}.json), not a train-slots run: pass "
                f"the directory of a train-slots run (slots in {runs})"
            ], result.output


def test_a_file_where_a_run_directory_goes_is_one_line(tmp_path):
    """``run_name=afile`` where ``runs/afile`` is a file (or ``runs`` itself is one) ended
    train-slots / pretrain-dvae in a FileExistsError traceback from mkdir."""
    from egoslots.stages.machinery.common import StageError
    from egoslots.stages.machinery.locks import run_lock, writing_run

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "afile").write_text("mine")
    with pytest.raises(StageError, match=r"runs/afile is a file, not a folder: .*choose another run_name"):  # fmt: skip
        with run_lock(tmp_path / "runs" / "afile", "egoslots train-slots"):
            pass
    (tmp_path / "w2").mkdir()
    (tmp_path / "w2" / "runs").write_text("mine")
    with pytest.raises(StageError, match=r"w2/runs is a file, not a folder"):
        with writing_run(tmp_path / "w2" / "runs" / "t", "egoslots pretrain-dvae", False, True):
            pass
    assert (tmp_path / "runs" / "afile").read_text() == "mine"
    assert (tmp_path / "w2" / "runs").read_text() == "mine"


# --------------------------------------------------------------------------------------------
# SIGTERM / Ctrl-C during extraction
# --------------------------------------------------------------------------------------------
def default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A shell starts background jobs with
    SIGINT ignored, and Python then installs no KeyboardInterrupt handler, so a test run from
    such a job (CI's runner, ``nohup ... &``) would send a Ctrl-C its child never sees."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow  # real subprocesses signalled mid-run, with the crash tests
@pytest.mark.parametrize(("sig", "code", "word"), [(15, 143, "SIGTERM"), (2, 130, "Ctrl-C")])
def test_sigterm_or_ctrl_c_during_extraction_is_one_line_and_the_rerun_resumes(
    tmp_path, sig, code, word
):
    """SIGTERM killed extract-features without a word (exit -15) and Ctrl-C printed click's bare
    "Aborted!": now both end in one line saying how many chunks are kept (exit 143 / 130, as
    the training stages do), with DataLoader workers left alone; the rerun finishes the rest."""
    import os
    import time

    from tests.helpers.crashkit import count_done_flags

    data = write_frame_folder(tmp_path / "data", videos=4, frames=16, size=(32, 32))
    chunks = 4 * 16 // 4
    work = tmp_path / "work"
    args = [
        "extract-features", "configs/demo.yaml", f"work_dir={work}", "dataset.source=frames",
        f"dataset.path={data}", *EXTRACT, "globals.IMAGE_SIZE=256", "extract.batch_size=1",
        "extract.frames_per_chunk=4", "extract.num_workers=1",
    ]  # fmt: skip
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "cli.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
            stderr=stderr, start_new_session=True, preexec_fn=default_sigint,
        )  # fmt: skip
    done = count_done_flags(work / "stores", "*.zarr/done/c/*")
    deadline = time.monotonic() + 60
    while done() < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, sig)  # the whole group, workers included, as a terminal or scheduler
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"no exit 60 s after the signal: {log.read_text()[-3000:]}") from None
    err = log.read_text()
    assert proc.returncode == code, err[-3000:]
    line = one_error_line(
        subprocess.CompletedProcess(args, proc.returncode, "", err),
        f"extraction stopped by {word}: ",
        "chunks of ",
        "are written and kept; rerun the same command to resume with the rest",
    )
    kept = int(line.split(f"stopped by {word}: ")[1].split(" of ")[0])
    assert 1 <= kept < chunks
    if sig == signal.SIGINT:
        return  # the resume is the same after either signal: run it once
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "store complete" in rerun.stdout and done() == chunks


# --------------------------------------------------------------------------------------------
# A dangling link among the frames; a hand-edited store passed over by the lookup
# --------------------------------------------------------------------------------------------
def test_a_dangling_link_among_the_frames_names_its_target(tmp_path):
    """A frame that is a symbolic link whose target is gone said only ``cannot stat ([Errno 2]
    …)``: now it names the link, its target and what to do."""
    import os

    from egoslots.pipeline.data.frames import FrameFolderSource

    data = write_frame_folder(tmp_path / "data", videos=1, frames=3, size=(8, 8))
    frame = data / "clip00" / "0001.png"
    frame.unlink()
    os.symlink(tmp_path / "gone" / "0001.png", frame)
    with pytest.raises(SourceError) as err:
        FrameFolderSource(data).videos()
    assert str(err.value) == (
        f"{frame}: a symbolic link to {tmp_path / 'gone' / '0001.png'}, which does not exist "
        "(No such file or directory): restore its target, or remove the link"
    )


def test_a_store_edited_by_hand_is_named_when_no_store_matches(tmp_path):
    """A store whose attrs were edited by hand (num_frames) was passed over by the lookup
    without a word: "no feature store … matches", as if none had been extracted. Now the line
    names the store passed over and why."""
    import json

    from egoslots.cache.catalog import store_for_config
    from egoslots.cache.store import StoreError

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"work_dir={tmp_path}", *EXTRACT])
    store = slot_store(tmp_path)
    attrs = store.path / "zarr.json"
    meta = json.loads(attrs.read_text())
    meta["attributes"]["egoslots"]["num_frames"] = 10**6
    attrs.write_text(json.dumps(meta))
    with pytest.raises(StoreError) as err:
        store_for_config(cfg)
    msg = str(err.value)
    assert msg.startswith(f"no feature store in {tmp_path / 'stores'} matches"), msg
    assert "Passed over as unreadable: fp0: " in msg and "the attrs say (1000000," in msg, msg
