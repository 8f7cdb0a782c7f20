"""The options of the commands that run a trained model (evaluate, export-slots, visualize,
infer), defined once so their outputs agree: ``--split / --checkpoint / --max-videos``
(:func:`split_options`), ``--restarts`` checked against the memory available before any work
(:func:`restarts_option`), ``--track`` (:data:`track_option`, ``match`` by default: what users
see, export and score keeps slot identities; ``off`` is the model's raw output).
"""

from __future__ import annotations

import functools
from pathlib import Path

import click
from omegaconf import OmegaConf

from egoslots.cache.store import FeatureStore
from egoslots.stages.machinery.batch_memory import clip_bytes
from egoslots.stages.machinery.common import check_fits_in_memory
from egoslots.stages.machinery.run_paths import path_from_run_file, store_of_run
from egoslots.stages.machinery.rundirs import read_json


def restarts_option(command):
    """``--restarts`` of evaluate, export-slots and visualize (one option, so their masks
    agree), checked against the memory available before any work (:func:`check_restarts`)."""

    @functools.wraps(command)
    def checked(*args, **kwargs):
        if kwargs.get("restarts") is not None:
            check_restarts(kwargs["restarts"], kwargs.get("run"))
        return command(*args, **kwargs)

    return click.option(
        "--restarts",
        type=click.IntRange(min=1),
        default=None,
        help="Draws of a gaussian (or kmeans) initializer's first slots per video; the one that reconstructs "
        "the first window best is kept (default: the run's inference.restarts). At most "
        "what fits in the memory available.",
    )(checked)


def check_restarts(restarts: int, run: str | Path | None) -> None:
    """Refuse a ``--restarts`` whose draws (one batch over the run's first window) would not fit
    in the memory available: one usage error naming the option, the estimate and the bound,
    instead of an allocation of many GB failing (or swapping) mid-run."""
    per_draw = restart_bytes(run)
    if per_draw:  # None: not a readable run (loading it says why); 0: draws that cost nothing
        check_fits_in_memory("--restarts", restarts, per_draw, "draws", "on the run's first window")


def restart_bytes(run: str | Path | None) -> int | None:
    """Bytes one restart draw needs (float32): the window's features, reconstruction and error,
    and the MLP decoder's two largest activations over every slot and token of every frame.
    0 for a fixed initializer (its draws are all one, made once); None when there is no run."""
    try:
        run_dir = Path(run)
        cfg = OmegaConf.load(run_dir / "config.yaml")
        if str(cfg.model.initializer.name) == "fixed":
            return 0
        inputs = read_json(run_dir / "inputs.json")
        found = store_of_run(run_dir, inputs["store_fingerprint"], [inputs["store"]])
        meta = FeatureStore.open(found or path_from_run_file(run_dir, inputs["store"])).meta
        frames, slots = int(cfg.dataset.ep_length), int(cfg.model.num_slots)
        widest = max([int(h) for h in cfg.decoder.hidden_dims] + [int(cfg.model.slot_dim)])
        tokens, dim = int(meta["num_tokens"]), int(meta["feature_dim"])
    except Exception:  # noqa: BLE001 - no run to size: the loader reports what is wrong with it
        return None
    return clip_bytes(frames, tokens, dim, slots, widest)  # one window: a training clip's cost


def split_options(verb: str):
    """``--split``, ``--checkpoint`` and ``--max-videos`` of the commands that run a trained
    model over the videos of a split (evaluate, export-slots): one definition, one wording."""
    options = [
        click.option(
            "--split",
            type=click.Choice(["train", "val", "test"]),
            default="test",
            show_default=True,
            help=f"Split to {verb}.",
        ),
        click.option(
            "--checkpoint",
            default="last",
            show_default=True,
            help="Checkpoint name under RUN/checkpoints.",
        ),
        click.option(
            "--max-videos",
            type=click.IntRange(min=1),
            default=None,
            help=f"{verb.capitalize()} only the first N videos of the split.",
        ),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


# every command that shows, exports or scores slots: one --track option, one default
TRACK_MODES = ("off", "match")
DEFAULT_TRACK = "match"
track_option = click.option(
    "--track",
    type=click.Choice(TRACK_MODES),
    default=DEFAULT_TRACK,
    show_default=True,
    help="match: slots the model cannot tell apart (masks tied) are renamed to keep the "
    "regions they had in the frame before, a slot's name follows its region when the region "
    "moves whole to another slot, and a token keeps its slot while slots tie on it "
    "(slots keep their identity on real video). "
    "off: the model's raw output, slots in its own order and a plain arg-max.",
)
