"""Bad input and faults, round 3 (issue 26), writes and loads: one handler of failed writes for
every command (torch's zip-writer failure named by the errno it hides), ``--restarts`` bounded
by the memory available, every weights file loaded weights-only with one line, and one reader
of run JSON files. Rows 80-94 of docs/bad-inputs.md.

Faults are injected at the real call (tests run as root: permissions cannot refuse a write):
the write into a file's temporary raises the OSError a full or read-only disk raises."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from egoslots.cache import location
from egoslots.cache.location import write_file
from egoslots.cli import main
from egoslots.pipeline.checkpoints import CheckpointError, load_weights
from egoslots.pipeline.records import DamagedFile, read_json
from tests.helpers.runs import make_dvae_run, slot_args, slot_run
from tests.helpers.stores import frames_store, slot_store

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------------------------
def _target(file) -> str | None:
    """The file a write-open is for: ``x.ckpt`` for ``x.ckpt`` and for its temporary
    ``.x.ckpt.tmp-PID`` (the fault hits the real file whether or not writes are atomic)."""
    if not isinstance(file, (str, os.PathLike)):
        return None
    name = Path(file).name
    return re.sub(r"^\.(.*)\.tmp-\d+$", r"\1", name)


def disk_fills_while_writing(monkeypatch, suffix: str, err: int = errno.ENOSPC, after: int = 0):
    """Writes into files named ``*suffix`` fail with ``err`` once ``after`` bytes are in: the
    disk fills mid-file. An unbuffered file, so that torch's zip writer sees the failing write
    itself (and raises its own RuntimeError, as on a real full disk)."""
    real = builtins.open

    class Filling(io.FileIO):
        written = 0

        def write(self, data):
            if self.written + len(data) > after:
                raise OSError(err, os.strerror(err))
            self.written += len(data)
            return super().write(data)

    def opening(file, mode="r", *args, **kwargs):
        target = _target(file)
        if "w" in str(mode) and target and target.endswith(suffix):
            return Filling(file, "w")
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", opening)


def refuse_write_open(monkeypatch, part: str, err: int):
    """The open-for-write of files whose name holds ``part`` fails with ``err`` (a read-only
    mount). Also ``io.open``, which TensorBoard's writer calls."""
    real = builtins.open

    def opening(file, mode="r", *args, **kwargs):
        target = _target(file)
        if any(c in str(mode) for c in "wax") and target and part in target:
            raise OSError(err, os.strerror(err), str(file))
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", opening)
    monkeypatch.setattr(io, "open", opening)


def one_line(result, *expected: str) -> str:
    """The command ended with one ``Error:`` line holding ``expected`` and no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # click's clean exit
    assert "Traceback" not in result.output
    errors = re.findall(r"Error: [^\n]*", result.output)  # a progress bar may precede it
    assert len(errors) == 1, result.output[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


class Payload:
    """Stands for a malicious object: unpickling it would run code (here: set a flag)."""

    loaded = False

    def __reduce__(self):
        return (_mark_loaded, ())


def _mark_loaded():
    Payload.loaded = True
    return "ran"


@pytest.fixture
def run_dir(tmp_path_factory, tmp_path) -> Path:
    """A copy of the session's trained slot run (what evaluate, visualize, export-slots read)."""
    return slot_run(tmp_path_factory, tmp_path / "work")


