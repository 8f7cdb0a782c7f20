"""The feature store: one self-describing zarr v3 group per extraction fingerprint.

Layout (see ``docs/store-format.md``)::

    <work_dir>/stores/<fingerprint>.zarr/
        zarr.json                attrs["egoslots"]: format, fingerprint, backbone, grid, dtypes,
                                 normalisation, resolved config, versions, times, video table
        features   (F, N, D)     float16 | bfloat16 | float32 | int8
        features_scale (F, N)    float32, only for int8 (per-token absmax / 127)
        frames     (F, S, S, 3)  uint8, resized frames for stage 2 and pictures
        masks      (F, S, S)     uint8 label maps, where the source has them
        done       (num_chunks,) uint8, 1 once every array's chunk c is written
        tokens/<dvae-hash>/      written by stage 2: ids (F, h, w) uint16 and its own done

All arrays share one flat frame axis and one chunk length C along it, so "chunk c" means
frames [c*C, (c+1)*C) in every array. A chunk is the unit of work, of resume and of sharding
(a writer owns whole chunks, so concurrent writers never touch the same file). The ``done``
flag of a chunk is written only after all its data chunks are written and fsynced, so a
killed job resumes by redoing exactly the chunks whose flag is 0.

On disk each chunk c is one zarr *shard* file per array (``features/c/<c>/0/0``); inside it,
small inner chunks of ``inner_chunk_len`` frames (each with a crc32c checksum) let a reader
fetch a short clip without reading the whole shard, and let ``cache verify`` detect any
corrupted byte.

One job, the format of one store (creating, opening, describing, reading, writing chunks and
token groups). Elsewhere in cache/: which store a config means and creating it race-safely
(``catalog.py``), checking and repairing it (``verify.py``), fast shard reads (``shards.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zarr

from egoslots.cache.location import Location, as_location, filesystem, is_remote, store_exists
from egoslots.cache.shards import ChecksumMismatch, ShardReader

FORMAT_VERSION = 1
ATTRS_KEY = "egoslots"
FEATURE_DTYPES = ("float16", "bfloat16", "int8", "float32")
DATA_ARRAYS = ("features", "features_scale", "frames", "masks")
SKIPPED_GROUP = "skipped"
# attrs every store has (FeatureStore.create writes them) and the type of each
REQUIRED_META = {
    "fingerprint": str,
    "complete": bool,
    "num_frames": int,
    "num_tokens": int,
    "feature_dim": int,
    "grid": list,
    "frame_size": int,
    "feature_dtype": str,
    "chunk_len": int,
    "videos": list,
}


class StoreError(RuntimeError):
    """A store that is missing, incomplete, or not what the caller needs."""

    def __str__(self) -> str:
        """The message; for one re-raised by a DataLoader worker process (torch rebuilds it from
        "Caught X in DataLoader worker process 0. Original Traceback ..."), the original message
        alone, so the user still reads one line."""
        text = super().__str__()
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if text.startswith("Caught ") and marker in text:
            return text.rsplit(marker, 1)[1].strip()
        return text


class StoreCorrupt(StoreError):
    """Stored bytes that fail their crc32c checksum: the data on disk is damaged."""


class StoreUnreachable(StoreError):
    """The store's location could not be reached (network, credentials): says nothing about it."""


@dataclass(frozen=True)
class VideoRecord:
    """One row of a store's video table: rows first..first+length-1 of every array."""

    id: str
    first: int
    length: int
    split: str
    hflip: bool = False  # rows hold the horizontally flipped frames of video `id`

    @property
    def stop(self) -> int:
        return self.first + self.length


def chunk_bounds(chunk: int, chunk_len: int, num_frames: int) -> tuple[int, int]:
    start = chunk * chunk_len
    return start, min(start + chunk_len, num_frames)


