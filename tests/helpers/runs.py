"""Tiny configs and run directories for the training stages, and one real trained slot run.

- stage 2: :data:`DVAE_TINY` overrides and :func:`dvae_cfg`; :func:`copy_dvae_run` copies a store
  with its dVAE run and points the run at the copy.
- stage 3: :func:`slot_cfg` / :func:`slot_cfg_args` train on :func:`tests.helpers.stores.slot_store`,
  whose tokens come from the dVAE run :func:`make_dvae_run` records (no dVAE is trained).
- :func:`slot_run` copies a real train-slots run (SlotModel with the STEVE decoder, 3 steps on
  :func:`tests.helpers.stores.squares_store`), trained once per test session: what evaluate,
  export and visualize read.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from egoslots.pipeline.config import load_config
from tests.helpers.stores import (
    SLOT_DVAE_HASH,
    SLOT_TOKEN_GRID,
    SLOT_VOCAB,
    SQ_DVAE_HASH,
    SQ_TOKEN_GRID,
    SQ_VOCAB,
    squares_store,
)

# `egoslots run configs/demo.yaml` shrunk to test size: every stage in well under a minute.
PIPELINE_TINY = [
    "dataset.synthetic.videos=5",
    "dataset.synthetic.frames=6",
    "dataset.synthetic.size=32",
    "dataset.synthetic.max_objects=3",
    "globals.IMAGE_SIZE=32",
    "globals.FRAME_SIZE=32",
    "globals.VOCAB_SIZE=16",
    "globals.NUM_SLOTS=3",
    "globals.SLOT_DIM=16",
    "globals.NUM_FRAMES=3",
    "globals.BATCH_SIZE_PER_GPU=2",
    "dataset.num_workers=0",
    "dvae.num_workers=0",
    "dvae.hidden=16",
    "dvae.max_steps=4",
    "dvae.tau_steps=4",
    "dvae.batch_size=4",
    "dvae.ckpt_every=2",
    "dvae.image_every=2",
    "decoder.hidden_dims=[32]",
    "steve_decoder.d_model=16",
    "steve_decoder.num_blocks=1",
    "trainer.max_steps=6",
    "trainer.ckpt_every=2",
    "trainer.val_every=3",
    "trainer.image_every=3",
    "trainer.log_every=1",
    "optimizer.warmup_steps=2",
    "extract.batch_size=8",
    "extract.num_workers=0",
    "extract.frames_per_chunk=8",
]


# --------------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------------
DVAE_TINY = [
    "dvae.vocab_size=32",
    "dvae.hidden=16",
    "dvae.batch_size=8",
    "dvae.num_workers=0",
    "dvae.log_every=2",
    "dvae.image_every=4",
    "dvae.tau_steps=20",
    "dvae.tokenize_batch_size=5",
    "dvae.accelerator=cpu",
]


def dvae_cfg(root: Path, store: Path, *overrides: str):
    """A tiny pretrain-dvae config with its run under ``root/runs/dvae``."""
    return load_config(None, [f"work_dir={root}", f"store={store}", *DVAE_TINY, *overrides])


def copy_dvae_run(src_root: Path, dst_root: Path) -> tuple[Path, Path]:
    """Copy ``store.zarr`` + ``runs/dvae`` and point the run at the copied store."""
    shutil.copytree(src_root, dst_root)
    run_dir = dst_root / "runs" / "dvae"
    inputs = json.loads((run_dir / "inputs.json").read_text())
    inputs["store"] = str(dst_root / "store.zarr")
    (run_dir / "inputs.json").write_text(json.dumps(inputs))
    return dst_root / "store.zarr", run_dir


def make_dvae_run(work: Path, store_fp: str = "fp0") -> Path:
    """A dVAE run directory that records the tokens :func:`slot_store` holds (no weights)."""
    run = work / "runs" / "dvae"
    run.mkdir(parents=True, exist_ok=True)
    info = {
        "hash": SLOT_DVAE_HASH,
        "store": store_fp,
        "vocab_size": SLOT_VOCAB,
        "token_grid": list(SLOT_TOKEN_GRID),
    }
    (run / "dvae.json").write_text(json.dumps(info))
    return run


# --------------------------------------------------------------------------------------------
# Stage 3
# --------------------------------------------------------------------------------------------
# A slot model (and batch) small enough for a test: one STEVE block of width 16.
TINY_SLOT_MODEL = [
    "globals.BATCH_SIZE_PER_GPU=2",
    "dataset.num_workers=0",
    "decoder.hidden_dims=[32,32]",
    "steve_decoder.num_blocks=1",
    "steve_decoder.d_model=16",
    "steve_decoder.num_heads=2",
    "predictor.num_heads=2",
]


def slot_args(work: Path) -> list[str]:
    """Overrides of a 4-step train-slots run ``t`` on :func:`slot_store`, with pictures and
    validation every 2 steps."""
    return [
        f"work_dir={work}",
        "store=fp0",
        "run_name=t",
        "seed=0",
        "globals.NUM_SLOTS=3",
        "globals.SLOT_DIM=16",
        f"globals.VOCAB_SIZE={SLOT_VOCAB}",
        "globals.NUM_FRAMES=3",
        *TINY_SLOT_MODEL,
        "optimizer.warmup_steps=2",
        "optimizer.lr=0.001",
        "trainer.max_steps=4",
        "trainer.ckpt_every=2",
        "trainer.val_every=2",
        "trainer.val_batches=2",
        "trainer.log_every=1",
        "trainer.image_every=2",
        "trainer.precision=32",
    ]


def slot_cfg(work: Path, *extra: str):
    """The config of :func:`slot_args` (``extra`` overrides last)."""
    return load_config(None, [*slot_args(work), *extra])


def slot_cfg_args(work: Path) -> list[str]:
    """Command-line overrides of a small train-slots run ``t`` on :func:`slot_store`."""
    return [
        f"work_dir={work}",
        "store=fp0",
        "run_name=t",
        "globals.SLOT_DIM=16",
        f"globals.VOCAB_SIZE={SLOT_VOCAB}",
        "globals.NUM_FRAMES=3",
        "globals.BATCH_SIZE_PER_GPU=2",
        "dataset.num_workers=0",
        "decoder.hidden_dims=[32]",
        "steve_decoder.num_blocks=1",
        "steve_decoder.d_model=16",
        "steve_decoder.num_heads=2",
        "predictor.num_heads=2",
        "trainer.precision=32",
        "trainer.image_every=100",
        "trainer.val_every=100",
    ]


# --------------------------------------------------------------------------------------------
# A real trained slot run
# --------------------------------------------------------------------------------------------
RUN_SLOTS, RUN_SLOT_DIM, RUN_STEPS = 4, 16, 3
_TEMPLATE: dict[str, Path] = {}


def _train_template(root: Path, *overrides: str) -> Path:
    """``root/work``: the squares store, an (untrained) dVAE run and a 3-step slot run
    (``overrides``: more config overrides for that run)."""
    from egoslots.pipeline.dvae import DVAE
    from egoslots.stages.train_slots import train

    work = root / "work"
    squares_store(work / "stores" / "tinyfp.zarr", work / "data")
    dvae = work / "runs" / "dvae"
    dvae.mkdir(parents=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(DVAE(vocab_size=SQ_VOCAB, hidden=8).state_dict(), dvae / "dvae.pt")
    info = {
        "hash": SQ_DVAE_HASH,
        "store": "tinyfp",
        "vocab_size": SQ_VOCAB,
        "hidden": 8,
        "token_grid": [SQ_TOKEN_GRID, SQ_TOKEN_GRID],
    }
    (dvae / "dvae.json").write_text(json.dumps(info))
    cfg = load_config(
        None,
        [
            f"work_dir={work}",
            "store=tinyfp",
            "run_name=slots",
            "seed=0",
            f"dataset.path={work / 'data'}",
            "dataset.source=frames",
            f"globals.NUM_SLOTS={RUN_SLOTS}",
            f"globals.SLOT_DIM={RUN_SLOT_DIM}",
            f"globals.VOCAB_SIZE={SQ_VOCAB}",
            "globals.NUM_FRAMES=4",
            *TINY_SLOT_MODEL,
            "optimizer.warmup_steps=1",
            f"trainer.max_steps={RUN_STEPS}",
            f"trainer.ckpt_every={RUN_STEPS}",
            "trainer.val_every=100",
            "trainer.log_every=1",
            "trainer.image_every=100",
            "trainer.precision=32",
            "trainer.accelerator=cpu",
            "evaluate.probe_train_videos=null",
            *overrides,
        ],
    )
    with torch.random.fork_rng():
        train(cfg)
    return work


def slot_run(tmp_path_factory, dest: Path, masks: bool = True, invariant: bool = False) -> Path:
    """A copy in ``dest`` of the session's trained slot run (with its store, data and dVAE run);
    returns the run directory. ``masks=False``: the store lost its masks (unlabelled data).
    ``invariant``: a run of its own with Invariant Slot Attention (grouper.invariant)."""
    key = "work-invariant" if invariant else "work"
    if key not in _TEMPLATE:
        extra = ["grouper.invariant=true"] if invariant else []
        _TEMPLATE[key] = _train_template(tmp_path_factory.mktemp("slot-run"), *extra)
    template = _TEMPLATE[key]
    shutil.copytree(template, dest)
    run_dir = dest / "runs" / "slots"
    for name in ("config.yaml", "inputs.json"):
        path = run_dir / name
        path.write_text(path.read_text().replace(str(template), str(dest)))
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        saved["hyper_parameters"] = _replace(saved["hyper_parameters"], str(template), str(dest))
        torch.save(saved, ckpt)
        shutil.copystat(template / ckpt.relative_to(dest), ckpt)  # same mtime as the original
    if not masks:
        shutil.rmtree(dest / "stores" / "tinyfp.zarr" / "masks")
    return run_dir


def _replace(value, old: str, new: str):
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {k: _replace(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace(v, old, new) for v in value]
    return value


REPO = Path(__file__).resolve().parents[2]


def run_cli(
    work_dir: Path, *extra: str, check: bool = True, **kwargs
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "cli.py",
        "run",
        "configs/demo.yaml",
        f"work_dir={work_dir}",
        *PIPELINE_TINY,
        *extra,
    ]
    """`egoslots run configs/demo.yaml` at the tiny sizes, in a subprocess (cwd: the repository)."""
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, check=check, timeout=600, **kwargs
    )
