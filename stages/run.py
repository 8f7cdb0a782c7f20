"""`egoslots run CONFIG`: the whole pipeline in order, skipping work that is already done.

synthetic data (if the config asks for it) -> pretrain-encoder (if backbone.name is `self`)
-> extract-features -> pretrain-dvae + tokenize
(if globals.USE_DVAE) -> train-slots -> evaluate -> visualize. Each stage does no work again
when its output exists and matches (visualize: when a picture is newer than the checkpoint),
and resumes when it was interrupted, so running the same command again after a crash (or
after it finished) does only the missing work.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click
from omegaconf import DictConfig, OmegaConf

from stages.common import config_command

log = logging.getLogger("egoslots")


def _stage(name: str):
    click.secho(f"\n== {name}", bold=True)
    return time.perf_counter()


def _done(start: float, what: str) -> None:
    click.echo(f"   {what} ({time.perf_counter() - start:.1f} s)")


def ensure_synthetic_data(cfg: DictConfig) -> Path:
    """Generate the synthetic dataset the config names, unless it is already there."""
    from stages.synthetic import generate_dataset

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
    own = Path(cfg.work_dir) / "runs" / cfg.pretrain_encoder.run_name
    return b.get("encoder_run") is None or Path(b.encoder_run).resolve() == own.resolve()


def run_pipeline(cfg: DictConfig, skip_bad: bool = False) -> dict:
    """Run every stage; returns {"store", "dvae_run", "run_dir", "metrics", "picture"} (and
    "encoder_run" when stage 0 ran)."""
    from stages.evaluate import evaluate_run, format_table
    from stages.extract import extract
    from stages.pretrain_dvae import pretrain
    from stages.tokenize import tokenize_run
    from stages.train_slots import train
    from stages.visualize import visualize_run

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # a copy we can fill in
    result: dict = {}
    if cfg.dataset.source == "synthetic":
        t = _stage("synthetic data")
        root = ensure_synthetic_data(cfg)
        _done(t, f"videos in {root}")

    if trains_own_encoder(cfg):
        from stages.pretrain_encoder import pretrain as pretrain_encoder

        t = _stage("stage 0: pretrain-encoder")
        encoder_run = pretrain_encoder(cfg)
        result["encoder_run"] = str(encoder_run)
        _done(t, f"encoder {encoder_run / 'encoder.pth'}")

    t = _stage("stage 1: extract-features")
    store = extract(cfg, skip_bad=skip_bad)
    cfg.store = str(store)
    result["store"] = str(store)
    _done(t, f"store {store}")

    if cfg.globals.USE_DVAE:
        t = _stage("stage 2: pretrain-dvae + tokenize")
        dvae_run = pretrain(cfg)
        dvae_hash = tokenize_run(dvae_run)
        cfg.dvae_run = str(dvae_run)
        result["dvae_run"] = str(dvae_run)
        _done(t, f"dVAE {dvae_hash} in {dvae_run}")

    t = _stage("stage 3: train-slots")
    run_dir = train(cfg)
    result["run_dir"] = str(run_dir)
    _done(t, f"run {run_dir}")

    t = _stage(f"evaluate ({cfg.evaluate.split} split)")
    metrics = evaluate_run(run_dir, split=cfg.evaluate.split)
    result["metrics"] = metrics
    _done(t, f"metrics in {Path(run_dir) / 'metrics.json'}")

    t = _stage("visualize")
    picture = _current_picture(Path(run_dir)) or visualize_run(run_dir)
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
def run(cfg: DictConfig, skip_bad: bool = False):
    """Run the whole pipeline (data, [encoder], extract, dVAE, slots, evaluate, visualize) in order.

    Stages whose outputs already exist and match the config are skipped; an interrupted
    stage resumes where it stopped. Rerun the same command after a crash.
    """
    run_pipeline(cfg, skip_bad=skip_bad)
