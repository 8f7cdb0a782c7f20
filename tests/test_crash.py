"""kill -9 every stage at seeded random points, rerun, and compare with an uninterrupted run.

Each test starts the real `cli.py` command in a subprocess, SIGKILLs its process group at a
point drawn from ``random.Random(seed)`` (tests/helpers/crashkit.py), checks the kill really landed
mid-run, reruns the same command to the end and compares the result with one uninterrupted run
of the same command:

- extract-features: the store is byte-identical (array data, done flags, video table), and the
  chunks finished before the kill were not written again;
- tokenize: the token ids are byte-identical;
- pretrain-dvae and train-slots: the rerun resumes at the newest checkpoint the killed run
  finished writing, and every checkpoint (step, weights, Adam state, lr schedule) and the
  final weights are bit-identical to the uninterrupted run's (CPU, fp32, fixed seed);
- no debris: the rerun leaves exactly the files the uninterrupted run has (no .partial chunk
  files, no temporary checkpoint files, no step=N-v1.ckpt).

The seeded kills are `slow` (2-3.5 minutes on this shared 2-core machine; CI runs them after
the default set). By default, in-process tests (~5 s) check what those kills found broken: a
training run resumed early (step < max_steps / 2) after the debris a kill leaves (last.ckpt
behind step=N.ckpt, a dead writer's temporary file) ends bit-identical to an uninterrupted one,
and tokenize removes .partial files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from egoslots.cache.store import FeatureStore
from tests.helpers.crashkit import (
    KillPoint,
    cli,
    count_done_flags,
    count_files,
    kill_mid_run,
    run_to_end,
)
from tests.helpers.data import write_extract_config, write_frame_folder
from tests.helpers.runs import copy_dvae_run, dvae_cfg, make_dvae_run, slot_cfg, slot_cfg_args
from tests.helpers.stores import assert_same_store, frames_store, only_store, slot_store

SEEDS = [0, 1, 2]
SLOW_SEEDS = [pytest.param(seed, marks=pytest.mark.slow) for seed in SEEDS]


def files_under(root: Path) -> set[str]:
    """Every file under ``root`` (hidden ones too), relative: a rerun must leave no debris."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def done_chunks(store: Path, done_array: str = "done") -> list[int]:
    flags = np.asarray(
        FeatureStore.open(store, require_complete=False).group[done_array][:], dtype=bool
    )
    return np.flatnonzero(flags).tolist()


def chunk_file_times(store: Path, arrays: tuple[str, ...], chunks: list[int]) -> dict[str, int]:
    """mtime of the files holding these chunks of these arrays: a rerun must not rewrite them."""
    opened = FeatureStore.open(store, require_complete=False)
    return {
        f"{name}/{c}": opened.chunk_file(name, c).stat().st_mtime_ns
        for name in arrays
        for c in chunks
    }


# --------------------------------------------------------------------------------------------
# Shared: checkpoints of two runs must hold the same training state
# --------------------------------------------------------------------------------------------
def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_identical(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values: equal bit for bit (NaN-free)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (
            f"{where}: keys {sorted(a)} != {sorted(b)}"
        )
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), (
            f"{where}: tensors differ"
        )
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


TRAINING_STATE = ("global_step", "state_dict", "optimizer_states", "lr_schedulers")


def assert_same_training_state(a: Path, b: Path) -> None:
    """Step, weights, optimizer state (Adam moments and step counts) and lr schedule are equal."""
    ca, cb = load_ckpt(a), load_ckpt(b)
    for key in TRAINING_STATE:
        assert (key in ca) == (key in cb), key
        if key in ca:
            assert_identical(ca[key], cb[key], f"{b.name}:{key}")


def assert_same_checkpoints(reference: Path, ours: Path) -> None:
    """The same checkpoint files (no step=N-v1.ckpt from redone steps, no temporary files of
    interrupted writes), each with the same training state: the ones the killed run wrote, the
    one the rerun resumed from and every later one."""
    assert files_under(ours) == files_under(reference)
    for name in sorted(files_under(reference)):
        assert_same_training_state(reference / name, ours / name)


def readable_steps(ckpt_dir: Path) -> dict[str, int]:
    """{file name: global_step} of every checkpoint that loads (a kill can truncate one)."""
    steps = {}
    for path in ckpt_dir.glob("*.ckpt"):
        try:
            steps[path.name] = int(load_ckpt(path)["global_step"])
        except Exception:  # noqa: BLE001 - truncated by the kill
            pass
    return steps


