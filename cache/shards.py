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

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, start), min(stop, self.shape[0])
        out = np.zeros((max(0, stop - start), *self.shape[1:]), dtype=self.dtype)
        flat = (
            out.reshape(len(out), -1).view(np.uint8).reshape(len(out), self.row_bytes)
            if len(out)
            else None
        )
        row = start
        while row < stop:
            shard, local = divmod(row, self.shard_len)
            end = min(stop, (shard + 1) * self.shard_len)
            first_inner, last_inner = (
                local // self.inner,
                (end - 1 - shard * self.shard_len) // self.inner,
            )
            path = self.root.joinpath("c", str(shard), *(["0"] * (len(self.shape) - 1)))
            with open(path, "rb") as f:
                index = self._index(shard, f)
                offsets = index[first_inner : last_inner + 1, 0]
                if (offsets == self.MISSING).any() or (
                    np.diff(offsets.astype(np.int64)) != self.stride
                ).any():
                    return None  # unusual layout: caller falls back to zarr
                lo = int(offsets[0])
                n_inner = last_inner - first_inner + 1
                buf = np.frombuffer(os.pread(f.fileno(), n_inner * self.stride, lo), dtype=np.uint8)
            if buf.size < n_inner * self.stride - 4:
                return None
            buf = np.pad(buf, (0, n_inner * self.stride - buf.size))
            rows = buf.reshape(n_inner, self.stride)[:, :-4].reshape(
                n_inner * self.inner, self.row_bytes
            )
            skip = local - first_inner * self.inner
            flat[row - start : end - start] = rows[skip : skip + end - row]
            row = end
        return out