# --------------------------------------------------------------------------------------------
# 1. One write handler
# --------------------------------------------------------------------------------------------
def test_torch_zip_writer_failure_becomes_the_errno_it_hides(tmp_path, monkeypatch):
    """Row 80: torch.save on a disk that fills mid-file raises torch's RuntimeError, not an
    OSError; write_file turns it into the OSError it hides, naming the file, old file kept."""
    path = tmp_path / "w.ckpt"
    write_file(path, lambda f: torch.save({"old": torch.ones(3)}, f))
    before = path.read_bytes()
    with monkeypatch.context() as m:
        disk_fills_while_writing(m, "w.ckpt", after=300)
        with pytest.raises(OSError) as caught:
            write_file(path, lambda f: torch.save({"new": torch.zeros(10_000)}, f))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert isinstance(caught.value.__cause__, RuntimeError)  # what torch raised
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["w.ckpt"]

    # torch writing by itself (no OSError behind its error): the disk says what happened
    def stream_writer_fails(f):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    class Disk:
        def __init__(self, free_blocks, flags=0):
            self.f_bfree = self.f_bavail = free_blocks
            self.f_frsize, self.f_flag = 4096, flags

    for disk, code in ((Disk(3), errno.ENOSPC), (Disk(10**9, os.ST_RDONLY), errno.EROFS)):
        monkeypatch.setattr(location.os, "statvfs", lambda folder, disk=disk: disk)
        with pytest.raises(OSError) as caught:
            write_file(path, stream_writer_fails)
        assert caught.value.errno == code and caught.value.filename == str(path)
    monkeypatch.setattr(location.os, "statvfs", lambda folder: Disk(10**9))
    with pytest.raises(RuntimeError, match="PytorchStreamWriter"):  # no fault it can name
        write_file(path, stream_writer_fails)

    def unrelated(f):  # a RuntimeError that is no writer's: passes unchanged
        try:
            raise FileNotFoundError(errno.ENOENT, "gone")
        except FileNotFoundError:
            raise RuntimeError("boom") from None

    with pytest.raises(RuntimeError, match="boom"):
        write_file(path, unrelated)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["w.ckpt"]


def test_full_disk_at_a_checkpoint_ends_train_slots_in_one_line(tmp_path, monkeypatch):
    """Row 81: train-slots with the disk filling while step=4.ckpt is written (torch's
    RuntimeError before): one line naming the file; last.ckpt and step=2.ckpt untouched."""
    slot_store(tmp_path)
    make_dvae_run(tmp_path)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("seed: 0\n")
    args = ["train-slots", str(cfg_file), *slot_args(tmp_path), "trainer.val_every=100"]
    args += ["trainer.image_every=100"]
    ckpts = tmp_path / "runs" / "t" / "checkpoints"
    with monkeypatch.context() as m:
        disk_fills_while_writing(m, "step=4.ckpt", after=500)
        result = CliRunner().invoke(main, args)
    line = one_line(result, "No space left on device (ENOSPC): the disk is full: free some space")
    assert re.search(r"cannot write .*step=4\.ckpt: ", line), line
    assert _step(ckpts / "step=2.ckpt") == _step(ckpts / "last.ckpt") == 2
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step=2.ckpt"]


def test_a_write_fault_re_raised_by_a_library_is_still_one_line(tmp_path):
    """Row 83: Lightning's TensorBoard logger re-raises the writer's OSError as
    ``ValueError(...) from`` it: the handler sees through to the refused write. Errors egoslots
    already worded (click's, the user-error types) and other OSErrors pass unchanged."""
    from egoslots.pipeline.config import ConfigError
    from egoslots.stages.machinery.common import StageError, one_line_errors, output_writes

    events = tmp_path / "runs" / "t" / "tb" / "events.out.tfevents.1.host"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(events))
    with pytest.raises(StageError) as caught, output_writes(tmp_path / "runs" / "t"):
        raise ValueError("you tried to log 1.0 which is currently not supported") from full
    assert str(caught.value).startswith(f"cannot write {events}: No space left on device")
    with pytest.raises(StageError, match=r"cannot write .*events.* \(ENOSPC\)"), one_line_errors():
        raise ValueError("logging failed") from full
    for error in (
        StageError("already worded"),
        ConfigError("a key"),
        OSError(errno.EIO, "Input/output error", "x"),
    ):
        try:
            raise error from full
        except Exception as err:  # noqa: BLE001
            chained = err
        with pytest.raises(type(error) if not isinstance(error, ConfigError) else StageError) as c:
            with one_line_errors():
                raise chained
        assert "cannot write" not in str(c.value)