def resumed_from(output: str, ckpt_dir: Path) -> str:
    """The checkpoint file name a rerun says it resumed from."""
    names = [
        name
        for name in ("last.ckpt", *sorted(p.name for p in ckpt_dir.glob("step=*.ckpt")))
        if f"{ckpt_dir / name}" in output
    ]
    assert len(names) == 1, (
        f"no single resumed checkpoint named in the rerun's output: {names}\n{output[-2000:]}"
    )
    return names[0]


def check_resume(killed_steps: dict[str, int], ckpt_every: int, output: str, ckpt_dir: Path) -> int:
    """The rerun resumed from the newest checkpoint the killed run had finished writing (which
    may be a step=N.ckpt newer than last.ckpt); returns its step."""
    assert "resum" in output.lower()
    name = resumed_from(output, ckpt_dir)
    assert name in killed_steps, (
        f"resumed from {name}, which did not load after the kill: {killed_steps}"
    )
    step = killed_steps[name]
    assert step == max(killed_steps.values()) and step % ckpt_every == 0, (name, killed_steps)
    return step


# --------------------------------------------------------------------------------------------
# In-process, by default: a run interrupted early (step 5 of 12) and resumed ends bit-identical
# to an uninterrupted one, after the worst a kill -9 leaves in the checkpoint folder: last.ckpt
# one interval behind step=4.ckpt (killed between the two writes) and the temporary file of a
# write cut short. (The kill -9 tests below check the same through the real CLI.)
# --------------------------------------------------------------------------------------------
class Crash(RuntimeError):
    pass


def leave_kill_debris(ckpt_dir: Path) -> tuple[Path, Path]:
    """Make ``ckpt_dir`` (step=2, step=4, last=4) look like a kill -9 right after step=4.ckpt was
    written: last.ckpt still holds step 2, and a dead writer's temporary file lies beside them.
    Also adds the temporary file of a writer that still runs (our parent), which must be kept.
    Returns (dead writer's file, live writer's file)."""
    assert load_ckpt(ckpt_dir / "last.ckpt")["global_step"] == 4
    shutil.copyfile(ckpt_dir / "step=2.ckpt", ckpt_dir / "last.ckpt")
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = ckpt_dir / f".last.ckpt.tmp-{gone.pid}"
    live = (
        ckpt_dir / f".step=6.ckpt.tmp-{os.getppid()}"
    )  # not ours: this process writes .step=6.ckpt.tmp-PID
    for path in (stale, live):
        path.write_bytes(b"half a checkpoint")
    return stale, live


def assert_resumed_like_uninterrupted(full: Path, resumed: Path, live: Path) -> None:
    """The live writer's temporary file was kept; otherwise the same checkpoints as ``full``."""
    assert live.exists()
    live.unlink()
    assert_same_checkpoints(full, resumed)


