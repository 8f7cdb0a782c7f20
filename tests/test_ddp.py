"""Stages 2 and 3 under DDP: 2 CPU processes (gloo) train exactly what 1 process with the global batch trains.

The 2-process run is `torchrun --nproc-per-node 2 cli.py train-slots ...` (Lightning picks the
torchrun environment up); every rank reads its own half of the one global sample stream and the
slot-slot contrast sees the all-gathered global batch (losses.loss_ss.all_gather=true), so after
N steps its weights must equal those of a 1-process run with twice the per-device batch.
Float32, no dropout, fixed (learned) slot init: nothing random differs between the two runs.
`pretrain-dvae` likewise: each frame's Gumbel noise is keyed by its place in the global sample
stream and GECO follows the global batch's error, so 2 ranks train the weights of 1 process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers.runs import make_dvae_run
from tests.helpers.stores import frames_store, slot_store

REPO = Path(__file__).resolve().parents[1]
PER_DEVICE = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(work: Path, run_name: str, batch: int, *extra: str) -> list[str]:
    return [
        f"work_dir={work}",
        "store=fp0",
        f"run_name={run_name}",
        "seed=0",
        "globals.NUM_SLOTS=3",
        "globals.SLOT_DIM=16",
        "globals.VOCAB_SIZE=16",
        "globals.NUM_FRAMES=3",
        f"globals.BATCH_SIZE_PER_GPU={batch}",
        "globals.USE_STEVE_DECODER=true",
        "dataset.num_workers=0",
        "decoder.hidden_dims=[32,32]",
        "steve_decoder.num_blocks=1",
        "steve_decoder.d_model=16",
        "steve_decoder.num_heads=2",
        "steve_decoder.dropout=0.0",
        "predictor.num_heads=2",
        "model.initializer.name=fixed",
        "losses.loss_ss.all_gather=true",
        "losses.loss_ss.batch_contrast=true",
        "optimizer.warmup_steps=1",
        "optimizer.lr=0.003",
        f"trainer.max_steps={STEPS}",
        f"trainer.ckpt_every={STEPS}",
        f"trainer.val_every={STEPS}",
        "trainer.val_batches=1",
        "trainer.log_every=1",
        "trainer.image_every=1000",
        "trainer.precision=32",
        "trainer.accelerator=cpu",
        "trainer.compile=false",
        *extra,
    ]


def weights(run: Path) -> dict:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}


def test_two_process_ddp_equals_one_process_with_the_global_batch(tmp_path):
    slot_store(
        tmp_path, videos=(("a", 8, "train"), ("b", 8, "train"), ("c", 7, "train"), ("v", 6, "val"))
    )
    make_dvae_run(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    # 2 processes, batch 2 each, via torchrun (the documented multi-GPU / multi-node launch)
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "cli.py",
            "train-slots",
            "configs/base.yaml",
            *overrides(tmp_path, "ddp", PER_DEVICE, "trainer.devices=2", "trainer.strategy=ddp"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]

    # 1 process, batch 4, in this process
    from egoslots.pipeline.config import load_config
    from egoslots.stages.train_slots import train

    single = train(
        load_config(REPO / "configs/base.yaml", overrides(tmp_path, "single", 2 * PER_DEVICE))
    )

    a, b = weights(tmp_path / "runs" / "ddp"), weights(single)
    assert a.keys() == b.keys() and a
    # Adam turns float rounding in a near-zero gradient (e.g. attention key biases) into steps of
    # up to lr; a wrong gradient anywhere moves weights by ~lr per step (3e-3 here).
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 2e-4, (worst, diffs[worst])
    assert sorted(diffs.values())[len(diffs) // 2] < 1e-6  # the typical tensor agrees to rounding


def test_ranks_draw_disjoint_slices_whose_union_is_the_one_process_stream():
    from egoslots.stages.machinery.training import ResumableRandomSampler

    batch, world, steps = 3, 4, 30_000  # crosses the sampler's 65,536-draw blocks
    single = list(ResumableRandomSampler(50, total=steps * batch * world, seed=7))
    ranks = [
        list(
            ResumableRandomSampler(
                50, total=steps * batch, seed=7, batch=batch, rank=r, world=world
            )
        )
        for r in range(world)
    ]
    joined = [
        i for s in range(steps) for r in range(world) for i in ranks[r][s * batch : (s + 1) * batch]
    ]
    assert joined == single
    assert ranks[0][:batch] != ranks[1][:batch]  # not the same draws on every rank
    resumed = list(
        ResumableRandomSampler(
            50, total=steps * batch, seed=7, start=1234 * batch, batch=batch, rank=2, world=world
        )
    )
    assert resumed == ranks[2][1234 * batch :]


def test_pretrain_dvae_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    """`pretrain-dvae` under torchrun (2 gloo ranks, batch 4 each) == 1 process with batch 8; rank 0
    alone writes the run directory and tokenizes the store."""

    from egoslots.cache.store import FeatureStore
    from egoslots.pipeline.config import load_config
    from egoslots.stages.pretrain_dvae import pretrain

    frames_store(tmp_path / "store.zarr")
    dvae = [
        "dvae.vocab_size=16",
        "dvae.hidden=8",
        "dvae.num_workers=0",
        "dvae.max_steps=4",
        "dvae.ckpt_every=2",
        "dvae.log_every=1",
        "dvae.image_every=2",
        "dvae.tau_steps=4",
        "dvae.lr=0.003",
        "dvae.accelerator=cpu",
        "dvae.precision=32",
        "dvae.tokenize_batch_size=16",
        "dvae.kl_weight=0.1",
        "dvae.geco.enabled=true",
        "dvae.geco.warmup_steps=0",
        "dvae.geco.target=0.001",
        "dvae.geco.eta=0.01",
        "seed=3",
    ]
    common = [f"work_dir={tmp_path}", f"store={tmp_path / 'store.zarr'}", *dvae]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "cli.py",
            "pretrain-dvae",
            "configs/base.yaml",
            *common,
            "dvae.run_name=ddp",
            "dvae.batch_size=4",
            "dvae.devices=2",
            "dvae.strategy=ddp",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    single = pretrain(
        load_config(
            REPO / "configs/base.yaml", [*common, "dvae.run_name=one", "dvae.batch_size=8"]
        ),
        tokenize=False,
    )

    ddp_run = tmp_path / "runs" / "ddp"
    assert sorted(p.name for p in (ddp_run / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt",
        "step=2.ckpt",
        "step=4.ckpt",
    ]
    a = torch.load(ddp_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    b = torch.load(single / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    assert a.keys() == b.keys() and "geco.beta" in a
    assert (
        float(a["geco.beta"]) != 1.0
    )  # the GECO multiplier moved, and moved the same way in both runs
    diffs = {
        k: (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()
    }
    worst = max(diffs, key=diffs.get)
    # a wrong batch, wrong noise or a rank-local GECO moves weights by ~lr (3e-3) per step
    assert diffs[worst] < 1e-4, (worst, diffs[worst])
    assert sorted(diffs.values())[len(diffs) // 2] < 1e-6

    info = json.loads((ddp_run / "dvae.json").read_text())  # rank 0 exported and tokenized
    assert info["steps"] == 4
    assert FeatureStore.open(tmp_path / "store.zarr").tokens(info["hash"]).shape[0] == 48


NAN_DRIVER = """
import os, sys
sys.path.insert(0, {repo!r})
import egoslots.stages.machinery.dvae_task as task
import egoslots.stages.pretrain_dvae as stage
from egoslots.pipeline.config import load_config
from egoslots.stages.machinery.common import TrainingDiverged