def test_full_disk_at_the_dvae_weights_ends_pretrain_dvae_in_one_line(tmp_path, monkeypatch):
    """Row 82: pretrain-dvae with the disk filling while dvae.pt (torch.save) is written: one
    line naming dvae.pt; the checkpoints are kept and the rerun writes it."""
    frames_store(tmp_path / "store.zarr")
    args = [
        "pretrain-dvae",
        str(REPO / "configs" / "base.yaml"),
        f"work_dir={tmp_path}",
        f"store={tmp_path / 'store.zarr'}",
        "dvae.vocab_size=16",
        "dvae.hidden=8",
        "dvae.batch_size=4",
        "dvae.num_workers=0",
        "dvae.max_steps=2",
        "dvae.ckpt_every=2",
        "dvae.image_every=100",
        "dvae.accelerator=cpu",
        "dvae.precision=32",
    ]
    run = tmp_path / "runs" / "dvae"
    with monkeypatch.context() as m:
        disk_fills_while_writing(m, "dvae.pt", after=200)
        result = CliRunner().invoke(main, args)
    line = one_line(result, "No space left on device (ENOSPC)")
    assert re.search(r"cannot write .*dvae\.pt: ", line), line
    assert not (run / "dvae.pt").exists() and _step(run / "checkpoints" / "last.ckpt") == 2
    assert not list(run.glob(".*.tmp-*"))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert load_weights(run / "dvae.pt")


