"""Run directories and their checkpoints: layout, run files, and what may resume from what.

A training run lives in ``<work_dir>/runs/<name>/``::

    config.yaml     the fully resolved config of the last invocation
    inputs.json     what it read: store fingerprint and path (and the dVAE for stage 3); paths
                    relative to the run directory (``run_paths.py``)
    checkpoints/    step=N.ckpt every ckpt_every steps, and last.ckpt
    tb/             TensorBoard
    .egoslots-run   the marker: egoslots created this folder (what --overwrite checks)

This module writes the run files (atomically), finds and reads checkpoints (only tensors and
plain containers: ``weights_only=True``), brings ``last.ckpt`` up to the newest ``step=N.ckpt``,
and decides whether a config or a checkpoint belongs to a run: :func:`config_changes` lists the
keys that differ in what is trained, :func:`check_checkpoint_fits` names the weights and keys
when a checkpoint holds another model.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from egoslots.cache.location import remove_orphans, write_file, write_text
from egoslots.pipeline.checkpoints import CheckpointError, load_weights
from egoslots.pipeline.config import is_schema_default, to_yaml
from egoslots.pipeline.records import REWRITE_HINT, DamagedFile
from egoslots.pipeline.records import read_json as read_record
from egoslots.stages.machinery.common import StageError

log = logging.getLogger("egoslots")


# --------------------------------------------------------------------------------------------
# Run directories and their files
# --------------------------------------------------------------------------------------------
def run_dir_of(cfg: DictConfig, name: str) -> Path:
    """``<work_dir>/runs/<name>``: where a run of this config lives."""
    return Path(cfg.work_dir) / "runs" / str(name)


def write_config(cfg: DictConfig, path: Path) -> None:
    """The fully resolved config, written atomically (``config.yaml`` of a run)."""
    write_text(path, to_yaml(cfg))


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path, what: str = "", recover: str = REWRITE_HINT) -> dict | None:
    """A run file (None when absent); a damaged one is one error naming it, ``what`` it is and
    how to ``recover``, not a traceback (``egoslots.cache.location.read_json``, the one reader of
    run files)."""
    try:
        return read_record(path, what, recover)
    except DamagedFile as err:
        raise StageError(str(err)) from err


def write_run_files(run_dir: Path, cfg: DictConfig, inputs: dict) -> None:
    """``config.yaml``, ``inputs.json`` and the marker of a run about to train, after clearing
    the temporary files of checkpoint writes a kill cut short (each as large as a checkpoint)."""
    remove_orphans((run_dir / "checkpoints").glob(".*.ckpt.tmp-*"))
    if not (run_dir / RUN_MARKER).exists():
        write_json(run_dir / RUN_MARKER, {"egoslots": "run directory"})
    write_config(cfg, run_dir / "config.yaml")
    write_json(run_dir / "inputs.json", inputs)


# What egoslots writes at the top of a run directory (stages 0, 2 and 3, evaluate, visualize,
# export's default OUT, Lightning's hparams) and its own temporary files.
RUN_MARKER = ".egoslots-run"
LOCK_NAME = ".egoslots-lock"  # held by a stage writing into the run (stages/machinery/locks.py)
RUN_ENTRIES = (
    RUN_MARKER,
    "config.yaml",
    "inputs.json",
    "checkpoints",
    "tb",
    "dvae.json",
    "dvae.pt",
    "frames",  # pretrain-encoder's decoded train frames
    "encoder.pth",
    "encoder.pth.tmp",
    "encoder.json",
    "metrics.json",
    "metrics.md",
    "viz",
    "hparams.yaml",
    "slots_*.zarr",
    "slots_*.zarr.partial",
    ".*.tmp-*",
    LOCK_NAME,
)


def remove_run_dir(run_dir: Path) -> None:
    """Delete a run directory for ``--overwrite``, only if egoslots wrote all of it: it holds the
    marker (or, made before markers, config.yaml / inputs.json) and nothing egoslots never
    writes; anything else is refused with one line naming what is foreign."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise StageError(
            f"{run_dir} is a file, not a run directory: move it away, or choose another run name"
        )
    names = sorted(p.name for p in run_dir.iterdir())
    ours = bool({RUN_MARKER, "config.yaml", "inputs.json", LOCK_NAME} & set(names))
    foreign = [n for n in names if not any(fnmatch.fnmatchcase(n, e) for e in RUN_ENTRIES)]
    if not ours or foreign:
        why = (
            f"it holds files egoslots never writes ({listed(foreign)})"
            if ours
            else "it is not an egoslots run directory (no .egoslots-run, config.yaml or inputs.json)"
        )
        raise StageError(
            f"refusing to delete {run_dir} for --overwrite: {why}; move those away, or choose "
            "another run name (egoslots only deletes what it wrote)"
        )
    log.info("--overwrite: removing %s", run_dir)
    shutil.rmtree(run_dir)


