"""Which store a config means, and where stores live: finding, matching, creating, opening.

Stores live in a stores folder, ``store_dir`` (a folder or an fsspec URL) or else
``<work_dir>/stores``, each as ``<fingerprint>.zarr`` with its resolved config beside it
(``<fingerprint>.config.yaml``). A stage asks this module once and gets a
:class:`~egoslots.cache.store.FeatureStore`:

- later stages: :func:`store_for_config` (``store=`` path, URL or fingerprint, else the one
  complete store whose recorded extraction settings match the config);
- extraction: :func:`open_or_create` (the store at the config's target if its fingerprint
  matches, else a new one, race-safe across shards, local or remote);
- the ``cache`` command: :func:`find_store` (a path, URL or fingerprint prefix);
- tokenize: :func:`find_recorded_store` (where a run recorded its store, or its fingerprint).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from egoslots.cache.fingerprint import describe_differences, extraction_settings, settings_mismatch
from egoslots.cache.location import (
    Location,
    as_location,
    is_remote,
    join,
    list_zarr,
    name_of,
    remove,
    remove_file,
    store_exists,
    write_text,
)
from egoslots.cache.store import FeatureStore, StoreError, StoreUnreachable

log = logging.getLogger("egoslots")

CREATE_TIMEOUT_S = 600.0  # how long a shard waits for another shard to replace a store
REMOTE_CREATE_TIMEOUT_S = 6 * 3600.0  # ... for shard 0 to create a remote store (arrays start late)


# --------------------------------------------------------------------------------------------
# Where stores live
# --------------------------------------------------------------------------------------------
def stores_dir(work_dir: str | Path, store_dir: str | None = None) -> Location:
    """Where stores are created and looked up: ``store_dir`` (a folder or an fsspec URL such as
    ``s3://bucket/egoslots``) if set, else ``<work_dir>/stores``."""
    return as_location(store_dir) if store_dir else Path(work_dir) / "stores"


def config_stores_dir(cfg) -> Location:
    """The stores folder a config means (:func:`stores_dir` of its work_dir and store_dir)."""
    return stores_dir(cfg.work_dir, cfg.store_dir)


def store_path(folder: Location, fingerprint: str) -> Location:
    """The store of a fingerprint inside a stores folder."""
    return join(folder, f"{fingerprint}.zarr")


def config_path(path: Location) -> Location:
    """Where the resolved config of the store at ``path`` is written: ``<name>.config.yaml``."""
    if isinstance(path, Path):
        return path.with_name(path.name.removesuffix(".zarr") + ".config.yaml")
    return path.removesuffix(".zarr") + ".config.yaml"


def list_stores(folder: Location) -> list[Location]:
    """The stores (``*.zarr``) in a stores folder, local or remote; a StoreError if a remote
    folder cannot be listed (credentials, endpoint, bucket)."""
    try:
        return list_zarr(folder)
    except Exception as err:  # noqa: BLE001 - any failure to list says nothing about the stores
        if not is_remote(folder):
            raise
        raise StoreError(
            f"cannot list the stores in {folder}: {type(err).__name__}: {err}"
        ) from err


def remove_store(path: Location) -> str:
    """Delete a store and the config written beside it (local or remote); returns what was
    done, in words. A symbolic link is removed as a link: the store it points to is kept (it
    may be a shared one on another disk), and the words say where it is and how to delete it."""
    if isinstance(path, Path) and path.is_symlink():
        target = Path(os.path.realpath(path))
        path.unlink()
        remove_file(config_path(path))
        return (
            f"removed the link {path}; the store it pointed to, {target}, is kept "
            f"(delete it with `egoslots cache rm {target}`)"
        )
    remove(path)
    remove_file(config_path(path))
    return f"deleted {path}"


def resolve_link(path: Path) -> Path:
    """The folder a store path stands for: ``path`` itself, or where a symbolic link to a store
    leads (so replacing the store keeps the link and the disk it points to). A dangling link is
    a StoreError naming both ends."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if not target.exists():
        raise StoreError(
            f"{path} is a symbolic link to {target}, which does not exist: create that folder's "
            "parent, point the link at an existing store, or remove the link"
        )
    return target


def store_location(cfg, name: str | None = None) -> Location:
    """A ``store=`` value (path, URL or fingerprint) as a location: fingerprints live in the
    config's stores folder (:func:`config_stores_dir`)."""
    name = str(name if name is not None else cfg.store)
    if "://" in name:
        return as_location(name)
    path = Path(name).expanduser()
    if path.exists() or os.sep in name or name.endswith(".zarr"):
        return path
    return store_path(config_stores_dir(cfg), name)


def extraction_target(cfg, fingerprint: str) -> Location:
    """Where extraction writes the store of this config: ``store=`` if set, else its
    fingerprint's place in the stores folder."""
    return store_location(cfg) if cfg.store else store_path(config_stores_dir(cfg), fingerprint)


# --------------------------------------------------------------------------------------------
# Finding a store
# --------------------------------------------------------------------------------------------
def store_for_config(cfg) -> FeatureStore:
    """The complete store a later stage should read, or a StoreError saying what to run."""
    folder = config_stores_dir(cfg)
    if cfg.store:
        path = store_location(cfg)
        if not _exists(path):
            have = ", ".join(name_of(p) for p in list_stores(folder)) or "none"
            raise StoreError(
                f"store={cfg.store}: no feature store at {path} (stores in {folder}: {have}); "
                "run `egoslots extract-features CONFIG` with the config you extracted with"
            )
        return FeatureStore.open(path)
    wanted = extraction_settings(cfg)
    complete, incomplete, unreadable = [], [], []
    for path in list_stores(folder):
        try:
            store = FeatureStore.open(path, require_complete=False)
        except StoreError as err:  # named below if no store matches: it may be the one meant
            unreadable.append((path, err))
            continue
        if settings_mismatch(store.meta.get("settings", {}), wanted):
            continue
        (complete if store.complete else incomplete).append(store)
    if len(complete) == 1:
        return complete[0]
    if len(complete) > 1:
        names = ", ".join(f"{s.fingerprint} (created {s.meta.get('created')})" for s in complete)
        raise StoreError(
            f"several complete stores in {folder} match this config: {names}; "
            "name one with store=FINGERPRINT (see `egoslots cache ls`)"
        )
    if incomplete:
        done, total = incomplete[0].progress()
        raise StoreError(
            f"the store for this config, {incomplete[0].path}, is incomplete ({done}/{total} "
            "chunks); rerun `egoslots extract-features CONFIG` with this config to finish it"
        )
    raise StoreError(
        f"no feature store in {folder} matches this config's extraction settings "
        f"(dataset {wanted['dataset']['path']}, backbone {wanted['backbone'].get('name')}, "
        f"dtype {wanted['dtype']}, frame size {wanted['frame_size']}, hflip {wanted['hflip']}); "
        "run `egoslots extract-features CONFIG` with this config first, or set "
        "store=PATH|FINGERPRINT" + _passed_over(unreadable)
    )


def _passed_over(unreadable: list) -> str:
    """The stores a lookup could not read (damaged, edited by hand, a foreign zarr group), so
    a user whose store is among them learns why it was not used (before: not a word)."""
    if not unreadable:
        return ""
    path, err = unreadable[0]
    more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
    return f". Passed over as unreadable: {name_of(path)}{more}: {err}"


def find_store(name: str, work_dir: str, store_dir: str | None = None) -> Location:
    """A STORE argument of the ``cache`` command as a location: a URL, an existing path, or a
    fingerprint (or a unique prefix of one) in the stores folder."""
    if "://" in name:
        return as_location(name)
    path = Path(name).expanduser()
    if path.exists():
        return path
    folder = stores_dir(work_dir, store_dir)
    stores = list_stores(folder)
    candidates = [p for p in stores if name_of(p).startswith(name)]
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise StoreError(
            f"'{name}' matches several stores: {', '.join(name_of(p) for p in candidates)}"
        )
    have = ", ".join(name_of(p) for p in stores) or "none"
    raise StoreError(
        f"no store '{name}' (not a path, and no such fingerprint in {folder}; stores there: {have})"
    )


def find_recorded_store(
    fingerprint: str, recorded: list[str | None], work_dir: str | None, store_dir: str | None
) -> Location | None:
    """The first of the ``recorded`` paths that holds a store, else the fingerprint's place in
    the stores folder of ``work_dir`` / ``store_dir``; None if there is none."""
    candidates = [as_location(p) for p in recorded if p]
    if work_dir:
        candidates.append(store_path(stores_dir(work_dir, store_dir), fingerprint))
    return next((path for path in candidates if store_exists(path)), None)


def _exists(path: Location) -> bool:
    try:
        return store_exists(path)
    except Exception as err:  # noqa: BLE001 - credentials, endpoint, bucket
        raise StoreError(f"cannot reach {path}: {type(err).__name__}: {err}") from err


# --------------------------------------------------------------------------------------------
# Opening or creating the store of an extraction
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NewStore:
    """The store an extraction writes: where, its fingerprint and the inputs behind it, the
    :meth:`FeatureStore.create` arguments (layout, video table, attrs), the resolved config."""

    path: Location
    fingerprint: str
    inputs: dict
    create_kwargs: dict
    config_yaml: str


def open_or_create(new: NewStore, overwrite: bool, shard_id: int) -> FeatureStore:
    """Open the store at ``new.path`` if it has this fingerprint, else create it (race-safe
    across shards); its resolved config is written beside it.

    A store of other settings is an error listing how they differ, unless ``overwrite``: then
    shard 0 replaces it and the other shards wait for the new one. Locally, creation happens in
    a temporary folder that is renamed into place: rename is atomic, so when several shards
    race exactly one store appears and the losers open it. Object stores have no rename: see
    :func:`_open_or_create_remote`.
    """
    if is_remote(new.path):
        return _open_or_create_remote(new, overwrite, shard_id)
    link = new.path
    path, fingerprint = resolve_link(link), new.fingerprint
    if path != link:  # a store linked from elsewhere: created and replaced where it lives
        new = dataclasses.replace(new, path=path)
    deadline = time.monotonic() + CREATE_TIMEOUT_S
    while True:
        if path.exists():
            store = _matching_store(new, overwrite)
            if store is not None:
                return store
            if shard_id != 0:  # shard 0 replaces it; wait for the new one
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"shard {shard_id}: timed out waiting for shard 0 to replace {path}"
                    )
                time.sleep(1.0)
                continue
            trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:8]}")
            os.rename(path, trash)
            shutil.rmtree(trash)
            if path != link:
                log.info("--overwrite: replaced the store %s that %s links to", path, link)
            config_path(path).unlink(missing_ok=True)
            overwrite = False  # replaced once; a store appearing now is another shard's fresh one
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            FeatureStore.create(tmp, fingerprint=fingerprint, **new.create_kwargs)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"cannot create the store {path}: {err}") from err
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another shard created it first
            if time.monotonic() > deadline:
                raise StoreError(f"could not create or open {path}") from None
            continue
        log.info("created store %s", path)
        try:
            write_text(config_path(path), new.config_yaml)
        except OSError as err:  # the store is fine without it; say so rather than fail or hide it
            log.warning(
                "could not write %s (%s); the store's attrs hold the same config",
                config_path(path),
                err,
            )
        if time.monotonic() > deadline:
            raise StoreError(f"could not create or open {path}")


