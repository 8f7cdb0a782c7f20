"""Files and folders at a location: a local path, or an fsspec URL such as ``s3://bucket/x.zarr``.

zarr opens both kinds of store itself (``FsspecStore`` for URLs). This module holds the few file
operations the rest of egoslots needs beyond zarr: does a store exist, list, size and delete
stores, and write a file whole or not at all (:func:`write_file`, the one atomic writer every
stage uses for configs, run files, checkpoints and metrics). Local paths (and ``file://`` URLs,
which are local paths) stay ``pathlib.Path`` so the fast local code paths (pread, fsync, flock)
apply to them.

A user's path or URL becomes a :data:`Location` once, with :func:`as_location`, where it enters
egoslots (the store catalog, ``FeatureStore.open``); everything here takes one already resolved.

Credentials and endpoints never go in egoslots configs (configs are copied into every store and
run): they come from fsspec's and the cloud SDK's own settings, e.g. ``AWS_PROFILE``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``FSSPEC_S3_ENDPOINT_URL`` for an S3-compatible
server (MinIO, Ceph, moto), or ``~/.config/fsspec/s3.json``. Every process, including torchrun
ranks, SLURM tasks and DataLoader workers, then sees the same settings.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

Location = Path | str  # a local folder or file, or a remote URL (str)


def is_remote(location: Location) -> bool:
    """True for a URL other than ``file://`` (those are plain local paths)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def as_location(location) -> Location:
    """A user's path or URL in the form the store code uses: Path if local, else the URL."""
    text = str(location)
    if text.startswith("file://"):
        return Path(text[len("file://") :]).expanduser()
    if is_remote(text):
        return text.rstrip("/")
    return Path(text).expanduser()


def name_of(location: Location) -> str:
    """The last part of a path or URL without ``.zarr`` (a store's fingerprint)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")


def join(location: Location, *names: str) -> Location:
    if isinstance(location, Path):
        return location.joinpath(*names)
    return "/".join([location, *names])


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a remote URL."""
    import fsspec.core

    return fsspec.core.url_to_fs(url)


def _url(fs, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{path.rstrip('/')}"


def store_exists(location: Location) -> bool:
    """Whether a zarr group (a ``zarr.json``) is at ``location``."""
    if isinstance(location, Path):
        return location.exists()
    fs, path = filesystem(location)
    fs.invalidate_cache(path)  # another process may have written it since we last looked
    return fs.exists(f"{path}/zarr.json")


def list_zarr(folder: Location) -> list[Location]:
    """The ``*.zarr`` entries directly inside ``folder`` (sorted), local or remote."""
    if isinstance(folder, Path):
        return sorted(p for p in folder.iterdir() if p.suffix == ".zarr") if folder.is_dir() else []
    fs, path = filesystem(folder)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(_url(fs, e) for e in entries if e.rstrip("/").endswith(".zarr"))


def remove(location: Location) -> None:
    """Delete a folder or remote prefix and everything under it (no error if absent)."""
    if isinstance(location, Path):
        if location.exists():
            shutil.rmtree(location)
        return
    fs, path = filesystem(location)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_file(location: Location) -> None:
    if isinstance(location, Path):
        location.unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    if fs.exists(path):
        fs.rm_file(path)


def size_bytes(location: Location) -> int:
    """Total size of the files under ``location``."""
    if isinstance(location, Path):
        total = 0
        for dirpath, _, files in os.walk(location):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except OSError:
                    pass
        return total
    fs, path = filesystem(location)
    return int(fs.du(path, total=True))


def remote_keys(url: str) -> Iterator[str]:
    """Every object key under ``url``, relative to it (one listing, for ``cache verify``)."""
    fs, path = filesystem(url)
    prefix = path.rstrip("/") + "/"
    for key in fs.find(path):
        yield key[len(prefix) :] if key.startswith(prefix) else key


# --------------------------------------------------------------------------------------------
# Writing a file whole or not at all
# --------------------------------------------------------------------------------------------
def write_file(location: Location, write: Callable[[BinaryIO], object]) -> None:
    """Write the file at ``location`` with ``write(f)``, atomically: readers see the old file or
    the new one, never a part.

    A local file is written to a hidden temporary beside it (``.NAME.tmp-PID``), fsynced and
    renamed over it; an OSError names the file, not its temporary, and torch's zip-writer error
    becomes the OSError it hides (:func:`hidden_errno`), so one handler
    (``egoslots.stages.machinery.common.output_writes``) words every failed write. A remote file is one upload
    (object stores replace an object whole). Parent folders are created.
    """
    if not isinstance(location, Path):
        buffer = io.BytesIO()
        write(buffer)
        fs, path = filesystem(location)
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        fs.pipe_file(path, buffer.getvalue())
        return
    location.parent.mkdir(parents=True, exist_ok=True)
    tmp = location.with_name(f".{location.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, location)
    except OSError as err:  # name the file, not its temporary
        raise type(err)(err.errno, err.strerror, str(location)) from err
    except RuntimeError as err:  # torch's zip writer hides the OSError behind its own error
        code = hidden_errno(err, location.parent)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(location)) from err
    finally:
        tmp.unlink(missing_ok=True)


# Free space below which a writer's failure is taken for a full disk (one write chunk of a
# checkpoint is at most a tensor's storage; a disk that failed a write has less than that left).
FULL_DISK_BYTES = 64 * 2**20
# What torch's zip writer says when a write under it failed (writing to a path, or to a file
# object whose write raised: then the OSError is its __context__).
TORCH_WRITER_FAILURES = ("PytorchStreamWriter failed", "file write failed", "inline_container")


def hidden_errno(err: BaseException, folder: Path) -> int | None:
    """The errno behind torch's zip-writer error (``RuntimeError: PytorchStreamWriter failed
    writing file ...``, or ``[enforce fail at inline_container.cc] unexpected pos`` when the
    file object's write raised): the OSError it was raised from or during, if any, else what
    the file system says now: ENOSPC when ``folder``'s disk is (almost) full, EROFS when it is
    mounted read-only. None: another error, or no write fault egoslots can name."""
    if not any(sign in str(err) for sign in TORCH_WRITER_FAILURES):
        return None
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return cause.errno
        cause = cause.__cause__ or cause.__context__
    try:
        disk = os.statvfs(folder)
    except OSError:
        return None
    if disk.f_flag & os.ST_RDONLY:
        return errno.EROFS
    free = disk.f_bfree if os.geteuid() == 0 else disk.f_bavail  # root may use reserved blocks
    if free * disk.f_frsize < FULL_DISK_BYTES:
        return errno.ENOSPC
    return None


def write_bytes(location: Location, data: bytes) -> None:
    """:func:`write_file` with these bytes."""
    write_file(location, lambda f: f.write(data))


def write_text(location: Location, text: str) -> None:
    """:func:`write_file` with this text (UTF-8)."""
    write_bytes(location, text.encode("utf-8"))


def remove_orphans(paths: Iterable[Path]) -> None:
    """Delete the temporaries of writes a kill cut short: files or folders named ``...-PID``
    whose process is gone (or is this one, which is not writing them now). Another running
    process's temporaries are left alone; names without a PID are not ours to judge."""
    for path in paths:
        pid = path.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or (int(pid) != os.getpid() and process_running(int(pid))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True