def saved_config(run_dir: Path) -> dict | None:
    """The run's ``config.yaml`` as a plain dict (None if there is none)."""
    path = run_dir / "config.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else None


# --------------------------------------------------------------------------------------------
# Config changes between invocations of one run
# --------------------------------------------------------------------------------------------
# Config keys that may change when a run resumes in its own directory (they do not change
# what is being trained). Anything else differing is an error: start a new run_name instead.
RESUMABLE_CHANGES = (
    "backbone.encoder_run",  # where the encoder run is: the store's fingerprint holds its sha256
    "trainer.",
    "evaluate.",
    "inference.",  # read only where a trained model is applied
    "dataset.num_workers",
    "store",
    "dvae_run",
    "dvae.",
    "extract.",
    "work_dir",
    "backbone.checkpoint",
    "dataset.path",
)


def flat(tree: Any, prefix: str = "") -> dict:
    """A nested dict as {dotted key: value}."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(old: dict, new: dict) -> list[str]:
    """Keys (dotted) whose values differ and that matter for what is trained. Keys only in
    ``old`` are keys egoslots no longer has (e.g. globals.NUM_GPUS): they changed nothing; keys
    only in ``new`` at their default were added to egoslots since the run began, and their
    defaults do what it did before (``grouper.position_embedding: false``)."""
    a, b = flat(old), flat(new)
    return [
        k
        for k in sorted(b)
        if a.get(k) != b.get(k)
        and not (k not in a and is_schema_default(k, b[k]))
        and not any(
            k == p or k.startswith(p) if p.endswith(".") else k == p for p in RESUMABLE_CHANGES
        )
    ]


def listed(items: list[str], most: int = 4) -> str:
    """The first few items and how many more."""
    more = f" (+{len(items) - most} more)" if len(items) > most else ""
    return ", ".join(items[:most]) + more


# --------------------------------------------------------------------------------------------
# Checkpoints: naming, finding, reading, catching up
# --------------------------------------------------------------------------------------------
def checkpoint_path(run_dir: Path, checkpoint: str | int | Path = "last") -> Path:
    """``last``, a step number, ``step=N`` or a path -> the checkpoint file of a run. The run
    of another stage (pretrain-dvae, pretrain-encoder) is one error saying so: its checkpoints
    hold no slot model (before: a ValueError traceback from deep inside the model)."""
    for record, stage in (("dvae.json", "pretrain-dvae"), ("encoder.json", "pretrain-encoder")):
        if (run_dir / record).is_file():
            slot_runs = sorted(
                p.parent.name for p in run_dir.parent.glob("*/inputs.json")
                if not (p.parent / "dvae.json").exists() and not (p.parent / "encoder.json").exists()
            )  # fmt: skip
            hint = f" ({', '.join(slot_runs[:3])} in {run_dir.parent})" if slot_runs else ""
            raise StageError(
                f"{run_dir} is a {stage} run directory (it holds {record}), not a train-slots "
                f"run: pass the directory of a train-slots run{hint}"
            )
    if isinstance(checkpoint, Path) or (
        isinstance(checkpoint, str) and checkpoint.endswith(".ckpt")
    ):
        path = Path(checkpoint)
    elif checkpoint == "last":
        path = run_dir / "checkpoints" / "last.ckpt"
    else:
        step = str(checkpoint).removeprefix("step=")
        path = run_dir / "checkpoints" / f"step={step}.ckpt"
    if not path.is_file():
        have = (
            sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
            if (run_dir / "checkpoints").is_dir()
            else []
        )
        raise StageError(
            f"no checkpoint {path} (have: {', '.join(have) or 'none'}); "
            f"train it with `egoslots train-slots {run_dir / 'config.yaml'}`"
        )
    return path


def check_checkpoint_files(ckpt_dir: Path) -> None:
    """``last.ckpt`` (or ``checkpoints``) that is not a file where egoslots writes one: one error
    before training, not Lightning's IsADirectoryError after the first interval."""
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise StageError(f"{ckpt_dir} is a file, not a folder of checkpoints: move it away")
    last = ckpt_dir / "last.ckpt"
    if last.exists() and not last.is_file():
        raise StageError(
            f"{last} is not a file (a folder?): egoslots writes the newest checkpoint there; "
            "move it away, then rerun the same command"
        )


def resume_checkpoint(ckpt_dir: Path, resume: str | Path | None) -> Path | None:
    """The checkpoint a training stage resumes from: ``--resume`` (which must exist), else the
    newest one in ``ckpt_dir`` that loads (:func:`find_resume_checkpoint`), else None.

    Also silences the two Lightning warnings every such resume triggers and that mean nothing
    here: resuming mid-"epoch" (the samplers are resumable) and a non-empty checkpoint folder."""
    warnings.filterwarnings(
        "ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*"
    )
    warnings.filterwarnings(
        "ignore", message=r".*Checkpoint directory .* exists and is not empty.*"
    )
    if resume is not None:
        if not Path(resume).is_file():
            raise StageError(f"--resume {resume}: no such checkpoint file")
        return Path(resume)
    return find_resume_checkpoint(ckpt_dir)