def _matching_store(new: NewStore, overwrite: bool) -> FeatureStore | None:
    """The existing store at ``new.path`` if it has this fingerprint; None if ``overwrite`` says
    to replace it; else a StoreError listing how its settings differ from this config's."""
    path, fingerprint = new.path, new.fingerprint
    try:
        store = FeatureStore.open(path, require_complete=False, mode="r+")
        found = store.fingerprint
    except StoreUnreachable:
        raise  # a network or credentials error says nothing about the store: never replace it
    except StoreError as err:
        store, found = None, f"unreadable ({err})"
    if found == fingerprint:
        return store
    if store is None and not FeatureStore.written_by_egoslots(path):
        raise StoreError(
            f"refusing to replace {path}: it is not an egoslots feature store ({found}); "
            "egoslots only replaces what it wrote: set store= to another path, or move it away"
        )
    if overwrite:
        log.info("--overwrite: replacing %s (fingerprint %s)", path, found)
        return None
    recorded = store.meta.get("fingerprint_inputs", {}) if store else {}
    diffs = (
        describe_differences(recorded, new.inputs) if recorded else [f"store fingerprint {found}"]
    )
    raise StoreError(
        f"{path} holds a store extracted with different settings (fingerprint {found}, this config "
        f"gives {fingerprint}):\n  - "
        + "\n  - ".join(diffs)
        + "\nrerun with --overwrite to replace it, or set store= to another path"
    )