def test_evaluate_visualize_export_on_a_full_or_read_only_disk_are_one_line(
    run_dir, tmp_path, monkeypatch
):
    """Rows 84-86: the commands that take a RUN (no config) end a refused write in one line too
    (the command group's handler), and what they wrote before is kept whole."""
    runner = CliRunner()
    metrics = run_dir / "metrics.json"
    metrics.write_text('{"key": "an older evaluation"}\n')
    with monkeypatch.context() as m:
        disk_fills_while_writing(m, "metrics.json")
        result = runner.invoke(main, ["evaluate", str(run_dir), "--no-probe", "--max-videos", "1"])
    line = one_line(result, f"cannot write {metrics}: No space left on device (ENOSPC)")
    assert "Files written before are kept" in line and "rerun the same command" in line
    assert metrics.read_text() == '{"key": "an older evaluation"}\n'

    out = tmp_path / "viz"
    with monkeypatch.context() as m:
        refuse_write_open(m, ".gif", errno.EROFS)
        result = runner.invoke(main, ["visualize", str(run_dir), "--out", str(out)])
    line = one_line(result, "Read-only file system (EROFS): make it writable, or write elsewhere")
    assert re.search(rf"cannot write {re.escape(str(out))}/\S+\.gif", line), line
    assert not list(out.glob("*.gif")) and not list(out.glob(".*"))

    import zarr.storage._local as zarr_local

    real_put = zarr_local._put

    def put(path, value, *args, **kwargs):
        if "/c/" in str(path):  # the first chunk of slots the export writes
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(path))
        return real_put(path, value, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(zarr_local, "_put", put)
        result = runner.invoke(
            main, ["export-slots", str(run_dir), str(tmp_path / "s.zarr"), "--max-videos", "1"]
        )
    one_line(result, "Disk quota exceeded (EDQUOT)", "raise the quota", str(tmp_path / "s.zarr"))

    npz = tmp_path / "s.npz"
    args = ["export-slots", str(run_dir), str(npz), "--max-videos", "1"]
    assert runner.invoke(main, args).exit_code == 0
    older = npz.read_bytes()
    with monkeypatch.context() as m:
        disk_fills_while_writing(m, "s.npz", after=100)
        result = runner.invoke(main, [*args, "--overwrite"])
    one_line(result, f"cannot write {npz}: No space left on device (ENOSPC)")
    assert npz.read_bytes() == older and not list(tmp_path.glob(".s.npz.tmp-*"))


# --------------------------------------------------------------------------------------------
# 2. Options that size memory
# --------------------------------------------------------------------------------------------
def test_restarts_beyond_the_memory_available_is_refused_before_work(run_dir, monkeypatch):
    """Row 87: ``--restarts 100000000`` (evaluate, visualize, export-slots) with a gaussian
    initializer is one usage error naming the option, the estimate and the bound, before the run
    is loaded; with a fixed initializer (whose draws cost nothing) it is no error."""
    from egoslots.stages.machinery import inference, run_options

    assert run_options.restart_bytes(run_dir) == 0  # a fixed initializer: draws cost nothing
    run_options.check_restarts(10**8, run_dir)
    config = run_dir / "config.yaml"  # the run as one with a gaussian initializer
    config.write_text(config.read_text().replace("name: fixed", "name: gaussian", 1))
    assert "name: gaussian" in config.read_text()
    loaded = []
    monkeypatch.setattr(inference, "read_checkpoint", lambda p: loaded.append(p))
    for command in (["evaluate"], ["visualize"], ["export-slots"]):
        args = [*command, str(run_dir)] + (["x.npz"] if command == ["export-slots"] else [])
        result = CliRunner().invoke(main, [*args, "--restarts", "100000000"])
        assert result.exit_code == 2, result.output
        assert "Invalid value for '--restarts': 100000000 draws need about" in result.output
        assert re.search(r"available now: use at most --restarts \d+", result.output)
    assert loaded == []

    per_draw = run_options.restart_bytes(run_dir)
    assert per_draw and per_draw > 4 * 4 * 16  # at least the window's features
    from egoslots.stages.machinery import common

    monkeypatch.setattr(common, "available_memory", lambda: (5 * per_draw + 1, "memory"))
    with pytest.raises(Exception, match=r"use at most --restarts 5\b"):
        run_options.check_restarts(6, run_dir)
    run_options.check_restarts(5, run_dir)  # what fits is accepted


# --------------------------------------------------------------------------------------------
# 3. Weights-only loads, one line
# --------------------------------------------------------------------------------------------
def test_every_weights_file_loads_weights_only_with_one_line(run_dir, tmp_path):
    """Rows 88-90: a damaged or pickled-object dvae.pt (a bare UnpicklingError / RuntimeError
    before), a damaged last.ckpt in evaluate, a zip whose member is cut: one line naming the
    file and what to do; the object is never run."""
    from egoslots.pipeline.dvae import load_dvae
    from egoslots.stages.machinery.inference import checkpoint_identity
    from egoslots.stages.machinery.rundirs import find_resume_checkpoint

    dvae_run = run_dir.parent / "dvae"
    good = (dvae_run / "dvae.pt").read_bytes()
    (dvae_run / "dvae.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError) as caught:
        load_dvae(dvae_run)
    message = str(caught.value)
    assert f"cannot read checkpoint {dvae_run / 'dvae.pt'}: dvae.pt is not a readable" in message
    assert "pretrain-dvae --overwrite" in message and "\n" not in message

    torch.save({"payload": Payload()}, dvae_run / "dvae.pt")
    with pytest.raises(CheckpointError, match=r"refused to load .*dvae\.pt: it holds pickled"):
        load_dvae(dvae_run)
    assert not Payload.loaded

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) * 2 // 3])  # a write cut short: no zip directory
    result = CliRunner().invoke(main, ["evaluate", str(run_dir), "--no-probe"])
    one_line(result, f"cannot read checkpoint {ckpt}", "truncated or damaged")
    assert checkpoint_identity(run_dir)["step"] is None  # unreadable: no step, no traceback

    ckpt.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError, match=r"last\.ckpt is not a readable PyTorch checkpoint"):
        load_weights(ckpt)
    # the resume search skips it for the newest checkpoint that reads
    assert find_resume_checkpoint(run_dir / "checkpoints") != ckpt


# --------------------------------------------------------------------------------------------
# 4. One reader of run JSON files
# --------------------------------------------------------------------------------------------
def test_damaged_run_json_ends_evaluate_and_visualize_in_one_line(run_dir, tmp_path):
    """Rows 91-92: a damaged inputs.json ended evaluate and visualize in a bare JSONDecodeError;
    a dvae.json likewise load_dvae (tokenize). One line naming the file and how to recover."""
    from egoslots.pipeline.dvae import load_dvae

    inputs = run_dir / "inputs.json"
    original = inputs.read_text()
    inputs.write_text('{"store": ')
    for command in ("evaluate", "visualize"):
        result = CliRunner().invoke(main, [command, str(run_dir)])
        one_line(result, f"{inputs} (Expecting value", "it is damaged", "restore it from a copy")
    inputs.write_text("[1, 2]")
    result = CliRunner().invoke(main, ["evaluate", str(run_dir)])
    one_line(result, "holds a JSON list, not an object")
    inputs.write_text(original)

    info = run_dir.parent / "dvae" / "dvae.json"
    info.write_bytes(b"\xff\xfe not json")
    with pytest.raises(DamagedFile, match=rf"cannot read .*{re.escape(str(info))} .*damaged"):
        load_dvae(info.parent)


