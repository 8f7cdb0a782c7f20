"""What every stage command shares: the `CONFIG [key=value ...]` shape and error handling."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from pipeline.config import ConfigError, load_config

log = logging.getLogger("egoslots")


class StageError(click.ClickException):
    """An error the user can act on; printed without a traceback."""


def config_command(name: str, example: str, **command_kwargs):
    """Decorate a function ``f(cfg, **options)`` into a click command ``NAME CONFIG [OVERRIDES]``.

    The config file and dotted overrides are loaded and validated before ``f`` runs; config,
    data and store errors become one clean error line naming the file or key at fault.
    ``example`` is shown at the end of ``--help``.
    """

    def decorate(func):
        doc = (func.__doc__ or "").rstrip()
        epilog = f"\b\nExample:\n  {example}"

        @click.command(name=name, help=doc, epilog=epilog, **command_kwargs)
        @click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
        @click.argument("overrides", nargs=-1)
        @functools.wraps(func)
        def command(config, overrides, **options):
            setup_logging()
            try:
                cfg = load_config(config, overrides)
                return func(cfg, **options)
            except user_errors() as err:
                raise StageError(str(err)) from err

        return command

    return decorate


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input the user can fix: shown as one line, not a traceback."""
    from cache.store import StoreError
    from pipeline.backbones import BackboneError
    from pipeline.data.base import SourceError

    errors = [ConfigError, SourceError, StoreError, BackboneError]
    # Training stops on a NaN/Inf loss name the step; they are imported only when one is raised.
    for module, name in (
        ("stages.dvae", "TrainingDiverged"),
        ("stages.train_slots", "NonFiniteLossError"),
        ("stages.pretrain_encoder", "EncoderDiverged"),
    ):
        mod = sys.modules.get(module)
        if mod is not None:
            errors.append(getattr(mod, name))
    return tuple(errors)


def setup_logging(level: int = logging.INFO) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
        )
    # Lightning advertises a cloud logger on every Trainer start; not something our users need.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: "litlogger" not in record.getMessage())
    # Imported before us, Lightning prints through a handler of its own: stop the same line
    # reaching ours a second time.
    for name in ("lightning.pytorch", "lightning.fabric"):
        lightning_log = logging.getLogger(name)
        if lightning_log.handlers:
            lightning_log.propagate = False