def _open_or_create_remote(new: NewStore, overwrite: bool, shard_id: int) -> FeatureStore:
    """:func:`open_or_create` for an fsspec URL (e.g. ``s3://bucket/stores/x.zarr``).

    Shard 0 alone creates the store, in place: its egoslots attrs are written last, so a
    store without them is an unfinished creation (a kill during ``create``) that shard 0
    redoes. Other shards wait until the finished store appears (job arrays may start shard 0
    late: up to ``REMOTE_CREATE_TIMEOUT_S``).
    """
    url, started = new.path, time.monotonic()
    while True:
        if store_exists(url) and not FeatureStore.unfinished_creation(url):
            store = _matching_store(new, overwrite)
            if store is not None:
                return store
            if shard_id == 0:
                remove(url)
                overwrite = False
        if shard_id != 0:
            waited = time.monotonic() - started
            if waited > REMOTE_CREATE_TIMEOUT_S:
                raise StoreError(
                    f"shard {shard_id}: shard 0 has not created {url} in {waited / 3600:.1f} h; "
                    "start shard 0 (it alone creates a remote store), then rerun this shard"
                )
            if int(waited) % 60 == 0:
                log.info("shard %d: waiting for shard 0 to create %s", shard_id, url)
            time.sleep(1.0)
            continue
        try:
            store = FeatureStore.create(url, fingerprint=new.fingerprint, **new.create_kwargs)
            write_text(config_path(url), new.config_yaml)
        except OSError as err:
            raise StoreError(f"cannot create the store {url}: {err}") from err
        log.info("created store %s", url)
        return store