def test_dvae_resumed_early_ends_bit_identical_to_uninterrupted(tmp_path):
    from lightning.pytorch.callbacks import Callback

    import egoslots.stages.pretrain_dvae as stage

    class CrashAt(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                raise Crash("step 5")

    ckpt_dirs, hashes = [], []
    for name in ("full", "resumed"):
        frames_store(tmp_path / name / "store.zarr")
        cfg = dvae_cfg(
            tmp_path / name,
            tmp_path / name / "store.zarr",
            "dvae.max_steps=12",
            "dvae.ckpt_every=2",
        )
        ckpt_dirs.append(tmp_path / name / "runs" / "dvae" / "checkpoints")
        if name == "resumed":
            with pytest.raises(Crash):
                stage.pretrain(cfg, callbacks=[CrashAt()], tokenize=False)
            assert not (
                ckpt_dirs[-1].parent / "dvae.pt"
            ).exists()  # no weights of an unfinished run
            stale, live = leave_kill_debris(ckpt_dirs[-1])
        stage.pretrain(cfg, tokenize=False)
        hashes.append(
            json.loads((tmp_path / name / "runs" / "dvae" / "dvae.json").read_text())["hash"]
        )
    assert not stale.exists()
    assert_resumed_like_uninterrupted(*ckpt_dirs, live)
    assert hashes[0] == hashes[1]  # dvae.pt: the same final weights


def test_train_slots_resumed_early_ends_bit_identical_to_uninterrupted(tmp_path, monkeypatch):
    from egoslots.stages import train_slots
    from egoslots.stages.machinery.slot_task import SlotTrainingModule

    def cfg(work):
        return slot_cfg(
            work,
            "trainer.max_steps=12",
            "trainer.ckpt_every=2",
            "trainer.val_every=3",
            "trainer.image_every=100",
        )

    real_step = SlotTrainingModule.training_step

    def crashing_step(self, batch, batch_idx):
        if self.global_step == 5:
            raise Crash("step 5")
        return real_step(self, batch, batch_idx)

    for name in ("full", "resumed"):
        slot_store(tmp_path / name)
        make_dvae_run(tmp_path / name)
    train_slots.train(cfg(tmp_path / "full"))
    with monkeypatch.context() as patch:
        patch.setattr(SlotTrainingModule, "training_step", crashing_step)
        with pytest.raises(Crash):
            train_slots.train(cfg(tmp_path / "resumed"))
    stale, live = leave_kill_debris(tmp_path / "resumed" / "runs" / "t" / "checkpoints")
    train_slots.train(cfg(tmp_path / "resumed"))
    assert not stale.exists()
    full, resumed = (tmp_path / run / "runs" / "t" / "checkpoints" for run in ("full", "resumed"))
    assert_resumed_like_uninterrupted(full, resumed, live)

    # killed between the last step=12.ckpt and last.ckpt: nothing is left to train, but last.ckpt
    # (what evaluate / export read) must catch up
    shutil.copyfile(resumed / "step=10.ckpt", resumed / "last.ckpt")
    train_slots.train(cfg(tmp_path / "resumed"))
    assert_same_checkpoints(full, resumed)


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


@pytest.mark.parametrize(
    "seed", [*SLOW_SEEDS, pytest.param(None, id="creating-the-store", marks=pytest.mark.slow)]
)
def test_extract_killed_at_random_chunk_then_rerun_is_byte_identical(extraction, tmp_path, seed):
    config, overrides, reference = extraction
    total = FeatureStore.open(reference).progress()[1]
    work = tmp_path / "work"
    command = cli("extract-features", config, f"work_dir={work}", *overrides)
    flags = count_done_flags(work, "stores/*.zarr/done/c/*")
    if (
        seed is None
    ):  # within 0.1 s of the store folder appearing: while it is created or its first chunk written
        point, progress = KillPoint.draw(0, 1, 1, max_delay=0.1), count_files(work, "stores/*.zarr")
    else:  # after 1 .. total-6 chunk flags, then up to one chunk's time more
        point, progress = KillPoint.draw(seed, 1, total - 6, max_delay=0.03), flags
    kill_mid_run(command, progress, point, tmp_path / "killed.log")

    store = only_store(work)
    done = sorted(
        int(p.name) for p in (store / "done" / "c").glob("*") if p.read_bytes() == b"\x01"
    )
    assert len(done) == flags() < total and (seed is None or len(done) >= point.after), (
        point,
        done,
    )
    assert (
        not (store / "zarr.json").exists()
        or not FeatureStore.open(store, require_complete=False).complete
    )
    kept = chunk_file_times(store, ("features", "frames", "done"), done) if done else {}

    rerun = run_to_end(command, tmp_path / "rerun.log")
    assert "store complete" in rerun
    assert_same_store(store, reference)
    assert files_under(store) == files_under(reference)
    assert chunk_file_times(store, ("features", "frames", "done"), done) == kept, (
        "the rerun redid finished chunks"
    )


# --------------------------------------------------------------------------------------------
# Stage 2: tokenize and pretrain-dvae
# --------------------------------------------------------------------------------------------
DVAE = {
    "vocab_size": 32,
    "hidden": 16,
    "batch_size": 8,
    "num_workers": 0,
    "log_every": 4,
    "image_every": 1000,
    "tau_steps": 40,
    "accelerator": "cpu",
    "precision": "32",
    "tokenize_batch_size": 4,
    "tokenize_device": "cpu",
}


def write_dvae_config(work: Path, store: Path, **dvae) -> Path:
    import yaml

    path = work / "dvae.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(
            {"work_dir": str(work), "store": str(store), "seed": 0, "dvae": {**DVAE, **dvae}}
        )
    )
    return path


