"""HDF5 files of image (and mask) arrays: EfficientMORL's multi-object .h5, CLEVRTex-style images.h5.

``dataset.path`` is one ``.h5``/``.hdf5`` file or a folder of them (found recursively). In each
file the image array is ``dataset.hdf5.image_key``, either at the top level or inside per-split
groups (EfficientMORL: ``train/imgs``, ``val/imgs``, ``test/imgs``; the group name gives the split,
other group names get the hash split). Masks (``dataset.hdf5.mask_key``, null for none) sit
beside their images. ``dataset.hdf5.layout`` says what the leading axes are:

- ``video``: images (V, T, H, W[, C]) — V videos of T frames;
- ``image``: images (N, H, W[, C]) — each image a one-frame video.

After the leading axes, images are (H, W) grey, (H, W, C) or (C, H, W) with C in 1, 3, 4 (uint8,
or floats in [0, 1]); masks are (H, W[, 1]) uint8 label maps or (K, H, W[, 1]) binary per-object
masks with slot 0 the background (EfficientMORL's ``masks`` (N, K, H, W, 1)), converted to label
maps with ``binary_masks_to_labels``. EfficientMORL's own files use ``image_key=imgs``,
``mask_key=masks``, ``layout=image``.

Video ids: ``<group>/<index>`` (index zero-padded to 6 digits), prefixed by the file's path
relative to the folder (without suffix) when ``dataset.path`` is a folder. Files are opened
lazily, once per process (h5py handles never cross a fork).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from natsort import natsorted, ns

from egoslots.pipeline.data import ListedSource
from egoslots.pipeline.data.base import (
    FileIdentity,
    Frame,
    SourceError,
    VideoInfo,
    binary_masks_to_labels,
    float_pixel_scale,
    frame_range,
    to_rgb_uint8,
)

H5_SUFFIXES = (".h5", ".hdf5")
LAYOUTS = {"video": 2, "image": 1}  # layout -> number of leading axes
SPLIT_GROUPS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class _Arrays:
    """One image array (and its masks) inside a file, with how to read them."""

    file: Path
    group: str  # "" = top level
    channels_first: bool
    mask_kind: str | None  # None | "labels" | "binary"


class Hdf5Source(ListedSource):
    """Videos (or images) stored as HDF5 arrays; see the module docstring for the layouts."""

    kind = "hdf5"

    def __init__(
        self,
        root: str | Path,
        image_key: str = "image",
        mask_key: str | None = "mask",
        layout: str = "video",
        **common,
    ):
        super().__init__(root, **common)
        if layout not in LAYOUTS:
            raise SourceError(f"dataset.hdf5.layout '{layout}' is not one of {', '.join(LAYOUTS)}")
        self.image_key, self.mask_key, self.layout = image_key, mask_key, layout
        self._index: dict[
            str, tuple[_Arrays, int]
        ] = {}  # video id -> (arrays, index on the first axis)
        self._masked = True
        self._open_files: dict | None = None  # {path: h5py.File}, of process _open_pid
        self._open_pid: int | None = None
        self._float_scales: dict[tuple, float] = {}  # see _float_scale

    # -- listing ------------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        if self.root.is_file():
            return [self.root]
        files = [p for p in self.root.rglob("*") if p.suffix.lower() in H5_SUFFIXES and p.is_file()]
        return natsorted(files, key=lambda p: p.relative_to(self.root).as_posix(), alg=ns.PATH)

    def _candidates(self) -> Iterator[tuple[str, object]]:
        """Every video of every array; a bad file or group is one bad 'video' under skip-bad."""
        for path in self._files():
            prefix = (
                ""
                if self.root.is_file()
                else path.relative_to(self.root).with_suffix("").as_posix() + "/"
            )
            try:
                groups = self._inspect_file(path)
            except SourceError as err:
                yield prefix.rstrip("/") or path.name, err
                continue
            stat = path.stat()
            ident = FileIdentity(
                path.name if self.root.is_file() else path.relative_to(self.root).as_posix(),
                stat.st_size,
            )
            for arrays, count, length in groups:
                base = prefix + (arrays.group + "/" if arrays.group else "")
                for v in range(count):
                    yield f"{base}{v:06d}", (arrays, v, length, ident)

    def _describe(self, video_id: str, candidate) -> VideoInfo:
        if isinstance(candidate, SourceError):
            raise candidate
        arrays, v, length, ident = candidate
        self._index[video_id] = (arrays, v)
        self._masked = self._masked and arrays.mask_kind is not None
        given = SPLIT_GROUPS.get(arrays.group.rsplit("/", 1)[-1].lower()) if arrays.group else None
        return VideoInfo(video_id, length, self.split_for(video_id, given), (ident,))

    def _inspect_file(self, path: Path) -> list[tuple[_Arrays, int, int]]:
        """(arrays, number of videos, frames per video) of each group holding the image key."""
        try:
            with h5py.File(path, "r") as f:
                groups = self._image_groups(f)
                if not groups:
                    raise SourceError(
                        f"{path}: no dataset '{self.image_key}' (dataset.hdf5.image_key) at the top "
                        f"level or in a group; {self._describe_keys(f, self.image_key)}"
                    )
                return [self._check_group(path, f, g) for g in groups]
        except SourceError:
            raise
        except (OSError, ValueError, KeyError) as err:
            raise SourceError(f"{path}: cannot read HDF5 file ({err})") from err

    def _image_groups(self, f: h5py.File) -> list[str]:
        if isinstance(f.get(self.image_key), h5py.Dataset):
            return [""]
        return natsorted(
            [
                name
                for name, node in f.items()
                if isinstance(node, h5py.Group)
                and isinstance(node.get(self.image_key), h5py.Dataset)
            ]
        )

    def _describe_keys(self, f: h5py.File, wanted: str) -> str:
        found = []
        f.visititems(
            lambda name, node: (
                found.append(f"{name} {node.shape}") if isinstance(node, h5py.Dataset) else None
            )
        )
        names = [k.split(" ")[0].rsplit("/", 1)[-1] for k in found]
        close = difflib.get_close_matches(wanted, names, n=1, cutoff=0.4)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        listing = (
            ", ".join(found[:20]) + (" ..." if len(found) > 20 else "") if found else "no datasets"
        )
        return f"the file has: {listing}{hint}"

    def _check_group(self, path: Path, f: h5py.File, group: str) -> tuple[_Arrays, int, int]:
        node = f[group] if group else f
        where = f"{path}:{'/' + group if group else ''}/{self.image_key}"
        images = node[self.image_key]
        lead = LAYOUTS[self.layout]
        rest = images.shape[lead:]
        if images.ndim < lead + 2 or len(rest) > 3:
            raise SourceError(
                f"{where}: shape {images.shape} does not fit dataset.hdf5.layout={self.layout} "
                f"({'(V, T, H, W[, C])' if lead == 2 else '(N, H, W[, C])'})"
            )
        channels_first = len(rest) == 3 and rest[-1] not in (1, 3, 4) and rest[0] in (1, 3, 4)
        if len(rest) == 3 and not channels_first and rest[-1] not in (1, 3, 4):
            raise SourceError(f"{where}: shape {images.shape}: expected 1, 3 or 4 channels")
        hw = tuple(rest[1:] if channels_first else rest[:2])
        mask_kind = None
        if self.mask_key is not None:
            if not isinstance(node.get(self.mask_key), h5py.Dataset):
                raise SourceError(
                    f"{path}: no dataset '{self.mask_key}' (dataset.hdf5.mask_key) beside "
                    f"'{self.image_key}'; set dataset.hdf5.mask_key=null for files without masks; "
                    f"{self._describe_keys(f, self.mask_key)}"
                )
            masks = node[self.mask_key]
            mwhere = f"{path}:{'/' + group if group else ''}/{self.mask_key}"
            if masks.shape[:lead] != images.shape[:lead]:
                raise SourceError(
                    f"{mwhere}: shape {masks.shape} does not match the images {images.shape}"
                )
            mrest = masks.shape[lead:]
            if mrest[-1:] == (1,) and len(mrest) in (3, 4):
                mrest = mrest[:-1]
            if len(mrest) == 2:
                mask_kind = "labels"
            elif len(mrest) == 3:
                mask_kind = "binary"
            if mask_kind is None or tuple(mrest[-2:]) != hw:
                raise SourceError(
                    f"{mwhere}: mask shape {masks.shape} does not match the frames' size "
                    f"{hw[1]}x{hw[0]} (images {images.shape}); expected (..., H, W[, 1]) label "
                    "maps or (..., K, H, W[, 1]) binary masks"
                )
        count, length = images.shape[0], (images.shape[1] if lead == 2 else 1)
        return _Arrays(path, group, channels_first, mask_kind), count, length

    def _has_masks(self) -> bool:
        return bool(self._index) and self._masked

    # -- reading ------------------------------------------------------------------------------
    def _file(self, path: Path) -> h5py.File:
        if self._open_pid != os.getpid() or self._open_files is None:
            self._open_files, self._open_pid = (
                {},
                os.getpid(),
            )  # a forked child opens its own handles
        if path not in self._open_files:
            try:
                self._open_files[path] = h5py.File(path, "r")
            except OSError as err:
                raise SourceError(f"{path}: cannot open HDF5 file ({err})") from err
        return self._open_files[path]

    def read_frames(
        self, video_id: str, start: int = 0, stop: int | None = None
    ) -> Iterator[Frame]:
        if video_id not in self._index:
            self.videos()
        if video_id not in self._index:
            raise SourceError(f"no video '{video_id}' in {self.root}")
        arrays, v = self._index[video_id]
        lead = LAYOUTS[self.layout]
        node = self._file(arrays.file)
        node = node[arrays.group] if arrays.group else node
        images = node[self.image_key]
        n = images.shape[1] if lead == 2 else 1
        stop = frame_range(video_id, start, stop, n)
        if start == stop:
            return
        where = f"{arrays.file}:{'/' + arrays.group if arrays.group else ''}"
        try:
            scale = self._float_scale(arrays, images, v, lead)
            block = images[v, start:stop] if lead == 2 else images[v : v + 1]
            masks = None
            if arrays.mask_kind is not None and self.has_masks:
                masks = node[self.mask_key]
                masks = masks[v, start:stop] if lead == 2 else masks[v : v + 1]
        except (OSError, ValueError) as err:
            raise SourceError(
                f"{where}: video '{video_id}' frames {start}..{stop}: cannot read ({err})"
            ) from err
        for offset in range(stop - start):
            i = start + offset
            fwhere = f"{where}/{self.image_key}[{v}]: frame {i} of video '{video_id}'"
            img = block[offset]
            if arrays.channels_first:
                img = np.moveaxis(img, 0, -1)
            rgb = to_rgb_uint8(img, fwhere, scale)
            mask = None
            if masks is not None:
                mask = self._labels(
                    masks[offset], arrays.mask_kind, f"{where}/{self.mask_key}[{v}]: frame {i}"
                )
            yield Frame(video_id, i, rgb, mask)

    SCALE_SAMPLE = 1024  # image layout: images whose brightest pixel decides an array's range

    def _float_scale(self, arrays: _Arrays, images, v: int, lead: int) -> float:
        """The multiplier of float pixels (``base.float_pixel_scale``), decided once per video
        from its brightest pixel: the whole video for the ``video`` layout; for ``image`` (each
        image a one-frame video) once per array, from its first ``SCALE_SAMPLE`` images."""
        if not np.issubdtype(images.dtype, np.floating):
            return 255.0
        key = (arrays.file, arrays.group, v if lead == 2 else None)
        if key not in self._float_scales:
            if lead == 2:
                length, step = images.shape[1], 64
                parts = (images[v, a : a + step] for a in range(0, length, step))
            else:
                parts = (
                    images[a : a + 256] for a in range(0, min(len(images), self.SCALE_SAMPLE), 256)
                )
            top = max((float(np.nanmax(p)) for p in parts if p.size), default=0.0)
            self._float_scales[key] = float_pixel_scale(top)
        return self._float_scales[key]

    @staticmethod
    def _labels(m: np.ndarray, kind: str, where: str) -> np.ndarray:
        if m.ndim >= 3 and m.shape[-1] == 1:
            m = m[..., 0]
        if kind == "binary":
            return binary_masks_to_labels(m, where)
        if m.dtype != np.uint8:
            if m.size and (np.nanmin(m) < 0 or np.nanmax(m) > 255):
                raise SourceError(
                    f"{where}: labels {np.nanmin(m)}..{np.nanmax(m)} do not fit a uint8 label map"
                )
            m = m.astype(np.uint8)
        return np.ascontiguousarray(m)