def test_one_reader_for_run_json(tmp_path, caplog):
    """Row 93: read_json: absent -> None, an object -> it, a folder, bad bytes or another JSON
    value -> DamagedFile naming the file; the frame cache's record when damaged is rebuilt."""
    from egoslots.stages.machinery.encoder_frames import _cache_record

    path = tmp_path / "x.json"
    assert read_json(path) is None
    path.write_text(json.dumps({"a": 1}))
    assert read_json(path) == {"a": 1}
    for content in (b"", b"{", b'"text"', b"\xff"):
        path.write_bytes(content)
        with pytest.raises(DamagedFile, match=re.escape(str(path))):
            read_json(path, "a test file")
    path.unlink()
    path.mkdir()
    with pytest.raises(DamagedFile, match="is not a file"):
        read_json(path)
    record = tmp_path / "frames.json"
    record.write_text("{")
    assert _cache_record(record) is None
    assert "rebuilding the frame cache" in caplog.text


def test_every_run_file_reader_uses_the_one_reader():
    """Row 93: no bare json.loads of a file in the stages, the cache or the pipeline (the ones
    left read a string, or catch the error themselves)."""
    allowed = {
        "pipeline/records.py",  # the one reader itself
        "stages/machinery/locks.py",  # a damaged lock counts as stale
        "stages/machinery/speed_probe.py",  # a damaged timing cache is empty
        "stages/make_synthetic.py",  # its own error line
        "stages/evaluate.py",  # unreadable metrics.json: recompute; meta.json: a warning
        "stages/export_slots.py",  # its docstring shows how to read an export
        "stages/machinery/slot_files.py",  # the npz's meta string
        "stages/visualize.py",  # dvae.json: no reconstructions, a warning
        "cache/store.py",  # a string
        "pipeline/data/frames.py",  # row 8
        "pipeline/backbones.py",  # its own error line
    }
    found = []
    for folder in ("stages", "cache", "pipeline"):
        for path in (REPO / folder).rglob("*.py"):
            rel = str(path.relative_to(REPO))
            if "json.load" in path.read_text() and rel not in allowed:
                found.append(rel)
    assert found == []


def test_npz_write_through_the_atomic_writer_keeps_the_old_file(tmp_path, monkeypatch):
    """Row 94: write_file with np.savez (export-slots' .npz), a GIF and a PNG (visualize): a
    failing write leaves the old file and no temporary."""
    from egoslots.stages.visualize import write_gif, write_strip

    images = np.zeros((3, 8, 8, 3), np.uint8)
    write_gif(tmp_path / "v.gif", images, fps=4)
    write_strip(tmp_path / "v.png", [images], max_columns=3)
    gif, png = (tmp_path / "v.gif").read_bytes(), (tmp_path / "v.png").read_bytes()
    assert gif[:6] == b"GIF89a" and png[:4] == b"\x89PNG"
    with monkeypatch.context() as m:
        disk_fills_while_writing(m, ".gif", after=10)
        with pytest.raises(OSError, match="No space left"):
            write_gif(tmp_path / "v.gif", images + 1, fps=4)
        disk_fills_while_writing(m, ".png", after=10)
        with pytest.raises(OSError, match="No space left"):
            write_strip(tmp_path / "v.png", [images + 1], max_columns=3)
    assert (tmp_path / "v.gif").read_bytes() == gif and (tmp_path / "v.png").read_bytes() == png
    assert sorted(os.listdir(tmp_path)) == ["v.gif", "v.png"]
