"""Reading rows of a store's arrays straight from zarr v3 shard files (local stores).

zarr's own read path costs ~1 ms per call, more than the disk for a short clip; a complete
local store with uncompressed shards is read here with one ``pread`` per shard, straight from
the shard index. Anything this reader does not recognise goes back to zarr (``None``).

Every byte this reader returns has had its crc32c checked, as zarr checks it: the shard index's
checksum when the index is first read, each inner chunk's checksum on every read (a chunk read
only in part is read whole into a scratch buffer and checked there). A mismatch raises
:class:`ChecksumMismatch`; the store turns it into one error naming the store, array and chunk.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import google_crc32c
import numpy as np

IOV_MAX = 1024  # buffers per preadv call (Linux's limit)
OPEN_FILES = 64  # shard files a reader keeps open

if TYPE_CHECKING:
    from egoslots.cache.store import FeatureStore


class ChecksumMismatch(Exception):
    """Bytes of a shard file whose crc32c does not match the one stored beside them."""

    def __init__(self, shard: int, path: str, rows: tuple[int, int] | None):
        self.shard, self.path, self.rows = shard, path, rows  # rows None: the shard index
        what = "its index" if rows is None else f"rows {rows[0]}..{rows[1] - 1}"
        super().__init__(f"checksum mismatch in shard {shard} ({path}), {what}")


def crc_ok(data, stored) -> bool:
    """True if the crc32c of ``data`` equals the little-endian uint32 ``stored`` (4 bytes)."""
    # as a numpy array: the C extension takes no memoryview or bytearray (and copies bytes)
    return google_crc32c.value(np.frombuffer(data, dtype=np.uint8)) == int.from_bytes(
        bytes(stored), "little"
    )


class ShardReader:
    """Reads rows of one uncompressed sharded array straight from its shard files.

    Layout (zarr v3 sharding codec, index at the end): a shard file holds its inner chunks
    back to back, each ``row_bytes * inner`` data bytes followed by a 4-byte crc32c, then an
    index of (offset, nbytes) uint64 pairs per inner chunk and the index's own crc32c. Inner
    chunks are written in order, so rows of one shard are one contiguous byte range with the
    4-byte checksums in between. Every checksum covering returned bytes is checked (see the
    module docstring).
    """

    MISSING = 2**64 - 1

    def __init__(self, root: Path, name: str, shape, dtype, shard_len: int, inner: int):
        self.root, self.name = root, name
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.shard_len, self.inner = shard_len, inner
        self.row_items = int(np.prod(self.shape[1:], dtype=np.int64))
        self.row_bytes = self.row_items * self.dtype.itemsize
        self.stride = self.row_bytes * inner + 4  # one inner chunk + its crc32c
        self.indexes: dict[int, np.ndarray] = {}
        self.back_to_back: dict[int, bool] = {}  # shard -> all its inner chunks in order
        self.files: OrderedDict[int, int] = OrderedDict()  # shard -> open fd, most recent last
        self.folder = str(root.joinpath("c"))
        self.tail = os.sep.join(["0"] * (len(self.shape) - 1))

    def _path(self, shard: int) -> str:
        return os.path.join(self.folder, str(shard), self.tail)

    def _fd(self, shard: int) -> int:
        """An open descriptor of a shard file: kept open (up to OPEN_FILES), since opening a
        file for every clip cost as much as reading it."""
        fd = self.files.pop(shard, None)
        if fd is None:
            fd = os.open(self._path(shard), os.O_RDONLY)
            if len(self.files) >= OPEN_FILES:
                os.close(self.files.popitem(last=False)[1])
        self.files[shard] = fd
        return fd

    def close(self) -> None:
        while self.files:
            os.close(self.files.popitem()[1])

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    @classmethod
    def for_array(cls, store: FeatureStore, name: str) -> ShardReader | None:
        """A reader if ``name`` has the plain layout this class understands, else None."""
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

        if not isinstance(store.path, Path) or name not in store.group:
            return None
        array = store.group[name]
        codecs = array.metadata.codecs if hasattr(array.metadata, "codecs") else ()
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        shard = codecs[0]
        inner_codecs = tuple(shard.codecs)
        plain = (
            len(inner_codecs) == 2
            and isinstance(inner_codecs[0], BytesCodec)
            and isinstance(inner_codecs[1], Crc32cCodec)
            and shard.index_location.value == "end"
            and (array.dtype.itemsize == 1 or inner_codecs[0].endian.value == "little")
        )
        shard_shape, inner_shape = array.metadata.chunk_grid.chunk_shape, shard.chunk_shape
        if (
            not plain
            or tuple(shard_shape[1:]) != tuple(array.shape[1:])
            or tuple(inner_shape[1:]) != tuple(array.shape[1:])
        ):
            return None
        return cls(
            Path(store.path) / name, name, array.shape, array.dtype, shard_shape[0], inner_shape[0]
        )

    def _index(self, shard: int, fd: int) -> np.ndarray:
        if shard not in self.indexes:
            n_inner = -(-self.shard_len // self.inner)
            size = os.fstat(fd).st_size
            raw = os.pread(fd, 16 * n_inner + 4, size - 16 * n_inner - 4)
            if len(raw) != 16 * n_inner + 4 or not crc_ok(raw[:-4], raw[-4:]):
                raise ChecksumMismatch(shard, self._path(shard), None)
            self.indexes[shard] = np.frombuffer(raw[:-4], dtype="<u8").reshape(n_inner, 2)
        return self.indexes[shard]

    def _shards(self, start: int, stop: int):
        """(shard, first row, stop row) of each shard that rows start..stop-1 touch."""
        row = start
        while row < stop:
            shard = row // self.shard_len
            end = min(stop, (shard + 1) * self.shard_len)
            yield shard, row, end
            row = end

    def _offset(self, shard: int, fd: int, row: int, end: int) -> int | None:
        """Byte offset of ``row`` in its shard file (rows row..end-1 lie in one shard), or None
        if their inner chunks are not back to back (an unusual layout)."""
        local = row - shard * self.shard_len
        first, last = local // self.inner, (end - 1 - shard * self.shard_len) // self.inner
        index = self._index(shard, fd)
        if shard not in self.back_to_back:  # the usual case, checked once per shard
            offsets = index[:, 0]
            self.back_to_back[shard] = bool(
                (offsets != self.MISSING).all()
                and (np.diff(offsets.astype(np.int64)) == self.stride).all()
            )
        if not self.back_to_back[shard]:
            offsets = index[first : last + 1, 0]
            if (offsets == self.MISSING).any() or (
                np.diff(offsets.astype(np.int64)) != self.stride
            ).any():
                return None
        return int(index[first, 0]) + (local - first * self.inner) * self.row_bytes

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """Rows start..stop-1 (into ``out`` if given: a C-contiguous array of their shape and
        dtype), or None where the layout is not the plain one (the caller then asks zarr).

        Each shard's rows are read with one ``preadv`` straight into their place in the result,
        the 4-byte checksums between inner chunks into a scratch buffer: no copy after the
        kernel's, which matters at several hundred MB/s.
        """
        start, stop = max(0, start), min(stop, self.shape[0])
        if out is None:
            out = np.empty((max(0, stop - start), *self.shape[1:]), dtype=self.dtype)
        flat = out.reshape(len(out), -1).view(np.uint8) if len(out) else None
        for shard, row, end in self._shards(start, stop):
            fd = self._fd(shard)
            offset = self._offset(shard, fd, row, end)
            skip = (row - shard * self.shard_len) % self.inner  # rows before it in its chunk
            if offset is None or not self._read_into(
                fd, offset, skip, flat[row - start : end - start], shard, row
            ):
                return None  # unusual layout or short file: the caller falls back to zarr
        return out

    def advise(self, start: int, stop: int) -> None:
        """Ask the kernel to start reading rows start..stop-1 now (``posix_fadvise WILLNEED``),
        so that the reads of a whole batch of clips from a cold disk run in parallel."""
        start, stop = max(0, start), min(stop, self.shape[0])
        for shard, row, end in self._shards(start, stop):
            fd = self._fd(shard)
            offset = self._offset(shard, fd, row, end)
            if offset is not None:
                length = (end - row) * self.row_bytes + ((end - row) // self.inner + 1) * 4
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)

    def _read_into(
        self, fd: int, position: int, skip: int, dest: np.ndarray, shard: int, row: int
    ) -> bool:
        """Read len(dest) consecutive rows (row ``row`` of the array onwards) starting at byte
        ``position``, row ``skip`` of its inner chunk, into ``dest`` (rows x row_bytes uint8),
        and check every inner chunk's crc32c. One preadv per IOV_MAX buffers: whole inner chunks
        go straight into place, their checksums into a scratch buffer; an inner chunk needed
        only in part (the first or last, with inner chunks of several rows) is read whole into
        a scratch buffer, checked there and its rows copied."""
        rows, buffers, checks, partial, done = len(dest), [], [], [], 0
        position -= skip * self.row_bytes  # the first inner chunk's start
        crcs = bytearray(4 * (-(-(rows + skip) // self.inner)))
        while done < rows:
            first = skip if done == 0 else 0  # rows of this inner chunk before the wanted ones
            n = min(self.inner - first, rows - done)
            crc = memoryview(crcs)[4 * len(checks) : 4 * len(checks) + 4]
            if n == self.inner:
                data = memoryview(dest[done : done + n]).cast("B")
            else:
                data = memoryview(bytearray(self.inner * self.row_bytes))
                partial.append((data, first, done, n))
            buffers += [data, crc]
            checks.append((data, crc, row + done - first))
            done += n
        for i in range(0, len(buffers), IOV_MAX):
            part = buffers[i : i + IOV_MAX]
            want = sum(len(b) for b in part)
            if os.preadv(fd, part, position) != want:
                return False  # a short shard file
            position += want
        for data, crc, first_row in checks:
            if not crc_ok(data, crc):
                raise ChecksumMismatch(
                    shard, self._path(shard), (first_row, first_row + self.inner)
                )
        for data, first, done, n in partial:
            rows_of = np.frombuffer(data, dtype=np.uint8).reshape(self.inner, self.row_bytes)
            dest[done : done + n] = rows_of[first : first + n]
        return True