def num_chunks(num_frames: int, chunk_len: int) -> int:
    return max(1, -(-num_frames // chunk_len))


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token symmetric int8: (F, N, D) float -> int8 values and (F, N) float32 scales."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


class FeatureStore:
    """A handle on one store group. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, path: Location, group: zarr.Group):
        self.path = path  # Path if local, the URL (str) if remote
        self._group, self._pid = group, os.getpid()
        self._meta: dict | None = None

    @property
    def group(self) -> zarr.Group:
        """The zarr group. A remote store's group is reopened in a forked child (a DataLoader
        worker): its filesystem client is bound to the parent's event loop, which the child lacks."""
        if self._pid != os.getpid() and is_remote(self.path):
            mode = "r" if self._group.read_only else "r+"
            self._group = zarr.open_group(str(self.path), mode=mode, zarr_format=3)
            self._pid = os.getpid()
        return self._group

    # ------------------------------------------------------------------ creation / opening
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        fingerprint: str,
        videos: list[VideoRecord],
        num_tokens: int,
        feature_dim: int,
        grid: tuple[int, int],
        frame_size: int,
        feature_dtype: str = "float16",
        has_masks: bool = False,
        chunk_len: int = 64,
        compressor: str = "none",
        attrs: dict | None = None,
        inner_chunk_len: int = 1,
        checksum: bool = True,
    ) -> FeatureStore:
        """Make an empty store with every array allocated and every chunk marked not done."""
        num_frames = sum(v.length for v in videos)
        if num_frames == 0:
            raise StoreError("cannot create a store with no frames")
        if feature_dtype not in FEATURE_DTYPES:
            raise StoreError(
                f"unknown feature dtype '{feature_dtype}' (extract.dtype: {' | '.join(FEATURE_DTYPES)})"
            )
        inner = _inner_len(chunk_len, inner_chunk_len)
        path = as_location(path)
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        codecs = _compressors(compressor, checksum)

        def add(name, shape, dtype, compressors=codecs):
            group.create_array(
                name,
                shape=shape,
                dtype=dtype,
                shards=(chunk_len, *shape[1:]),
                chunks=(inner, *shape[1:]),
                compressors=compressors,
                fill_value=0,
                config={"write_empty_chunks": True},
            )

        # bfloat16 has no zarr dtype: stored as its upper 16 bits in uint16.
        storage = {"bfloat16": "uint16"}.get(feature_dtype, feature_dtype)
        add("features", (num_frames, num_tokens, feature_dim), storage)
        if feature_dtype == "int8":
            add("features_scale", (num_frames, num_tokens), "float32")
        add("frames", (num_frames, frame_size, frame_size, 3), "uint8")
        if has_masks:  # label maps compress ~50x with zstd at no measurable cost: always compressed
            mask_codecs = _compressors("zstd" if compressor == "none" else compressor, checksum)
            add("masks", (num_frames, frame_size, frame_size), "uint8", mask_codecs)
        group.create_array(
            "done",
            shape=(num_chunks(num_frames, chunk_len),),
            dtype="uint8",
            chunks=(1,),
            fill_value=0,
            compressors=None,
            config={"write_empty_chunks": True},
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "complete": False,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "num_frames": num_frames,
            "num_tokens": num_tokens,
            "feature_dim": feature_dim,
            "grid": list(grid),
            "frame_size": frame_size,
            "feature_dtype": feature_dtype,
            "chunk_len": chunk_len,
            "inner_chunk_len": inner,
            "compressor": compressor,
            "checksum": checksum,
            "has_masks": has_masks,
            "videos": [asdict(v) for v in videos],
        }
        meta.update(attrs or {})
        group.attrs[ATTRS_KEY] = _jsonable(meta)
        return cls(path, group)

    @classmethod
    def open(
        cls, path: str | Path, *, require_complete: bool = True, mode: str = "r"
    ) -> FeatureStore:
        """Open an existing store; by default refuse one that extraction has not finished."""
        path = as_location(path)
        try:
            exists = store_exists(path)
        except Exception as err:  # noqa: BLE001 - no credentials, unknown bucket, unreachable endpoint
            raise StoreUnreachable(
                f"cannot reach the store {path}: {type(err).__name__}: {err}"
            ) from err
        if not exists:
            raise StoreError(
                f"no feature store at {path}; run `egoslots extract-features CONFIG` first"
            )
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception as err:
            raise StoreError(f"{path} is not a readable zarr v3 store: {err}") from err
        if ATTRS_KEY not in group.attrs:
            raise StoreError(
                f"{path} is a zarr group but not an egoslots feature store (no '{ATTRS_KEY}' attrs)"
            )
        store = cls(path, group)
        if store.meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path} has store format {store.meta.get('format_version')}, this egoslots reads "
                f"format {FORMAT_VERSION}; re-extract with `egoslots extract-features CONFIG --overwrite`"
            )
        store._check_description()
        if require_complete and not store.complete:
            done, total = store.progress()
            raise StoreError(
                f"{path} is incomplete ({done}/{total} chunks written); rerun `egoslots extract-features` "
                "with the same config to finish it"
            )
        return store

    # ------------------------------------------------------------------ description
    def _check_description(self) -> None:
        """Refuse a group whose ``egoslots`` attrs or arrays are not what :meth:`create` writes
        (attrs copied onto another group, edited by hand, or cut short): every later read
        trusts them, so a gap here would be a KeyError or silently wrong rows later on."""
        meta = self.meta
        bad = [
            f"'{key}' is {meta.get(key)!r}, expected {kind.__name__}"
            for key, kind in REQUIRED_META.items()
            if not isinstance(meta.get(key), kind)
            or isinstance(meta.get(key), bool) != (kind is bool)
        ]
        if not bad and meta["feature_dtype"] not in FEATURE_DTYPES:
            bad = [f"'feature_dtype' is {meta['feature_dtype']!r}, not one of {FEATURE_DTYPES}"]
        if not bad and (
            len(meta["grid"]) != 2 or meta["grid"][0] * meta["grid"][1] != meta["num_tokens"]
        ):
            bad = [f"'grid' {meta['grid']} does not hold num_tokens={meta['num_tokens']}"]
        if not bad:
            bad = self._table_problems(meta) or self._array_problems(meta)
        if bad:
            raise StoreError(
                f"{self.path} has '{ATTRS_KEY}' attrs but is not a store egoslots wrote as "
                f"described: {'; '.join(bad[:3])}. egoslots reads only stores it wrote: "
                "re-extract it (`egoslots extract-features CONFIG --overwrite`, or `egoslots "
                "cache rm` it first)"
            )

    @staticmethod
    def _table_problems(meta: dict) -> list[str]:
        """Rows of the video table that are not {id, first, length, split[, hflip]} inside the
        frame axis."""
        rows, fields = meta["videos"], {"id", "first", "length", "split", "hflip"}
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not {"id", "first", "length", "split"} <= set(row):
                return [f"video table row {i} is {row!r}, not {{id, first, length, split}}"]
            if set(row) - fields:
                return [f"video table row {i} has unknown keys {sorted(set(row) - fields)}"]
            first, length = row["first"], row["length"]
            if not (isinstance(first, int) and isinstance(length, int)) or first < 0 or length < 0:
                return [f"video table row {i} ({row['id']}) has first={first!r}, length={length!r}"]
            if first + length > meta["num_frames"]:
                return [
                    f"video table row {i} ({row['id']}) ends at row {first + length - 1}, past "
                    f"the {meta['num_frames']} frames"
                ]
        return []

    def _array_problems(self, meta: dict) -> list[str]:
        """Arrays missing, or of other shapes or dtypes than the attrs describe."""
        n, size = meta["num_frames"], meta["frame_size"]
        storage = {"bfloat16": "uint16"}.get(meta["feature_dtype"], meta["feature_dtype"])
        wanted = {
            "features": ((n, meta["num_tokens"], meta["feature_dim"]), storage),
            "frames": ((n, size, size, 3), "uint8"),
            "done": ((num_chunks(n, meta["chunk_len"]),), "uint8"),
        }
        if meta["feature_dtype"] == "int8":
            wanted["features_scale"] = ((n, meta["num_tokens"]), "float32")
        if "masks" in self.group:
            wanted["masks"] = ((n, size, size), "uint8")
        problems = []
        for name, (shape, dtype) in wanted.items():
            if name not in self.group:
                problems.append(f"no '{name}' array")
                continue
            array = self.group[name]
            if not isinstance(array, zarr.Array):
                problems.append(f"'{name}' is not an array")
            elif tuple(array.shape) != shape or str(array.dtype) != dtype:
                problems.append(
                    f"'{name}' is {tuple(array.shape)} {array.dtype}, the attrs say {shape} {dtype}"
                )
        return problems

    @property
    def meta(self) -> dict:
        """The store's description (read once; :meth:`update_meta` writes through)."""
        if self._meta is None:
            self._meta = dict(self.group.attrs[ATTRS_KEY])
        return self._meta

    def update_meta(self, **values) -> None:
        meta = dict(self.group.attrs[ATTRS_KEY])
        meta.update(_jsonable(values))
        self.group.attrs[ATTRS_KEY] = meta
        self._meta = meta

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def videos(self) -> list[VideoRecord]:
        if getattr(self, "_videos", None) is None:
            self._videos = [VideoRecord(**v) for v in self.meta["videos"]]
        return self._videos

    def videos_in(self, split: str | None = None, hflip: bool | None = False) -> list[VideoRecord]:
        """Video rows of one split (None = all); hflip=None includes both variants."""
        return [
            v
            for v in self.videos
            if (split is None or v.split == split) and (hflip is None or v.hflip == hflip)
        ]

    @property
    def num_frames(self) -> int:
        return int(self.meta["num_frames"])

    @property
    def chunk_len(self) -> int:
        return int(self.meta["chunk_len"])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])  # type: ignore[return-value]

    @property
    def feature_dim(self) -> int:
        return int(self.meta["feature_dim"])

    @property
    def frame_size(self) -> int:
        return int(self.meta["frame_size"])

    @property
    def has_masks(self) -> bool:
        return "masks" in self.group

    @property
    def features(self) -> zarr.Array:
        return self.group["features"]

    @property
    def frames(self) -> zarr.Array:
        return self.group["frames"]

    @property
    def masks(self) -> zarr.Array | None:
        return self.group["masks"] if self.has_masks else None

    # ------------------------------------------------------------------ reading
    def read_features(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of `features` as float32 (dequantised / widened)."""
        raw = self.read_rows("features", start, stop)
        dtype = self.meta["feature_dtype"]
        if dtype == "bfloat16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if dtype == "int8":
            scale = self.read_rows("features_scale", start, stop)
            return raw.astype(np.float32) * scale[..., None]
        return raw.astype(np.float32)

    def read_rows(
        self, name: str, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows start..stop-1 of array ``name`` (e.g. ``frames``, ``tokens/<hash>/ids``), into
        ``out`` if given (C-contiguous, of their shape and the array's dtype).

        Complete local stores with uncompressed shards are read with one ``preadv`` per shard
        straight from the shard index into place (zarr's own read path costs ~1 ms per call,
        more than the disk for a short clip); anything else goes through zarr. Both give the
        same values.
        """
        reader = self._fast_reader(name)
        try:
            values = None if reader is None else reader.read(start, stop, out)
        except ChecksumMismatch as err:
            last = None if err.rows is None else min(err.rows[1], self.num_frames) - 1
            detail = "its shard index" if last is None else f"rows {err.rows[0]}..{last}"
            raise self.corrupt(name, err.shard, detail) from err
        if values is None:
            try:
                values = self.group[name][start:stop]
            except ValueError as err:  # zarr's crc32c codec: "Stored and computed checksum ..."
                if "checksum" not in str(err):
                    raise
                chunk = self._bad_chunk(name, start, stop)
                raise self.corrupt(name, chunk, "crc32c mismatch") from err
            if out is not None:
                out[...] = values
                values = out
        return values

    def corrupt(self, name: str, chunk: int | None, detail: str) -> StoreCorrupt:
        """The one error every read path raises for bytes that fail their checksum."""
        where = "a chunk" if chunk is None else f"chunk {chunk}"
        if chunk is not None:
            where += f" (file {self.chunk_file(name, chunk) or self.chunk_key(name, chunk)})"
        return StoreCorrupt(
            f"store {self.path}: array '{name}', {where} is damaged on disk ({detail}: its "
            f"crc32c checksum does not match); nothing from it was used. Run `egoslots cache "
            f"verify {self.path}` to list every damaged chunk, then add --repair and rerun the "
            "command that wrote them (extract-features / tokenize) to rewrite them"
        )

    def _bad_chunk(self, name: str, start: int, stop: int) -> int | None:
        """The first chunk of rows start..stop-1 of ``name`` that zarr cannot decode."""
        for chunk in range(start // self.chunk_len, -(-stop // self.chunk_len)):
            a, b = chunk_bounds(chunk, self.chunk_len, self.num_frames)
            try:
                self.group[name][a:b]
            except ValueError:
                return chunk
        return None

    def row_shape(self, name: str) -> tuple[int, ...]:
        """The shape of one row of array ``name`` (remembered: a zarr lookup costs ~1 ms)."""
        shapes = self.__dict__.setdefault("_row_shapes", {})
        if name not in shapes:
            shapes[name] = tuple(self.group[name].shape[1:])
        return shapes[name]

    def advise_rows(self, name: str, start: int, stop: int) -> None:
        """Tell the kernel that rows start..stop-1 of ``name`` are read soon (a cold disk then
        reads a batch's clips in parallel); nothing where the fast reader does not apply."""
        reader = self._fast_reader(name)
        if reader is not None:
            reader.advise(start, stop)

    def _fast_reader(self, name: str) -> ShardReader | None:
        cache = self.__dict__.setdefault("_readers", {})
        if name not in cache:
            cache[name] = ShardReader.for_array(self, name) if self.complete else None
        return cache[name]

    # ------------------------------------------------------------------ writing
    def encode_features(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        """float32 (n, N, D) -> {array name: values} in this store's storage dtype."""
        dtype = self.meta["feature_dtype"]
        feats = np.asarray(feats, dtype=np.float32)
        if dtype == "bfloat16":
            bits = feats.view(np.uint32)
            # round to nearest even, as torch does when casting to bfloat16
            rounded = bits + 0x7FFF + ((bits >> 16) & 1)
            return {"features": (rounded >> 16).astype(np.uint16)}
        if dtype == "int8":
            q, scale = quantize_int8(feats)
            return {"features": q, "features_scale": scale}
        return {"features": feats.astype(dtype)}

    def write_chunk(
        self, chunk: int, arrays: dict[str, np.ndarray], *, durable: bool = True
    ) -> None:
        """Write whole chunk ``chunk`` of the named arrays, then flag it done (last).

        With ``durable`` the chunk's files are fsynced before the flag is written (and the flag
        after), so a power cut or kill -9 never leaves a chunk flagged done but not on disk.
        """
        start, stop = chunk_bounds(chunk, self.chunk_len, self.num_frames)
        for name, values in arrays.items():
            if len(values) != stop - start:
                raise StoreError(
                    f"chunk {chunk} of '{name}' needs {stop - start} rows, got {len(values)}"
                )
            self.writable(name)[start:stop] = values
        if durable:
            for name in arrays:
                self.fsync_chunk(name, chunk)
        self.writable("done")[chunk] = 1
        if durable:
            self.fsync_chunk("done", chunk)

    def writable(self, name: str) -> zarr.Array:
        """Array ``name`` set to write every chunk, even all-zero ones (zarr skips those by
        default, and the setting is not stored with the array). Every chunk file then exists,
        so ``cache verify`` can tell a missing chunk from an empty one. Stage 2 writes its
        token ids through this too."""
        return self.group[name].with_config({"write_empty_chunks": True})

    def chunk_key(self, name: str, chunk: int) -> str:
        """The key (path inside the store) of chunk ``chunk`` of array ``name``: one shard."""
        ndim = len(self.group[name].shape)
        return "/".join([name, "c", str(chunk), *(["0"] * (ndim - 1))])

    def chunk_file(self, name: str, chunk: int) -> Path | None:
        """The file holding chunk ``chunk`` of array ``name`` (local stores only)."""
        if not isinstance(self.path, Path):
            return None
        return self.path / self.chunk_key(name, chunk)

    def fsync_chunk(self, name: str, chunk: int) -> None:
        """Flush one chunk file (and its folder) to disk, so a done flag never outlives its data."""
        path = self.chunk_file(name, chunk)
        if path is None or not path.exists():
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def remove_partial_files(self, under: str = "") -> None:
        """Delete the temporary files killed writes left under ``under`` (e.g. ``tokens/<hash>``).

        zarr writes a local chunk to ``NAME.<uuid>.partial`` and renames it; a kill -9 mid-write
        leaves that file, a whole chunk's size, behind. Never read, so safe to delete once every
        chunk there is done. Object stores write whole objects: nothing to do.
        """
        if isinstance(self.path, Path):
            for partial in (self.path / under).rglob("*.partial"):
                partial.unlink(missing_ok=True)

    def record_skipped(self, chunk: int, skipped: list[dict]) -> None:
        """Note videos a chunk skipped as unreadable (--skip-bad); read back by :meth:`skipped`.

        Stored as the attrs of a per-chunk group ``skipped/<chunk>`` (plain zarr, and one
        group per chunk, so concurrent shards never write the same file).
        """
        name = f"{SKIPPED_GROUP}/{chunk}"
        if not skipped:  # a redone chunk that now reads fine forgets an old skip
            if name in self.group:
                del self.group[name]
            return
        self.group.require_group(name).attrs["videos"] = _jsonable(skipped)

    def skipped(self) -> list[dict]:
        """Videos skipped as unreadable by any chunk: [{id, hflip, error}], one per video row."""
        seen: dict[tuple, dict] = {}
        if SKIPPED_GROUP in self.group:
            groups = sorted(self.group[SKIPPED_GROUP].groups(), key=lambda item: int(item[0]))
            for _, sub in groups:
                for row in sub.attrs.get("videos", []):
                    seen.setdefault((row["id"], bool(row.get("hflip"))), row)
        return list(seen.values())

    @contextlib.contextmanager
    def lock(self):
        """An exclusive inter-process lock on this store (attrs updates by concurrent shards).

        ``flock`` on the store's own directory: no extra file inside the zarr hierarchy. Object
        stores have no locks: there, marking the store complete is idempotent (every shard that
        sees all chunks done writes the same video table), and :meth:`forget_chunks` runs only
        with no writer active.
        """
        if is_remote(self.path):
            yield
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def done_chunks(self, flags: str = "done") -> np.ndarray:
        """One bool per chunk from a flag array (``done``, or ``tokens/<hash>/done``).

        Flags are one tiny file/object per chunk, and one is present exactly when it says done
        (:meth:`forget_chunks` deletes flags). Local stores read the files directly (zarr's path costs
        ~0.3 ms per flag, seconds for a million-frame store); remote stores list the flag folder
        (a few LIST requests instead of one GET per chunk: 0.6 s instead of 20 s for 3000 flags
        on a loopback S3 server).
        """
        size = self.group[flags].shape[0]
        done = np.zeros(size, dtype=bool)
        if is_remote(self.path):
            fs, root = filesystem(str(self.path))
            folder = f"{root}/{flags}/c"
            fs.invalidate_cache(folder)
            try:
                names = [key.rsplit("/", 1)[-1] for key in fs.ls(folder, detail=False)]
            except FileNotFoundError:
                names = []
            chunks = [int(n) for n in names if n.isdigit() and int(n) < size]
            done[chunks] = True
            return done
        folder = Path(self.path) / flags / "c"
        if not folder.is_dir():
            return done
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.isdigit() or int(entry.name) >= size:
                    continue
                with open(entry.path, "rb") as f:
                    raw = f.read(2)
                if len(raw) != 1:  # not the plain 1-byte layout: let zarr decode it
                    return np.asarray(self.group[flags][:], dtype=bool)
                done[int(entry.name)] = raw != b"\x00"
        return done

    def progress(self) -> tuple[int, int]:
        done = self.done_chunks()
        return int(done.sum()), int(done.size)

    def pending_chunks(self, shard_id: int = 0, num_shards: int = 1) -> list[int]:
        """Chunks not yet written that belong to this shard (chunk % num_shards == shard_id)."""
        done = self.done_chunks()
        return [c for c in range(done.size) if not done[c] and c % num_shards == shard_id]

    def mark_complete_if_done(self) -> bool:
        """Set ``complete`` once every chunk is done (dropping videos recorded as skipped)."""
        with self.lock():
            self._meta = None
            done, total = self.progress()
            if done == total and not self.complete:
                values = {"complete": True, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                # with those of an earlier completion (a repaired chunk is rewritten without its skipped videos)
                earlier = {
                    (r["id"], bool(r.get("hflip"))): r
                    for r in self.meta.get("skipped_videos") or []
                }
                skipped = list(
                    {
                        **earlier,
                        **{(r["id"], bool(r.get("hflip"))): r for r in self.skipped()},
                    }.values()
                )
                if skipped:
                    bad = {(r["id"], bool(r.get("hflip"))) for r in skipped}
                    values["videos"] = [
                        v for v in self.meta["videos"] if (v["id"], bool(v.get("hflip"))) not in bad
                    ]
                    values["skipped_videos"] = skipped
                self.update_meta(**values)
                self._videos = None
        return done == total

    # ------------------------------------------------------------------ arrays present
    def data_arrays(self) -> list[str]:
        """Names of the per-frame arrays (tokens sub-groups included) in this store."""
        names = [n for n in DATA_ARRAYS if n in self.group]
        names += [f"tokens/{h}/ids" for h in self.token_group_names()]
        return names

    @staticmethod
    def written_by_egoslots(path: Location) -> bool:
        """True if ``path`` is a zarr group egoslots made: a store of any format version (its
        ``egoslots`` attrs) or an unfinished creation. Only such a path may be deleted or
        replaced (``extract-features --overwrite``, ``cache rm``)."""
        try:
            group = zarr.open_group(str(path), mode="r", zarr_format=3)
        except Exception:  # noqa: BLE001 - not a zarr group: not ours
            return False
        return ATTRS_KEY in group.attrs or FeatureStore.unfinished_creation(path)

    @staticmethod
    def unfinished_creation(path: Location) -> bool:
        """True if ``path`` holds a zarr group that :meth:`create` started but never finished
        (no egoslots attrs yet, nothing but the arrays ``create`` makes): safe to recreate."""
        try:
            group = zarr.open_group(str(path), mode="r", zarr_format=3)
        except Exception:  # noqa: BLE001 - not even a group: not ours to touch
            return False
        known = set(DATA_ARRAYS) | {"done"}
        return ATTRS_KEY not in group.attrs and set(group.keys()) <= known

    # ------------------------------------------------------------------ tokens (stage 2)
    def token_group_names(self) -> list[str]:
        if "tokens" not in self.group:
            return []
        return sorted(name for name, _ in self.group["tokens"].groups())

    def tokens(self, dvae_hash: str, *, require_complete: bool = True) -> zarr.Array:
        """Token ids (F, h, w) uint16 written by the dVAE with this hash."""
        name = f"tokens/{dvae_hash}"
        if name not in self.group:
            have = ", ".join(self.token_group_names()) or "none"
            raise StoreError(
                f"{self.path} has no tokens of dVAE {dvae_hash} (tokens present: {have}); "
                "run `egoslots tokenize RUN` with that dVAE's run directory"
            )
        sub = self.group[name]
        ids = sub["ids"] if "ids" in sub else None
        if ids is None or ids.shape[0] != self.num_frames or str(ids.dtype) != "uint16":
            found = "no ids array" if ids is None else f"ids {tuple(ids.shape)} {ids.dtype}"
            raise StoreError(
                f"tokens of dVAE {dvae_hash} in {self.path} are not what `egoslots tokenize` "
                f"writes ({found}; expected ({self.num_frames}, h, w) uint16): rerun "
                "`egoslots tokenize RUN` to rewrite them"
            )
        if require_complete and not sub.attrs.get("complete", False):
            done = int(self.done_chunks(f"{name}/done").sum())
            raise StoreError(
                f"tokens of dVAE {dvae_hash} in {self.path} are incomplete ({done}/{sub['done'].shape[0]} "
                "chunks); rerun `egoslots tokenize RUN` to finish them"
            )
        return ids

    def create_tokens(self, dvae_hash: str, grid: tuple[int, int], attrs: dict) -> zarr.Group:
        """Allocate (or reopen, to resume) the token sub-group of one dVAE."""
        name = f"tokens/{dvae_hash}"
        if name in self.group:
            sub = self.group[name]
            if "ids" in sub and "done" in sub and sub.attrs.get("dvae_hash") == dvae_hash:
                return sub
            del self.group[name]  # a creation cut short by a kill: nothing in it is flagged done
        sub = self.group.require_group(name)
        inner = int(self.meta.get("inner_chunk_len", self.chunk_len))
        sub.create_array(
            "ids",
            shape=(self.num_frames, *grid),
            dtype="uint16",
            shards=(self.chunk_len, *grid),
            chunks=(inner, *grid),
            fill_value=0,
            compressors=_compressors("none", True),
            config={"write_empty_chunks": True},
        )
        sub.create_array(
            "done",
            shape=self.group["done"].shape,
            dtype="uint8",
            chunks=(1,),
            fill_value=0,
            compressors=None,
            config={"write_empty_chunks": True},
        )
        sub.attrs.update(
            _jsonable({"dvae_hash": dvae_hash, "grid": list(grid), "complete": False, **attrs})
        )
        return sub


def _compressors(name: str | None, checksum: bool = False) -> list | None:
    """The bytes-to-bytes codecs of every data array's inner chunks: compressor, then crc32c."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if name in ("none", None):
        codecs = []
    elif name == "zstd":
        codecs = [ZstdCodec(level=3)]
    elif name == "blosc":
        codecs = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    else:
        raise StoreError(f"unknown compressor '{name}' (extract.compressor: none | zstd | blosc)")
    if checksum:
        codecs.append(Crc32cCodec())
    return codecs or None


def _inner_len(chunk_len: int, wanted: int) -> int:
    """The largest inner chunk length <= wanted that divides the chunk (shard) length."""
    wanted = max(1, min(int(wanted), chunk_len))
    return max(d for d in range(1, wanted + 1) if chunk_len % d == 0)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))
