"""Where a store lives: a local folder, or an fsspec URL such as ``s3://bucket/prefix/x.zarr``.

zarr opens both kinds itself (``FsspecStore`` for URLs). This module holds the few operations
the rest of egoslots needs beyond zarr: does a store exist, list, size and delete stores, write
the config file beside one. Local paths (and ``file://`` URLs, which are local paths) stay
``pathlib.Path`` so the fast local code paths (pread, fsync, flock) apply to them.

Credentials and endpoints never go in egoslots configs (configs are copied into every store and
run): they come from fsspec's and the cloud SDK's own settings, e.g. ``AWS_PROFILE``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``FSSPEC_S3_ENDPOINT_URL`` for an S3-compatible
server (MinIO, Ceph, moto), or ``~/.config/fsspec/s3.json``. Every process, including torchrun
ranks, SLURM tasks and DataLoader workers, then sees the same settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

Location = Path | str  # a local folder, or a remote URL (str)


def is_remote(location) -> bool:
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


def name_of(location) -> str:
    """The last part of a path or URL without ``.zarr`` (a store's fingerprint)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")


def join(location: Location, *names: str) -> Location:
    location = as_location(location)
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


def store_exists(location) -> bool:
    """Whether a zarr group (a ``zarr.json``) is at ``location``."""
    location = as_location(location)
    if isinstance(location, Path):
        return location.exists()
    fs, path = filesystem(location)
    fs.invalidate_cache(path)  # another process may have written it since we last looked
    return fs.exists(f"{path}/zarr.json")


def list_zarr(folder) -> list[Location]:
    """The ``*.zarr`` entries directly inside ``folder`` (sorted), local or remote."""
    folder = as_location(folder)
    if isinstance(folder, Path):
        return sorted(p for p in folder.iterdir() if p.suffix == ".zarr") if folder.is_dir() else []
    fs, path = filesystem(folder)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(_url(fs, e) for e in entries if e.rstrip("/").endswith(".zarr"))


def remove(location) -> None:
    """Delete a folder or remote prefix and everything under it (no error if absent)."""
    location = as_location(location)
    if isinstance(location, Path):
        import shutil

        if location.exists():
            shutil.rmtree(location)
        return
    fs, path = filesystem(location)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def size_bytes(location) -> int:
    """Total size of the files under ``location``."""
    location = as_location(location)
    if isinstance(location, Path):
        import os

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


def write_text(location, text: str) -> None:
    """Write a small text file (a local one atomically via a temporary name)."""
    location = as_location(location)
    if isinstance(location, Path):
        location.parent.mkdir(parents=True, exist_ok=True)
        tmp = location.with_name(location.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(location)
        return
    fs, path = filesystem(location)
    fs.pipe_file(path, text.encode())  # one PUT: atomic on object stores


def remove_file(location) -> None:
    location = as_location(location)
    if isinstance(location, Path):
        location.unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    if fs.exists(path):
        fs.rm_file(path)