rank, calls, real = int(os.environ["RANK"]), [0], task.reconstruction_loss

def poisoned(recon, frames):  # rank 1 alone: a NaN reconstruction in its 4th step (step 4)
    calls[0] += 1
    return real(recon * float("nan") if rank == 1 and calls[0] == 4 else recon, frames)

task.reconstruction_loss = poisoned
try:
    stage.pretrain(load_config(None, sys.argv[1:]), tokenize=False)
except TrainingDiverged as err:
    print(f"rank {{rank}}: {{err}}", flush=True)
    sys.exit(3)
"""


def test_pretrain_dvae_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    """A NaN loss on rank 1 only: both ranks agree on the step and stop together (no hang, no rank
    killed mid-collective), and no checkpoint after it is written."""

    frames_store(tmp_path / "store.zarr")
    (tmp_path / "driver.py").write_text(NAN_DRIVER.format(repo=str(REPO)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            str(tmp_path / "driver.py"),
            f"work_dir={tmp_path}",
            f"store={tmp_path / 'store.zarr'}",
            "dvae.vocab_size=16",
            "dvae.hidden=8",
            "dvae.batch_size=4",
            "dvae.num_workers=0",
            "dvae.max_steps=8",
            "dvae.ckpt_every=2",
            "dvae.log_every=1",
            "dvae.image_every=100",
            "dvae.accelerator=cpu",
            "dvae.precision=32",
            "dvae.devices=2",
            "dvae.strategy=ddp",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout + run.stderr
    assert run.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: the dVAE loss became NaN/inf at step 4" in out, out[-3000:]
    ckpts = tmp_path / "runs" / "dvae" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step=2.ckpt"]
    assert (
        torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    )


SLOTS_NAN_DRIVER = """
import os, sys
sys.path.insert(0, {repo!r})
import egoslots.stages.train_slots as stage
from egoslots.pipeline.config import load_config
from egoslots.stages.machinery.common import StageError
from egoslots.stages.machinery.slot_task import SlotTrainingModule

rank, real = int(os.environ["RANK"]), SlotTrainingModule._step

def poisoned(self, batch):  # rank 1 alone sees a NaN loss at training step 2 (reported as step 3)
    outputs, losses = real(self, batch)
    if rank == 1 and self.training and self.global_step == 2:
        losses["loss"] = losses["loss"] * float("nan")
    return outputs, losses

SlotTrainingModule._step = poisoned
try:
    stage.train(load_config({base!r}, sys.argv[1:]))
except StageError as err:
    print(f"rank {{rank}}: {{err}}", flush=True)
    sys.exit(3)
"""


def test_train_slots_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    slot_store(tmp_path, videos=(("a", 8, "train"), ("b", 8, "train"), ("c", 7, "train")))
    make_dvae_run(tmp_path)
    (tmp_path / "driver.py").write_text(
        SLOTS_NAN_DRIVER.format(repo=str(REPO), base=str(REPO / "configs/base.yaml"))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [
        a
        for a in overrides(
            tmp_path,
            "nan",
            PER_DEVICE,
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.max_steps=6",
            "trainer.ckpt_every=2",
            "trainer.val_batches=0",
        )
        if not a.startswith(("trainer.max_steps=3", "trainer.ckpt_every=3"))
    ]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            str(tmp_path / "driver.py"),
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout + run.stderr
    assert run.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: the training loss became NaN/inf at step 3" in out, out[-3000:]
    ckpts = tmp_path / "runs" / "nan" / "checkpoints"
    assert (
        torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    )