@pytest.fixture(scope="module")
def dvae_for_tokens(tmp_path_factory):
    """A 2-step dVAE (64 px frames, 48 chunks of 8) trained in this process, not yet tokenized."""
    import egoslots.stages.pretrain_dvae as stage
    from egoslots.pipeline.config import load_config

    root = tmp_path_factory.mktemp("tokens")
    frames_store(root / "store.zarr", frames_per_video=64, chunk_len=8, size=64)
    cfg = load_config(
        write_dvae_config(root, root / "store.zarr", max_steps=2, ckpt_every=2, hidden=32), []
    )
    with torch.random.fork_rng():
        stage.pretrain(cfg, tokenize=False)
    return root


@pytest.fixture(scope="module")
def reference_tokens(dvae_for_tokens, tmp_path_factory):
    _, run_dir = copy_dvae_run(dvae_for_tokens, tmp_path_factory.mktemp("tokens-ref") / "w")
    run_to_end(cli("tokenize", run_dir))
    dvae_hash = json.loads((run_dir / "dvae.json").read_text())["hash"]
    return dvae_hash, FeatureStore.open(run_dir.parents[1] / "store.zarr")


@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_tokenize_killed_at_random_chunk_then_rerun_is_byte_identical(
    dvae_for_tokens, reference_tokens, tmp_path, seed
):
    dvae_hash, reference = reference_tokens
    _, run_dir = copy_dvae_run(dvae_for_tokens, tmp_path / "w")
    store_path = run_dir.parents[1] / "store.zarr"
    total = reference.progress()[1]
    flags = count_done_flags(store_path, f"tokens/{dvae_hash}/done/c/*")
    point = KillPoint.draw(seed, 1, total - 8, max_delay=0.02)
    killed = kill_mid_run(cli("tokenize", run_dir), flags, point, tmp_path / "killed.log")

    arrays = (f"tokens/{dvae_hash}/ids", f"tokens/{dvae_hash}/done")
    done = done_chunks(store_path, arrays[1])
    assert point.after <= len(done) == killed.progress < total, (point, done)  # really interrupted
    assert not FeatureStore.open(store_path).group[f"tokens/{dvae_hash}"].attrs.get("complete")
    kept = chunk_file_times(store_path, arrays, done)

    rerun = run_to_end(cli("tokenize", run_dir), tmp_path / "rerun.log")
    assert dvae_hash in rerun
    ids = FeatureStore.open(store_path).tokens(dvae_hash)  # complete, or this raises
    assert ids.dtype == np.uint16
    assert np.asarray(ids[:]).tobytes() == np.asarray(reference.tokens(dvae_hash)[:]).tobytes()
    assert files_under(store_path) == files_under(reference.path)
    assert chunk_file_times(store_path, arrays, done) == kept, "the rerun redid finished chunks"


def test_tokenize_removes_partial_files_of_killed_writes(dvae_for_tokens, tmp_path):
    """zarr writes a chunk to NAME.<uuid>.partial and renames it: a kill -9 mid-write leaves the
    .partial file (found by the test above). Finishing the tokens removes them."""
    import egoslots.stages.pretrain_dvae as stage

    _, run_dir = copy_dvae_run(dvae_for_tokens, tmp_path / "w")
    dvae_hash = json.loads((run_dir / "dvae.json").read_text())["hash"]
    store = FeatureStore.open(run_dir.parents[1] / "store.zarr", mode="r+")
    store.create_tokens(dvae_hash, (16, 16), {"vocab_size": 32})
    debris = (
        store.path / "tokens" / dvae_hash / "ids" / "c" / "3" / "0" / "0.0123456789abcdef.partial"
    )
    debris.parent.mkdir(parents=True)
    debris.write_bytes(b"half a chunk")
    assert stage.tokenize_run(run_dir) == dvae_hash
    assert not debris.exists()
    assert not list(store.path.rglob("*.partial"))


DVAE_STEPS, DVAE_CKPT = 48, 4


@pytest.fixture(scope="module")
def dvae_source(tmp_path_factory):

    root = tmp_path_factory.mktemp("dvae-src")
    frames_store(root / "store.zarr", frames_per_video=8, size=32)
    return root / "store.zarr"


def dvae_work(store: Path, work: Path) -> list[str]:
    """A fresh work dir with its own copy of the store; returns the pretrain-dvae command."""
    work.mkdir(parents=True)
    shutil.copytree(store, work / "store.zarr")
    config = write_dvae_config(
        work, work / "store.zarr", max_steps=DVAE_STEPS, ckpt_every=DVAE_CKPT
    )
    return cli("pretrain-dvae", config)


