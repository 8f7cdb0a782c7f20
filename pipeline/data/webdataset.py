"""Tar shards in the webdataset layout that SlotContrast / VideoSAUR users already hold.

SlotContrast's ``data/save_movi.py`` and ``data/save_ytvis2021.py`` write MOVi and YT-VIS as
uncompressed tar shards; one sample is the tar members ``<key>.<field>.npy`` with the same
``<key>`` (``numpy.lib.format`` arrays):

- ``<key>.video.npy``: (T, H, W, 3) uint8 frames;
- ``<key>.segmentations.npy``: (T, H, W, 1) uint8 label maps, 0 = background (MOVi), or
  (T, H, W, I) with one channel per instance, non-zero where the instance is (YT-VIS: the value
  is its category id). Instances become labels 1..I (a later instance wins where they overlap);
- other members (``forward_flow.npy`` ...) are ignored.

``dataset.webdataset.{train,val,test}_shards`` are brace patterns as in SlotContrast's configs
(``movi_c/movi_c-train-{000000..000304}.tar``), relative to ``dataset.path`` (a folder or an
fsspec URL such as ``s3://bucket/data``) unless absolute; the pattern gives the split. Video ids
are ``<shard name without .tar>/<key>``.

Why tarfile + fsspec and not the ``webdataset`` library: webdataset streams samples in order
(shuffle buffers, one sequential pass), but a source must list a video table (ids, frame counts)
first and then read any frame range of any video on demand. Tar headers give each member's
offset and the ``.npy`` header its shape, so listing reads headers only, and a frame range is
one byte-range read (``fs.cat_file``) of a local file or a URL, never a whole shard. Brace
expansion is the only other thing webdataset would bring; :func:`expand_braces` does it.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from egoslots.pipeline.data import ListedSource
from egoslots.pipeline.data.base import (
    FileIdentity,
    Frame,
    SourceError,
    VideoInfo,
    binary_masks_to_labels,
    frame_range,
    to_rgb_uint8,
)

SPLIT_PATTERNS = (("train", "train_shards"), ("val", "val_shards"), ("test", "test_shards"))
NPY_HEADER_BYTES = 4096  # enough for any .npy header numpy writes for arrays of a few axes


# ------------------------------------------------------------------------------ brace patterns
def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion, as webdataset's shard lists use it.

    ``{000000..000304}`` is a numeric range (zero-padded to the width of its ends when they are
    padded), ``{a,b}`` a list of alternatives; groups may repeat and nest.
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, end = 0, -1
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            end = i
            break
    if end < 0:
        raise ValueError(f"unbalanced '{{' in shard pattern {pattern!r}")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        a, b = numeric.groups()
        width = max(len(a), len(b)) if a.startswith("0") or b.startswith("0") else 0
        step = 1 if int(b) >= int(a) else -1
        choices = [str(n).zfill(width) for n in range(int(a), int(b) + step, step)]
    else:
        choices = _split_top_level(body)
    return [head + c + rest for c in choices for rest in expand_braces(tail)]


def _split_top_level(body: str) -> list[str]:
    """``a,{b,c},d`` -> the expansions of ``a``, ``{b,c}`` and ``d``."""
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    parts.append(body[last:])
    if len(parts) == 1:  # "{x}" is no group, as in bash
        return ["{" + body + "}"]
    return [e for p in parts for e in expand_braces(p)]


# ------------------------------------------------------------------------------ members
def is_url(path: str) -> bool:
    return "://" in path


@dataclass(frozen=True)
class NpyMember:
    """One ``.npy`` tar member: where its array data starts and what it holds."""

    data_offset: int  # byte offset of the array data in the shard
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def frame_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class Sample:
    shard: str  # full path or URL
    video: NpyMember
    mask: NpyMember | None


def read_npy_header(f, offset: int, size: int, where: str) -> NpyMember:
    """Parse the ``.npy`` header of the member whose data starts at ``offset`` in file ``f``."""
    f.seek(offset)
    head = io.BytesIO(f.read(min(size, NPY_HEADER_BYTES)))
    try:
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
    except ValueError as err:
        raise SourceError(f"{where}: not a .npy array ({err})") from err
    return NpyMember(offset + head.tell(), tuple(shape), np.dtype(dtype), bool(fortran))


def index_shard(f, where: str, fields: tuple[str, ...]) -> dict[str, dict[str, NpyMember]]:
    """{key: {field: member}} of the ``<key>.<field>.npy`` members of an open tar shard."""
    try:
        members = tarfile.open(fileobj=f, mode="r:").getmembers()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise SourceError(
            f"{where}: not a readable uncompressed tar shard ({err}); egoslots reads the "
            "shards SlotContrast's data/save_*.py write (.tar, one sample per key)"
        ) from err
    samples: dict[str, dict[str, NpyMember]] = {}
    for m in members:
        directory, _, base = m.name.rpartition("/")
        key, _, field = base.partition(".")
        if not m.isfile() or field.removesuffix(".npy") not in fields:
            continue
        if not field.endswith(".npy"):
            raise SourceError(f"{where}: member {m.name} is not a .npy array")
        key = f"{directory}/{key}" if directory else key
        member = read_npy_header(f, m.offset_data, m.size, f"{where}: member {m.name}")
        samples.setdefault(key, {})[field.removesuffix(".npy")] = member
    return samples


# ------------------------------------------------------------------------------ the source
class WebdatasetSource(ListedSource):
    """Videos from tar shards in SlotContrast's webdataset layout (module docstring)."""

    kind = "webdataset"

    def __init__(
        self,
        root: str | Path,
        shards: dict[str, str | None],
        video_key: str = "video",
        mask_key: str | None = "segmentations",
        **common,
    ):
        super().__init__(root, **common)
        self.root = str(root) if is_url(str(root)) else Path(root)
        self.patterns = {split: p for split, p in shards.items() if p}
        if not self.patterns:
            raise SourceError(
                "dataset.source=webdataset needs shard patterns: set dataset.webdataset.train_shards "
                "(and val_shards / test_shards), e.g. movi_c/movi_c-train-{000000..000304}.tar"
            )
        self.video_key, self.mask_key = video_key, mask_key
        self._samples: dict[str, Sample] = {}

    # -- shards -------------------------------------------------------------------------------
    @staticmethod
    def _fs(path: str):
        """(filesystem, path within it); fsspec caches filesystems per process (fork-safe)."""
        import fsspec

        return fsspec.core.url_to_fs(path)

    def _shard_path(self, name: str) -> str:
        if is_url(name) or os.path.isabs(name):
            return name
        return f"{str(self.root).rstrip('/')}/{name}"

    def shards(self) -> list[tuple[str, str]]:
        """(split, shard name as the pattern spells it) of every shard, a shard in one split only."""
        out, seen = [], {}
        for split, field in SPLIT_PATTERNS:
            pattern = self.patterns.get(split)
            if not pattern:
                continue
            try:
                names = expand_braces(pattern)
            except ValueError as err:
                raise SourceError(f"dataset.webdataset.{field}: {err}") from err
            for name in names:
                if name in seen:
                    raise SourceError(
                        f"shard {name} is in both dataset.webdataset.{seen[name]} and .{field}"
                    )
                seen[name] = field
                out.append((split, name))
        return out

    def _check_root(self) -> None:
        if not is_url(str(self.root)) and not Path(self.root).exists():
            raise SourceError(f"dataset.path {self.root} does not exist")

    # -- listing ------------------------------------------------------------------------------
    def _candidates(self) -> Iterator[tuple[str, object]]:
        """Every sample of every shard; an unreadable shard is one bad 'video' under skip-bad."""
        fields = (self.video_key,) + ((self.mask_key,) if self.mask_key else ())
        for split, name in self.shards():
            path = self._shard_path(name)
            stem = name.removesuffix(".tar")
            try:
                fs, inner = self._fs(path)
                info = fs.info(inner)
                with fs.open(inner, "rb", block_size=1 << 16) as f:
                    samples = index_shard(f, path, fields)
            except FileNotFoundError as err:
                yield stem, SourceError(f"shard {path} does not exist ({err})")
                continue
            except SourceError as err:
                yield stem, err
                continue
            # name and size, never the mtime (see FileIdentity): a re-upload or a copy of the
            # same shard keeps its store
            ident = FileIdentity(name, int(info.get("size") or 0))
            for key, members in samples.items():
                yield f"{stem}/{key}", (split, path, ident, members)

    def _describe(self, video_id: str, candidate) -> VideoInfo:
        if isinstance(candidate, SourceError):
            raise candidate
        split, path, ident, members = candidate
        where = f"{path}: sample {video_id.rsplit('/', 1)[-1]}"
        video = members.get(self.video_key)
        if video is None:
            raise SourceError(
                f"{where} has no {self.video_key}.npy member (dataset.webdataset.video_key)"
            )
        if len(video.shape) != 4 or video.shape[-1] not in (1, 3, 4) or video.shape[0] < 1:
            raise SourceError(
                f"{where}: {self.video_key}.npy has shape {video.shape}, expected (T, H, W, 3)"
            )
        mask = members.get(self.mask_key) if self.mask_key else None
        if mask is not None and (len(mask.shape) != 4 or mask.shape[:3] != video.shape[:3]):
            raise SourceError(
                f"{where}: {self.mask_key}.npy has shape {mask.shape}, expected "
                f"(T, H, W, 1 or instances) matching the video {video.shape}"
            )
        self._samples[video_id] = Sample(path, video, mask)
        return VideoInfo(video_id, video.shape[0], self.split_for(video_id, split), (ident,))

    def _has_masks(self) -> bool:
        return bool(self._samples) and all(s.mask is not None for s in self._samples.values())

    # -- reading ------------------------------------------------------------------------------
    def _read_rows(self, shard: str, member: NpyMember, start: int, stop: int) -> np.ndarray:
        """Rows ``start..stop-1`` (first axis) of one array: one byte-range read."""
        fs, inner = self._fs(shard)
        if member.fortran_order:  # not what np.save writes for C arrays; read it all
            total = int(np.prod(member.shape)) * member.dtype.itemsize
            data = fs.cat_file(inner, start=member.data_offset, end=member.data_offset + total)
            return np.frombuffer(data, member.dtype).reshape(member.shape, order="F")[start:stop]
        first = member.data_offset + start * member.frame_bytes
        data = fs.cat_file(inner, start=first, end=first + (stop - start) * member.frame_bytes)
        return np.frombuffer(data, member.dtype).reshape(stop - start, *member.shape[1:])

    def read_frames(
        self, video_id: str, start: int = 0, stop: int | None = None
    ) -> Iterator[Frame]:
        if video_id not in self._samples:
            self.videos()
        if video_id not in self._samples:
            raise SourceError(f"no video '{video_id}' in {self.root}")
        sample = self._samples[video_id]
        n = sample.video.shape[0]
        stop = frame_range(video_id, start, stop, n)
        if start == stop:
            return
        where = f"{sample.shard}: sample {video_id.rsplit('/', 1)[-1]}"
        try:
            rgb = self._read_rows(sample.shard, sample.video, start, stop)  # (t, H, W, C)
            masks = None
            if sample.mask is not None and self.has_masks:
                masks = self._read_rows(sample.shard, sample.mask, start, stop)  # (t, H, W, I)
        except (OSError, ValueError) as err:
            raise SourceError(f"{where}: frames {start}..{stop}: cannot read ({err})") from err
        for offset in range(stop - start):
            i = start + offset
            fwhere = f"{where}: frame {i}"
            mask = None if masks is None else instance_labels(masks[offset], fwhere)
            yield Frame(video_id, i, to_rgb_uint8(rgb[offset], fwhere), mask)


def instance_labels(mask: np.ndarray, where: str) -> np.ndarray:
    """(H, W, 1) label map -> (H, W) uint8; (H, W, I) instance channels -> labels 1..I."""
    if mask.shape[-1] == 1:
        labels = mask[..., 0]
        if labels.dtype != np.uint8:
            if labels.size and (labels.min() < 0 or labels.max() > 255):
                raise SourceError(f"{where}: labels do not fit a uint8 label map")
            labels = labels.astype(np.uint8)
        return np.ascontiguousarray(labels)
    channels = np.moveaxis(mask != 0, -1, 0)  # (I, H, W)
    background = np.zeros((1, *channels.shape[1:]), dtype=bool)
    return binary_masks_to_labels(np.concatenate([background, channels]), where)
