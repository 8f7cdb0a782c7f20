"""What every stage command shares: the ``CONFIG [key=value ...]`` shape, logging, and failing
with one clear line (user errors, failed writes) instead of a traceback."""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from egoslots.pipeline.config import ConfigError, load_config

log = logging.getLogger("egoslots")


class StageError(click.ClickException):
    """An error the user can act on; printed without a traceback."""


class TrainingDiverged(StageError):
    """The training loss became NaN or inf; no checkpoint after that step was written."""


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
            except ConfigError as err:  # before any work, and without importing torch for it
                raise StageError(str(err)) from err
            try:
                with output_writes(  # a refused write no stage caught itself: still one line
                    Path(cfg.work_dir),
                    kept="Nothing already written is removed",
                    resume="then rerun the same command; finished stages are not redone",
                ):
                    return func(cfg, **options)
            except user_errors() as err:
                raise StageError(str(err)) from err

        return command

    return decorate


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by input the user can fix: shown as one line, not a traceback. (Imported
    when a command fails, so that a light command never loads torch or zarr for them.)"""
    from egoslots.cache.store import StoreError
    from egoslots.pipeline.backbones import BackboneError
    from egoslots.pipeline.checkpoints import CheckpointError
    from egoslots.pipeline.data.base import SourceError
    from egoslots.pipeline.records import DamagedFile

    return (ConfigError, SourceError, StoreError, BackboneError, CheckpointError, DamagedFile)


# What a command that takes a RUN (evaluate, visualize, export-slots, tokenize, cache ...) says
# after a refused write: every file egoslots writes is replaced whole or not at all.
NOT_WRITABLE_OUTPUT = (
    "make it writable, or write elsewhere (OUT / --out where the command takes one, else a copy "
    "of the run on a writable disk)"
)
KEPT_ON_FAILED_WRITE = (
    "Files written before are kept as they were (each file is replaced whole or not at all)"
)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Every command runs inside this (``egoslots.cli.LazyGroup.invoke``): a refused write
    (EACCES, EPERM, EROFS, ENOSPC, EDQUOT, also behind torch's zip writer: see
    ``egoslots.cache.location.write_file``) or an error in the user's input that no stage
    caught itself is one ``Error:`` line naming the file and what to do, not a traceback. The
    config commands word theirs first (:func:`config_command`); this is the net under all."""
    try:
        with output_writes(
            None,
            kept=KEPT_ON_FAILED_WRITE,
            resume="then rerun the same command",
            not_writable=NOT_WRITABLE_OUTPUT,
        ):
            yield
    except user_errors() as err:
        raise StageError(str(err)) from err


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


# --------------------------------------------------------------------------------------------
# Failed writes: one message builder for every stage
# --------------------------------------------------------------------------------------------
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)

# What a failed write means, by errno, and what the user can do about it.
WRITE_FAULTS = {
    errno.EACCES: "make it writable for this user, or set work_dir to a directory you can write",
    errno.EPERM: "make it writable for this user, or set work_dir to a directory you can write",
    errno.EROFS: "the file system is mounted read-only: set work_dir to a writable disk",
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is exceeded: free some space or raise the quota",
}


def write_failure(
    err: OSError, what: str, *, kept: str, resume: str, not_writable: str | None = None
) -> str:
    """The one line for an OSError while writing ``what`` (a file, "chunk 3 of STORE", ...):
    what failed and the errno's meaning, what to do (``not_writable`` replaces the advice for a
    read-only or forbidden place), what is kept, and how to resume."""
    if err.errno not in WRITE_FAULTS:
        return f"cannot write {what} ({err}). {kept}; {resume}"
    reason = f"{os.strerror(err.errno)} ({errno.errorcode[err.errno]})"
    hint = not_writable if not_writable and err.errno in NOT_WRITABLE else WRITE_FAULTS[err.errno]
    return f"cannot write {what}: {reason}: {hint}. {kept}; {resume}"