@pytest.fixture(scope="module")
def reference_dvae(dvae_source, tmp_path_factory):
    work = tmp_path_factory.mktemp("dvae-ref") / "w"
    run_to_end(dvae_work(dvae_source, work))
    return work / "runs" / "dvae"


@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_pretrain_dvae_killed_after_random_checkpoint_resumes_bit_identically(
    dvae_source, reference_dvae, tmp_path, seed
):
    work = tmp_path / "w"
    command = dvae_work(dvae_source, work)
    run_dir = work / "runs" / "dvae"
    ckpt_dir = run_dir / "checkpoints"
    # after the 1st .. 9th of 12 step=N.ckpt files, then up to 0.1 s more (a few steps; maybe
    # into the next checkpoint's write)
    point = KillPoint.draw(seed, 1, DVAE_STEPS // DVAE_CKPT - 3, max_delay=0.1)
    kill_mid_run(command, count_files(ckpt_dir, "step=*.ckpt"), point, tmp_path / "killed.log")
    assert (
        not (run_dir / "dvae.json").exists() and not (run_dir / "dvae.pt").exists()
    )  # killed mid-training
    killed_steps = readable_steps(ckpt_dir)
    assert killed_steps and max(killed_steps.values()) < DVAE_STEPS

    rerun = run_to_end(command, tmp_path / "rerun.log")
    check_resume(killed_steps, DVAE_CKPT, rerun, ckpt_dir)
    assert_same_checkpoints(reference_dvae / "checkpoints", ckpt_dir)
    ours, theirs = (json.loads((d / "dvae.json").read_text()) for d in (run_dir, reference_dvae))
    assert ours["steps"] == theirs["steps"] == DVAE_STEPS
    assert ours["hash"] == theirs["hash"]  # sha256 of dvae.pt: the final weights are bit-identical
    FeatureStore.open(work / "store.zarr").tokens(ours["hash"])  # and the store was tokenized


# --------------------------------------------------------------------------------------------
# Stage 3: train-slots
# --------------------------------------------------------------------------------------------
SLOT_STEPS, SLOT_CKPT = 40, 4


@pytest.fixture(scope="module")
def slot_source(tmp_path_factory):
    """A tiny store with features + tokens of a (recorded, not trained) dVAE run."""

    root = tmp_path_factory.mktemp("slots-src")
    slot_store(root)
    make_dvae_run(root)
    return root


def slot_work(source: Path, work: Path) -> list[str]:
    """A fresh work dir with its own copy of the store; returns the train-slots command."""

    shutil.copytree(source, work)
    config = work / "slots.yaml"
    config.write_text("globals:\n  NUM_SLOTS: 3\n")
    return cli(
        "train-slots",
        config,
        *slot_cfg_args(work),
        "seed=0",
        "trainer.accelerator=cpu",
        "dataset.num_workers=1",
        "optimizer.warmup_steps=4",
        f"trainer.max_steps={SLOT_STEPS}",
        f"trainer.ckpt_every={SLOT_CKPT}",
        "trainer.val_every=6",
        "trainer.val_batches=1",
        "trainer.log_every=2",
        "trainer.image_every=10",
    )


@pytest.fixture(scope="module")
def reference_slots(slot_source, tmp_path_factory):
    work = tmp_path_factory.mktemp("slots-ref") / "w"
    run_to_end(slot_work(slot_source, work))
    return work / "runs" / "t"


@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_train_slots_killed_after_random_checkpoint_resumes_bit_identically(
    slot_source, reference_slots, tmp_path, seed
):
    work = tmp_path / "w"
    command = slot_work(slot_source, work)
    ckpt_dir = work / "runs" / "t" / "checkpoints"
    # after the 1st .. 7th of 10 step=N.ckpt files, then up to 0.15 s more
    point = KillPoint.draw(seed, 1, SLOT_STEPS // SLOT_CKPT - 3, max_delay=0.15)
    kill_mid_run(command, count_files(ckpt_dir, "step=*.ckpt"), point, tmp_path / "killed.log")
    killed_steps = readable_steps(ckpt_dir)
    assert killed_steps and max(killed_steps.values()) < SLOT_STEPS  # killed mid-training

    rerun = run_to_end(command, tmp_path / "rerun.log")
    check_resume(killed_steps, SLOT_CKPT, rerun, ckpt_dir)
    assert_same_checkpoints(reference_slots / "checkpoints", ckpt_dir)
    assert load_ckpt(ckpt_dir / "last.ckpt")["global_step"] == SLOT_STEPS
