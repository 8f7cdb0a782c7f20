"""Bad inputs not covered elsewhere (see docs/bad-inputs.md for the whole sweep)."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

import egoslots.stages.pretrain_dvae as stage_dvae
from egoslots.cache.store import FeatureStore, StoreError
from egoslots.pipeline.config import ConfigError, load_config
from egoslots.pipeline.data.base import SourceError
from egoslots.pipeline.data.frames import FrameFolderSource
from egoslots.pipeline.dvae import load_dvae
from egoslots.stages.machinery import dvae_task
from egoslots.stages.machinery.common import StageError
from egoslots.stages.tokenize import TokenWriteError, tokenize_run
from tests.helpers.data import extract_cfg, memory_source
from tests.helpers.runs import make_dvae_run, slot_args, slot_cfg
from tests.helpers.stores import assert_same_store, frames_store, slot_store

REPO = Path(__file__).resolve().parents[1]


def test_empty_and_16bit_png(tmp_path):
    (tmp_path / "v").mkdir()
    Image.fromarray(np.full((12, 16), 65535, np.uint16)).save(tmp_path / "v" / "frame0.png")
    (tmp_path / "v" / "frame1.png").write_bytes(b"")
    frames = FrameFolderSource(tmp_path).read_frames("v", 0, 1)
    rgb = next(iter(frames)).rgb
    assert rgb.dtype == np.uint8 and rgb.shape == (12, 16, 3) and rgb.max() == 255
    with pytest.raises(
        SourceError, match=r"frame1\.png: frame 1 of video 'v': cannot decode image"
    ):
        list(FrameFolderSource(tmp_path).read_frames("v", 1, 2))


def test_zarr_group_that_is_not_an_egoslots_store(tmp_path):
    (tmp_path / "stores").mkdir()
    zarr.open_group(str(tmp_path / "stores" / "abc.zarr"), mode="w").create_array(
        "x", shape=(3,), dtype="f4"
    )
    with pytest.raises(
        StoreError, match=r"abc\.zarr is a zarr group but not an egoslots feature store"
    ):
        FeatureStore.open(tmp_path / "stores" / "abc.zarr")


def test_nan_features_stop_train_slots_naming_the_step(tmp_path):
    from egoslots.stages.train_slots import train

    store = slot_store(tmp_path)
    make_dvae_run(tmp_path)
    zarr.open_array(str(store.path) + "/features", mode="r+")[:] = np.nan
    with pytest.raises(StageError, match=r"NaN/inf at step \d+") as info:
        train(
            slot_cfg(
                tmp_path, "trainer.max_steps=3", "trainer.val_every=100", "trainer.image_every=100"
            )
        )
    assert f"`egoslots cache verify {store.path}`" in str(
        info.value
    )  # the command that finds the bad chunks
    assert not (tmp_path / "runs" / "t" / "checkpoints" / "last.ckpt").exists()


# ---------------------------------------------------------------------------- unwritable output
# We run as root, so chmod proves nothing: the real write raises the OSError a read-only mount,
# a directory of another user or a full disk would raise.
def _fail_open_for(monkeypatch, name: str, err: int):
    """Make the open-for-write of file ``name`` (its temporary file: every write is atomic) fail
    like the OS would."""
    import builtins

    real = builtins.open

    def failing(file, mode="r", *args, **kwargs):
        if (
            "w" in str(mode)
            and isinstance(file, (str, os.PathLike))
            and Path(file).name.startswith(f".{name}.tmp")
        ):
            raise (PermissionError if err in (errno.EACCES, errno.EPERM) else OSError)(
                err, os.strerror(err), str(file)
            )
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing)


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def test_extraction_store_on_read_only_or_forbidden_disk_keeps_chunks_and_resumes(
    tmp_path, monkeypatch
):
    """EROFS then EACCES at the real zarr chunk write: StoreError naming chunk, store and errno
    meaning; finished chunks kept; the rerun after the fix equals a one-shot extraction."""
    import zarr.storage._local as zarr_local

    from egoslots.stages.extract_features import extract

    source = memory_source()
    clean = extract(extract_cfg(tmp_path / "clean"), source=source)
    real_put, state = zarr_local._put, {"n": 0, "fail": {3: errno.EROFS}}

    def put(path, value, exclusive=False):
        if "/c/" in str(path) and "/features/" in str(path):
            state["n"] += 1
            if state["n"] in state["fail"]:
                raise OSError(
                    state["fail"][state["n"]], os.strerror(state["fail"][state["n"]]), str(path)
                )
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(zarr_local, "_put", put)
    cfg = extract_cfg(tmp_path / "ro")
    with pytest.raises(
        StoreError, match=r"cannot write chunk 2 of .*ro/stores/.*Read-only file system"
    ) as info:
        extract(cfg, source=source)
    assert "rerun the same command" in str(info.value)
    store_path = tmp_path / "ro" / "stores" / clean.name
    assert (
        FeatureStore.open(store_path, require_complete=False).progress()[0] == 2
    )  # chunks 0, 1 kept

    state.update(n=0, fail={2: errno.EACCES})  # the rerun hits a directory it may not write
    with pytest.raises(StoreError, match=r"cannot write chunk 3 of .*Permission denied"):
        extract(cfg, source=source)
    assert FeatureStore.open(store_path, require_complete=False).progress()[0] == 3

    state.update(n=0, fail={})  # fixed: the rerun finishes the pending chunks only
    assert_same_store(extract(cfg, source=source), clean)
    assert state["n"] == FeatureStore.open(store_path).progress()[1] - 3  # 3 chunks were kept


def _dvae_overrides(root: Path, store: Path) -> list[str]:
    return [
        f"work_dir={root}",
        f"store={store}",
        "dvae.vocab_size=16",
        "dvae.hidden=8",
        "dvae.batch_size=4",
        "dvae.num_workers=0",
        "dvae.max_steps=4",
        "dvae.ckpt_every=2",
        "dvae.log_every=1",
        "dvae.image_every=100",
        "dvae.accelerator=cpu",
        "dvae.precision=32",
    ]


def test_unwritable_dvae_run_dir_names_the_file_and_keeps_checkpoints(tmp_path, monkeypatch):
    """pretrain-dvae: EACCES on the step-4 checkpoint (Lightning alone would swallow it and go on)
    and EROFS on config.yaml give one line naming the file and the errno's meaning, no traceback;
    step 2 stays intact and the rerun after the fix resumes from it."""
    from click.testing import CliRunner

    from egoslots import cli

    frames_store(tmp_path / "store.zarr")
    args = [
        "pretrain-dvae",
        str(REPO / "configs" / "base.yaml"),
        *_dvae_overrides(tmp_path, tmp_path / "store.zarr"),
    ]
    run_dir = tmp_path / "runs" / "dvae"
    runner = CliRunner()

    with monkeypatch.context() as m:
        _fail_open_for(m, "step=4.ckpt", errno.EACCES)
        result = runner.invoke(cli.main, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert re.search(r"cannot write .*step=4\.ckpt: Permission denied \(EACCES\)", result.output), (
        result.output
    )
    assert "are kept" in result.output and "rerun the same command" in result.output
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step=2.ckpt"]
    assert _step(ckpts / "last.ckpt") == _step(ckpts / "step=2.ckpt") == 2
    assert not (run_dir / "dvae.pt").exists()

    with monkeypatch.context() as m:  # a read-only mount: the very first write, config.yaml
        _fail_open_for(m, "config.yaml", errno.EROFS)
        result = runner.invoke(cli.main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert re.search(
        r"cannot write .*config\.yaml: Read-only file system \(EROFS\)", result.output
    ), result.output
    assert _step(ckpts / "last.ckpt") == 2

    starts = []
    monkeypatch.setattr(
        dvae_task.DVAETask, "on_train_start", lambda self: starts.append(self.global_step)
    )
    result = runner.invoke(cli.main, args)  # fixed: resumes at step 2 and finishes
    assert result.exit_code == 0, result.output
    assert starts == [2]
    assert json.loads((run_dir / "dvae.json").read_text())["steps"] == 4


def test_tokenize_disk_full_or_read_only_store_is_one_clear_error_and_resumes(
    tmp_path, monkeypatch
):
    """ENOSPC (then EROFS) at the real zarr write of token ids: one line naming the chunk, the store
    and the command to rerun; finished token chunks kept; the rerun writes only the rest."""
    from click.testing import CliRunner

    from egoslots import cli

    frames_store(tmp_path / "store.zarr")
    run_dir = stage_dvae.pretrain(
        load_config(None, _dvae_overrides(tmp_path, tmp_path / "store.zarr")), tokenize=False
    )
    real_setitem, state = zarr.Array.__setitem__, {"n": 0, "fail": {3: errno.ENOSPC}}

    def setitem(self, key, value):
        if self.path.endswith("/ids"):
            state["n"] += 1
            if state["n"] in state["fail"]:
                raise OSError(
                    state["fail"][state["n"]], os.strerror(state["fail"][state["n"]]), self.path
                )
        return real_setitem(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", setitem)
    runner = CliRunner()
    result = runner.invoke(cli.main, ["tokenize", str(run_dir)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert re.search(
        r"cannot write token chunk 2 of .*store\.zarr: No space left on device \(ENOSPC\)",
        result.output,
    )
    assert (
        f"egoslots tokenize {run_dir}" in result.output
        and "Finished token chunks are kept" in result.output
    )
    dvae_hash = json.loads((run_dir / "dvae.json").read_text())["hash"]
    assert list(
        FeatureStore.open(tmp_path / "store.zarr").group[f"tokens/{dvae_hash}/done"][:]
    ) == [1, 1, 0, 0, 0, 0]

    state.update(n=0, fail={1: errno.EROFS})
    with pytest.raises(
        TokenWriteError, match=r"cannot write token chunk 2 .*Read-only file system"
    ) as info:
        tokenize_run(run_dir)
    assert isinstance(info.value, StoreError) and isinstance(info.value, OSError)
    assert info.value.errno == errno.EROFS

    state.update(n=0, fail={})
    assert tokenize_run(run_dir) == dvae_hash
    assert state["n"] == 4  # only chunks 2..5 were written again
    tokens = FeatureStore.open(tmp_path / "store.zarr").tokens(dvae_hash)[:]
    frames = (
        torch.from_numpy(FeatureStore.open(tmp_path / "store.zarr").frames[:]).permute(0, 3, 1, 2)
        / 255
    )
    assert np.array_equal(tokens, load_dvae(run_dir).encode_ids(frames.float()).numpy())


def _slots_args(work: Path, *extra: str) -> list[str]:
    return [*slot_args(work), "trainer.val_every=100", "trainer.image_every=100", *extra]


def test_unwritable_train_slots_run_dir_names_the_file_and_keeps_checkpoints(tmp_path, monkeypatch):
    """train-slots: EACCES on inputs.json, then on the step-4 checkpoint, then ENOSPC on last.ckpt:
    one line each naming the file and the errno's meaning; step 2 intact; the rerun resumes."""
    from click.testing import CliRunner

    from egoslots import cli

    slot_store(tmp_path)
    make_dvae_run(tmp_path)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("seed: 0\n")
    args = ["train-slots", str(cfg_file), *_slots_args(tmp_path)]
    ckpts = tmp_path / "runs" / "t" / "checkpoints"
    runner = CliRunner()

    with monkeypatch.context() as m:
        _fail_open_for(m, "inputs.json", errno.EACCES)
        result = runner.invoke(cli.main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert re.search(
        r"cannot write .*inputs\.json: Permission denied \(EACCES\): make it writable",
        result.output,
    ), result.output

    for name, err, meaning in (
        ("step=4.ckpt", errno.EACCES, "Permission denied"),
        ("last.ckpt", errno.ENOSPC, "No space left on device"),
    ):
        with monkeypatch.context() as m:
            _fail_open_for(m, name, err)
            result = runner.invoke(cli.main, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert re.search(
            rf"cannot write .*{re.escape(name)}: {meaning} \({errno.errorcode[err]}\)",
            result.output,
        )
        assert f"Checkpoints already in {ckpts} are kept" in result.output
        assert _step(ckpts / "step=2.ckpt") == 2
    assert _step(ckpts / "last.ckpt") == 2  # the failed writes never replaced it
    assert not list(ckpts.glob(".*"))  # and left no temporary files behind

    result = runner.invoke(cli.main, args)  # fixed: resumes from step 2 (or 4) and finishes
    assert result.exit_code == 0, result.output
    assert _step(ckpts / "last.ckpt") == 4


# ---------------------------------------------------------------------------- foreign checkpoints
def test_checkpoint_of_another_architecture_is_refused_by_resume_and_evaluate(tmp_path):
    """A checkpoint with other NUM_SLOTS / SLOT_DIM: --resume and evaluate name the checkpoint, the
    weights whose shapes differ and the config keys behind them (no load_state_dict traceback)."""
    import shutil

    from click.testing import CliRunner

    from egoslots import cli
    from egoslots.stages.machinery.inference import load_trained
    from egoslots.stages.train_slots import train

    slot_store(tmp_path)
    make_dvae_run(tmp_path)
    other = train(
        slot_cfg(
            tmp_path,
            "run_name=other",
            "globals.NUM_SLOTS=4",
            "globals.SLOT_DIM=8",
            "trainer.max_steps=2",
            "trainer.image_every=100",
        )
    )
    foreign = other / "checkpoints" / "last.ckpt"

    with pytest.raises(StageError) as info:
        train(slot_cfg(tmp_path, "run_name=mine", "trainer.max_steps=4"), resume=foreign)
    message = str(info.value)
    assert str(foreign) in message and "differ in shape" in message
    assert (
        "globals.NUM_SLOTS=4 (checkpoint) vs 3" in message
        and "globals.SLOT_DIM=8 (checkpoint) vs 16" in message
    )
    assert re.search(r"\(\d+, 8\) vs \(\d+, 16\)", message)  # a weight's two shapes
    assert not (tmp_path / "runs" / "mine" / "checkpoints" / "last.ckpt").exists()

    mine = train(
        slot_cfg(tmp_path, "run_name=mine", "trainer.max_steps=2", "trainer.image_every=100")
    )
    shutil.copy(foreign, mine / "checkpoints" / "step=99.ckpt")  # copied in from the other run
    with pytest.raises(
        StageError,
        match=r"step=99\.ckpt holds another slot model than run .*mine.*"
        r"globals\.NUM_SLOTS=4 \(checkpoint\) vs 3",
    ):
        load_trained(mine, "step=99")
    result = CliRunner().invoke(
        cli.main, ["evaluate", str(mine), "--checkpoint", "step=99", "--no-probe"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        "step=99.ckpt holds another slot model" in result.output
        and "globals.SLOT_DIM" in result.output
    )
    load_trained(mine, "last")  # the run's own checkpoint still loads


def test_resume_from_a_dvae_or_pickled_object_checkpoint_is_refused(tmp_path):
    """--resume with a pretrain-dvae .ckpt, or a .ckpt carrying arbitrary pickled objects (loaded
    with weights_only=True, so never executed): one error naming the file."""
    from egoslots.stages.train_slots import train

    slot_store(tmp_path)
    make_dvae_run(tmp_path)
    torch.save(
        {
            "state_dict": {"dvae.encoder.0.conv.weight": torch.zeros(2)},
            "global_step": 1,
            "hyper_parameters": {"vocab_size": 16},
        },
        tmp_path / "dvae.ckpt",
    )
    with pytest.raises(StageError, match=r"dvae\.ckpt is not a train-slots checkpoint"):
        train(slot_cfg(tmp_path, "trainer.max_steps=2"), resume=tmp_path / "dvae.ckpt")

    torch.save({"state_dict": {}, "global_step": 1, "payload": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(StageError, match=r"refused to load .*evil\.ckpt.*weights_only=True"):
        train(slot_cfg(tmp_path, "trainer.max_steps=2"), resume=tmp_path / "evil.ckpt")
    assert not Payload.loaded
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "dvae.ckpt").read_bytes()[:50])
    with pytest.raises(StageError, match=r"cannot read checkpoint .*cut\.ckpt"):
        train(slot_cfg(tmp_path, "trainer.max_steps=2"), resume=tmp_path / "cut.ckpt")


class Payload:
    """Stands for a malicious object: unpickling it would run code (here: set a flag)."""

    loaded = False

    def __reduce__(self):
        return (_mark_loaded, ())


def _mark_loaded():
    Payload.loaded = True
    return None


def test_pretrain_dvae_resume_from_another_dvae_is_refused(tmp_path):
    frames_store(tmp_path / "store.zarr")
    base = _dvae_overrides(tmp_path, tmp_path / "store.zarr")
    run_dir = stage_dvae.pretrain(load_config(None, [*base, "dvae.max_steps=2"]), tokenize=False)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    cfg = load_config(None, [*base, "dvae.run_name=wide", "dvae.vocab_size=32", "dvae.hidden=12"])
    with pytest.raises(
        ConfigError,
        match=r"last\.ckpt holds another dVAE than this config: dvae\.vocab_size=16 "
        r"\(checkpoint\) vs 32, dvae\.hidden=8 \(checkpoint\) vs 12",
    ):
        stage_dvae.pretrain(cfg, resume=ckpt, tokenize=False)
    assert not (tmp_path / "runs" / "wide" / "checkpoints").exists()


def test_pretrain_dvae_refuses_another_arch(tmp_path):
    """dvae.arch is part of the network: no resume or run-directory reuse across archs; runs
    and checkpoints from before the key existed count as SLATE's (what they were)."""
    frames_store(tmp_path / "store.zarr")
    base = _dvae_overrides(tmp_path, tmp_path / "store.zarr")
    run_dir = stage_dvae.pretrain(load_config(None, [*base, "dvae.max_steps=2"]), tokenize=False)
    assert json.loads((run_dir / "dvae.json").read_text())["arch"] == "steve"
    slate = load_config(None, [*base, "dvae.max_steps=3", "dvae.arch=slate"])
    with pytest.raises(
        ConfigError, match=r"holds a dVAE with dvae.arch=steve, this config asks for slate"
    ):
        stage_dvae.pretrain(slate, tokenize=False)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    other = load_config(None, [*base, "dvae.run_name=other", "dvae.arch=slate"])
    with pytest.raises(ConfigError, match=r"dvae\.arch=steve \(checkpoint\) vs slate"):
        stage_dvae.pretrain(other, resume=ckpt, tokenize=False)
    old = torch.load(ckpt, weights_only=False)
    del old["hyper_parameters"]["arch"]  # a checkpoint written before dvae.arch existed
    torch.save(old, tmp_path / "old.ckpt")
    steve = load_config(None, [*base, "dvae.run_name=third"])
    with pytest.raises(ConfigError, match=r"dvae\.arch=slate \(checkpoint\) vs steve"):
        stage_dvae.pretrain(steve, resume=tmp_path / "old.ckpt", tokenize=False)
    with pytest.raises(
        ConfigError, match=r"dvae.arch='vqvae' is not allowed: must be one of steve, slate"
    ):
        load_config(None, [*base, "dvae.arch=vqvae"])


def test_checkpoint_writer_round_trips_locally_and_on_object_stores(tmp_path):
    """RaisingCheckpointIO writes what torch.load reads back, on disk (atomic rename) and through fsspec."""
    import fsspec

    from egoslots.stages.machinery.training import RaisingCheckpointIO

    state = {"state_dict": {"w": torch.arange(6.0)}, "global_step": 7}
    io = RaisingCheckpointIO()
    io.save_checkpoint(state, tmp_path / "a" / "last.ckpt")
    assert _step(tmp_path / "a" / "last.ckpt") == 7 and not list((tmp_path / "a").glob(".*"))
    io.save_checkpoint(state, "memory://egoslots-test/last.ckpt")
    with fsspec.open("memory://egoslots-test/last.ckpt", "rb") as f:
        assert torch.equal(torch.load(f, weights_only=True)["state_dict"]["w"], torch.arange(6.0))