@contextmanager
def output_writes(
    out_dir: Path | None,
    kept: str = "",
    resume: str = "then rerun the same command to resume",
    not_writable: str | None = None,
) -> Iterator[None]:
    """Turn a permission / read-only / disk-full OSError inside the block into one StageError
    naming the file and the errno's meaning (no traceback); other errors pass unchanged.
    ``out_dir``: where the block writes (a path outside it is named as one that could not be
    accessed); None: anywhere (a command's own outputs). ``not_writable``: the advice for a
    read-only or forbidden place (:func:`write_failure`). A library that re-raises the OSError
    as its own error (Lightning's loggers: ``ValueError(...) from OSError``) is seen through."""
    try:
        yield
    except Exception as raised:
        err = write_fault(raised)
        if err is None:
            raise
        if out_dir is None:
            target = err.filename or "a file"
            message = write_failure(
                err, str(target), kept=kept, resume=resume, not_writable=not_writable
            )
            raise StageError(message) from raised
        target = Path(err.filename) if err.filename else out_dir
        try:
            inside = target.resolve().is_relative_to(out_dir.resolve())
        except (OSError, ValueError):
            inside = False
        kept = kept or f"Checkpoints already in {out_dir / 'checkpoints'} are kept"
        message = write_failure(
            err, str(target), kept=kept, resume=resume, not_writable=not_writable
        )
        if err.filename and not inside:  # e.g. a folder above the run directory
            message = message.replace("cannot write", "cannot access", 1)
        raise StageError(message) from raised


def write_fault(err: BaseException) -> OSError | None:
    """The refused write (an OSError of :data:`WRITE_FAULTS`) that ``err`` is, or that a
    library's own error was raised from (``raise ... from`` it); None for anything else, and
    for errors egoslots already worded for the user (click's, :func:`user_errors`)."""
    if isinstance(err, click.ClickException):
        return None
    while err is not None:
        if isinstance(err, OSError):
            return err if err.errno in WRITE_FAULTS else None
        if isinstance(err, user_errors()):
            return None
        err = err.__cause__
    return None


# --------------------------------------------------------------------------------------------
# Options that size memory
# --------------------------------------------------------------------------------------------
def check_fits_in_memory(option: str, value: int, per_item: int, items: str, note: str) -> None:
    """Refuse ``option=value`` when ``value`` items of ``per_item`` bytes each (allocated
    together: a batch) exceed the memory available now: one usage error naming the option,
    the estimate and the largest value that fits (``note`` says what was sized)."""
    too_much = memory_shortfall(value, per_item, items, note)
    if too_much:
        raise click.BadParameter(f"{too_much}: use at most {option} {too_much.bound}",
                                 param_hint=f"'{option}'")  # fmt: skip


def check_key_fits_in_memory(
    key: str, value: int, per_item: int, items: str, note: str, *, gpu: bool | None = None,
    count: int | None = None,
) -> None:  # fmt: skip
    """:func:`check_fits_in_memory` for a config key (a memory-sizing ``*.batch_size``): one
    ConfigError naming the key, the estimate and the bound, before any work (instead of an
    allocation of many GB failing, or swapping the machine, mid-run). ``gpu``: whose memory
    (None: the GPU's when torch sees one). ``count``: the items the value makes the stage
    hold (a batch never larger than a chunk: fewer than ``value``)."""
    too_much = memory_shortfall(value if count is None else count, per_item, items, note, gpu=gpu)
    if too_much:
        raise ConfigError(f"{key}={value}: {too_much}: use at most {key}={too_much.bound}")


class Shortfall(str):
    """Why a batch does not fit (the words), with the largest value that does (``bound``)."""

    bound: int


def memory_shortfall(
    value: int, per_item: int, items: str, note: str, *, gpu: bool | None = None
) -> Shortfall | None:
    """The words for ``value`` items of ``per_item`` bytes exceeding the memory available now
    (with ``.bound``, the most that fit), or None when they fit."""
    if per_item <= 0:
        return None
    available, where = available_memory() if gpu is None else available_memory(gpu)
    bound = max(1, available // per_item)
    if value <= bound:
        return None
    words = Shortfall(
        f"{value} {items} need about {human_bytes(value * per_item)} of memory "
        f"({human_bytes(per_item)} each, {note}), more than the {human_bytes(available)} of "
        f"{where} available now"
    )
    words.bound = int(bound)
    return words


def available_memory(gpu: bool | None = None) -> tuple[int, str]:
    """(bytes, where): memory available now, the GPU's when torch sees one (``gpu=None``; True:
    the GPU's, False: the host's), else the host's (``MemAvailable`` of /proc/meminfo: free
    plus reclaimable; else the free pages)."""
    import torch

    if gpu is None:
        gpu = torch.cuda.is_available()
    if gpu and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0]), "GPU memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "memory"
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "memory"


def human_bytes(n: int) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
