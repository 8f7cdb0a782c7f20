"""Reading rows of a store's arrays straight from zarr v3 shard files (local stores).

zarr's own read path costs ~1 ms per call, more than the disk for a short clip; a complete
local store with uncompressed shards is read here with one ``pread`` per shard, straight from
the shard index. Anything this reader does not recognise goes back to zarr (``None``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

IOV_MAX = 1024  # buffers per preadv call (Linux's limit)

if TYPE_CHECKING:
    from cache.store import FeatureStore


class ShardReader:
    """Reads rows of one uncompressed sharded array straight from its shard files.

    Layout (zarr v3 sharding codec, index at the end): a shard file holds its inner chunks
    back to back, each ``row_bytes * inner`` data bytes followed by a 4-byte crc32c, then an
    index of (offset, nbytes) uint64 pairs per inner chunk and the index's own crc32c. Inner
    chunks are written in order, so rows of one shard are one contiguous byte range with the
    4-byte checksums in between. Checksums are not checked here (``cache verify`` does that).
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

    def _index(self, shard: int, f) -> np.ndarray:
        if shard not in self.indexes:
            n_inner = -(-self.shard_len // self.inner)
            size = os.fstat(f.fileno()).st_size
            raw = os.pread(f.fileno(), 16 * n_inner + 4, size - 16 * n_inner - 4)
            self.indexes[shard] = np.frombuffer(raw[:-4], dtype="<u8").reshape(n_inner, 2)
        return self.indexes[shard]

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """Rows start..stop-1 (into ``out`` if given: a C-contiguous array of their shape and
        dtype), or None where the layout is not the plain one (the caller then asks zarr).

        Each shard's rows are read with one ``preadv`` straight into their place in the result,
        the 4-byte checksums between inner chunks into a scratch buffer: no copy after the
        kernel's, which matters at several hundred MB/s.
        """
        start, stop = max(0, start), min(stop, self.shape[0])
        rows = max(0, stop - start)
        if out is None:
            out = np.empty((rows, *self.shape[1:]), dtype=self.dtype)
        flat = out.reshape(rows, -1).view(np.uint8) if rows else None
        row = start
        while row < stop:
            shard, local = divmod(row, self.shard_len)
            end = min(stop, (shard + 1) * self.shard_len)
            first_inner = local // self.inner
            last_inner = (end - 1 - shard * self.shard_len) // self.inner
            path = self.root.joinpath("c", str(shard), *(["0"] * (len(self.shape) - 1)))
            with open(path, "rb") as f:
                index = self._index(shard, f)
                offsets = index[first_inner : last_inner + 1, 0]
                if (offsets == self.MISSING).any() or (
                    np.diff(offsets.astype(np.int64)) != self.stride
                ).any():
                    return None  # unusual layout: caller falls back to zarr
                skip = local - first_inner * self.inner  # rows before ours in the first chunk
                if not self._read_into(f.fileno(), int(offsets[0]), skip, flat[row - start :], end - row):
                    return None
            row = end
        return out

    def _read_into(self, fd: int, chunk_offset: int, skip: int, dest: np.ndarray, rows: int) -> bool:
        """Read ``rows`` consecutive rows, the first being row ``skip`` of the inner chunk at
        ``chunk_offset``, into ``dest`` (rows x row_bytes uint8): one preadv per IOV_MAX
        buffers, each inner chunk's rows into place and its checksum into a scratch buffer."""
        crc = bytearray(4)
        buffers: list = []
        done = 0
        first = self.inner - skip  # rows of the first inner chunk we read
        while done < rows:
            n = min(first if done == 0 else self.inner, rows - done)
            buffers.append(memoryview(dest[done : done + n]).cast("B"))
            done += n
            if done < rows:
                buffers.append(crc)
        position = chunk_offset + skip * self.row_bytes
        for i in range(0, len(buffers), IOV_MAX):
            part = buffers[i : i + IOV_MAX]
            want = sum(len(b) for b in part)
            if os.preadv(fd, part, position) != want:
                return False  # a short shard file
            position += want
        return True
