"""`egoslots run CONFIG`: the whole pipeline in order, skipping work that is already done.

synthetic data (if the config asks for it) -> pretrain-encoder (if backbone.name is `self`)
-> extract-features -> pretrain-dvae + tokenize
(if globals.USE_DVAE) -> train-slots -> evaluate -> visualize. Each stage does no work again
when its output exists and matches (visualize: when a picture is newer than the checkpoint),
and resumes when it was interrupted, so running the same command again after a crash (or
after it finished) does only the missing work. evaluate scores, and visualize draws, the
masks as the commands give them by default: tied slots renamed to keep their regions
(``--track match``, ``stages/machinery/run_options.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click
from omegaconf import DictConfig, OmegaConf

from egoslots.stages.machinery.common import StageError, config_command, user_errors
from egoslots.stages.machinery.run_options import DEFAULT_TRACK

log = logging.getLogger("egoslots")


def _stage(name: str):
    click.secho(f"\n== {name}", bold=True)
    return time.perf_counter()


def _done(start: float, what: str) -> None:
    click.echo(f"   {what} ({time.perf_counter() - start:.1f} s)")


def ensure_synthetic_data(cfg: DictConfig) -> Path:
    """Generate the synthetic dataset the config names, unless it is already there."""
    from egoslots.stages.make_synthetic import generate_dataset

    root = Path(cfg.dataset.path)
    s = cfg.dataset.synthetic
    generate_dataset(
        root,
        videos=s.videos,
        frames=s.frames,
        size=s.size,
        seed=s.seed,
        min_objects=s.min_objects,
        max_objects=s.max_objects,
        fps=s.fps,
        scene=s.scene,
    )
    return root


def _current_picture(run_dir: Path):
    """A picture already drawn from the run's latest checkpoint, if there is one."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    pictures = sorted((run_dir / "viz").glob("*.png")) if (run_dir / "viz").is_dir() else []
    if ckpt.exists() and pictures and pictures[0].stat().st_mtime >= ckpt.stat().st_mtime:
        return pictures[0]
    return None


def trains_own_encoder(cfg: DictConfig) -> bool:
    """Whether the config extracts with the encoder its own `pretrain-encoder` trains
    (``backbone.name: self``, no other run or weights file named)."""
    b = cfg.backbone
    if b.name != "self" or b.get("checkpoint"):
        return False
    from egoslots.stages.machinery.rundirs import run_dir_of

    own = run_dir_of(cfg, cfg.pretrain_encoder.run_name)
    return b.get("encoder_run") is None or Path(b.encoder_run).resolve() == own.resolve()


def pinned_store(cfg: DictConfig):
    """The complete store ``store=`` names, used as it is (not re-extracted); None when
    ``store=`` is unset or names no complete store yet (extraction then writes it there)."""
    from egoslots.cache.catalog import store_for_config
    from egoslots.cache.store import StoreError

    if not cfg.store:
        return None
    try:
        return store_for_config(cfg)
    except StoreError:
        return None


def _dvae_run_fits(cfg: DictConfig) -> bool:
    """Whether the dVAE run directory is absent or belongs to this config's store and vocabulary."""
    from egoslots.cache.catalog import store_for_config
    from egoslots.stages.machinery.rundirs import run_dir_of
    from egoslots.stages.pretrain_dvae import check_run_dir

    try:
        check_run_dir(run_dir_of(cfg, cfg.dvae.run_name), cfg, store_for_config(cfg))
    except user_errors():
        return False
    return True


def _slot_run_fits(cfg: DictConfig) -> bool:
    """Whether the slot run directory is absent or holds this config's run on these inputs."""
    from egoslots.pipeline.config import resolve
    from egoslots.stages.machinery.rundirs import run_dir_of
    from egoslots.stages.train_slots import check_same_run, resolve_inputs

    run_dir = run_dir_of(cfg, cfg.run_name)
    if not run_dir.is_dir():
        return True
    try:
        check_same_run(run_dir, resolve(cfg), resolve_inputs(cfg))
    except (StageError, *user_errors()):
        return False
    return True