def find_resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint of the highest step that loads: last.ckpt or the newest step=N.ckpt.

    Lightning writes step=N.ckpt before last.ckpt, so a kill between the two leaves last.ckpt one
    interval behind; resuming from it would redo those steps and save them as step=N-v1.ckpt
    beside step=N.ckpt. An unreadable file (damaged) is skipped with a warning.
    """
    best, best_step = None, -1
    candidates = [ckpt_dir / "last.ckpt"] + sorted(
        ckpt_dir.glob("step=*.ckpt"), key=_step_of, reverse=True
    )
    for path in candidates:
        if not path.is_file():
            continue
        try:
            step = int(load_weights(path)["global_step"])
        except (CheckpointError, KeyError, TypeError, ValueError) as err:  # truncated: older one
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, err)
            continue
        if step > best_step:
            best, best_step = path, step
        if path.name != "last.ckpt":
            break  # step=N files come newest first: the first that loads is the newest
    return best


def _step_of(path: Path) -> int:
    m = re.match(r"step=(\d+)", path.stem)
    return int(m.group(1)) if m else -1


@rank_zero_only
def catch_up_last(newest: Path) -> None:
    """Copy ``newest`` (a step=N.ckpt) over last.ckpt, which a kill between the two writes left
    older (or damaged): evaluate, export and visualize read last.ckpt, also when the run has
    nothing left to train. Atomic, as every checkpoint write."""
    with open(newest, "rb") as src:
        write_file(newest.with_name("last.ckpt"), lambda dst: shutil.copyfileobj(src, dst))


# What to do about a checkpoint that does not read, or holds other pickled objects.
DAMAGED_CHECKPOINT = (
    "it is truncated or damaged (a write cut short?): choose another checkpoint (--checkpoint "
    "step=N, --resume PATH), or move it away: training resumes from the newest one that reads"
)
FOREIGN_CHECKPOINT = (
    "egoslots checkpoints never hold such objects: use a checkpoints/*.ckpt file that egoslots "
    "wrote, or move this one away"
)


def checkpoint_step(path: Path) -> int:
    return int(read_checkpoint(path)["global_step"])


def read_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint, loaded with ``weights_only=True``: tensors and plain containers only
    (all a checkpoint of ours holds), so a .ckpt carrying other Python objects is refused, never run."""
    try:
        ckpt = load_weights(path, damaged=DAMAGED_CHECKPOINT, foreign=FOREIGN_CHECKPOINT)
    except CheckpointError as err:
        raise StageError(str(err)) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise StageError(
            f"{path} is not a Lightning checkpoint (no state_dict / global_step): give a "
            "checkpoints/*.ckpt file of a train-slots or pretrain-dvae run"
        )
    return ckpt


# --------------------------------------------------------------------------------------------
# Does a checkpoint hold the model a run expects?
# --------------------------------------------------------------------------------------------
def check_checkpoint_fits(
    path: Path, ckpt: dict, expected: torch.nn.Module, against: str, remedy: str
) -> None:
    """Refuse a train-slots checkpoint whose slot model differs from ``expected`` (a
    LightningModule of another NUM_SLOTS, SLOT_DIM, vocabulary, store, ...): one error naming
    the checkpoint, the weights whose names or shapes differ and the config keys behind them,
    instead of load_state_dict's traceback."""
    hp = ckpt.get("hyper_parameters") or {}
    if not isinstance(hp.get("config"), dict):
        raise StageError(
            f"{path} is not a train-slots checkpoint (it has no slot-model config; a "
            "pretrain-dvae checkpoint?)"
        )
    state, own = ckpt["state_dict"], expected.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        parts.append(
            f"{len(shapes)} weights differ in shape (checkpoint vs expected): {listed(shapes)}"
        )
    if missing:
        parts.append(f"{len(missing)} weights missing from the checkpoint: {listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} weights only in the checkpoint: {listed(unexpected)}")
    ours = dict(expected.hparams)
    keys = [
        f"{k}={flat(hp['config']).get(k)} (checkpoint) vs {flat(ours['config']).get(k)}"
        for k in config_changes(hp["config"], ours["config"])
    ]
    keys += [
        f"store {name}: {hp.get(name)} (checkpoint) vs {ours.get(name)}"
        for name in ("feature_dim", "num_tokens", "token_grid")
        if _plain(hp.get(name)) != _plain(ours.get(name))
    ]
    keys.sort(key=lambda k: not k.startswith(("globals.", "store ")))  # the usual culprits first
    raise StageError(
        f"checkpoint {path} holds another slot model than {against}: {'; '.join(parts)}. "
        + (f"Config differences: {listed(keys)}. " if keys else "")
        + remedy
    )


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value