def run_pipeline(cfg: DictConfig, skip_bad: bool = False, overwrite: bool = False) -> dict:
    """Run every stage; returns {"store", "dvae_run", "run_dir", "metrics", "picture"} (and
    "encoder_run" when stage 0 ran).

    ``store=`` naming a complete store uses it as it is (no extraction). ``overwrite`` replaces
    what belongs to other inputs (a store of other settings at the target, a dVAE or slot run of
    another store or config; only what egoslots wrote) and keeps what matches.
    """
    from egoslots.stages.evaluate import evaluate_run, format_table
    from egoslots.stages.extract_features import extract
    from egoslots.stages.pretrain_dvae import pretrain
    from egoslots.stages.tokenize import tokenize_run
    from egoslots.stages.train_slots import train
    from egoslots.stages.visualize import visualize_run

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # a copy we can fill in
    result: dict = {}
    pinned = pinned_store(cfg)
    if cfg.dataset.source == "synthetic" and pinned is None:
        t = _stage("synthetic data")
        root = ensure_synthetic_data(cfg)
        _done(t, f"videos in {root}")

    if pinned is None and trains_own_encoder(cfg):  # (a pinned store needs no encoder)
        from egoslots.stages.pretrain_encoder import pretrain as pretrain_encoder

        t = _stage("stage 0: pretrain-encoder")
        encoder_run = pretrain_encoder(cfg)
        result["encoder_run"] = str(encoder_run)
        _done(t, f"encoder {encoder_run / 'encoder.pth'}")

    t = _stage("stage 1: extract-features")
    if pinned is not None:
        store = pinned.path
        _done(t, f"store={cfg.store}: using the complete store {store} as it is")
    else:
        store = extract(cfg, overwrite=overwrite, skip_bad=skip_bad)
        _done(t, f"store {store}")
    cfg.store = str(store)
    result["store"] = str(store)

    if cfg.globals.USE_DVAE:
        t = _stage("stage 2: pretrain-dvae + tokenize")
        dvae_run = pretrain(cfg, overwrite=overwrite and not _dvae_run_fits(cfg))
        dvae_hash = tokenize_run(dvae_run)
        cfg.dvae_run = str(dvae_run)
        result["dvae_run"] = str(dvae_run)
        _done(t, f"dVAE {dvae_hash} in {dvae_run}")

    t = _stage("stage 3: train-slots")
    run_dir = train(cfg, overwrite=overwrite and not _slot_run_fits(cfg))
    result["run_dir"] = str(run_dir)
    _done(t, f"run {run_dir}")

    t = _stage(f"evaluate ({cfg.evaluate.split} split)")
    metrics = evaluate_run(
        run_dir,
        split=cfg.evaluate.split,
        restarts=int(cfg.inference.restarts),
        track=DEFAULT_TRACK,
    )
    result["metrics"] = metrics
    _done(t, f"metrics in {Path(run_dir) / 'metrics.json'}")

    t = _stage("visualize")
    picture = _current_picture(Path(run_dir)) or visualize_run(run_dir, track=DEFAULT_TRACK)
    result["picture"] = str(picture)
    _done(t, f"picture {picture}")

    click.echo("\n" + format_table(metrics))
    click.echo(f"\nSlot masks over a test video: {picture}")
    return result


@config_command("run", example="egoslots run configs/demo.yaml")
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Skip unreadable videos (counted and reported) instead of stopping.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace outputs of other inputs (store, dVAE run, slot run; only what egoslots wrote); "
    "keep those that match.",
)
def run(cfg: DictConfig, skip_bad: bool = False, overwrite: bool = False):
    """Run the whole pipeline (data, [encoder], extract, dVAE, slots, evaluate, visualize) in order.

    Stages whose outputs already exist and match the config are skipped; an interrupted
    stage resumes where it stopped. Rerun the same command after a crash. store=FINGERPRINT (or
    a path) uses that complete store as it is; --overwrite redoes the stages whose outputs
    belong to other inputs.
    """
    run_pipeline(cfg, skip_bad=skip_bad, overwrite=overwrite)
