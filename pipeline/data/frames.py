"""Frame folders (the SAYCam layout, and what ``egoslots make-synthetic`` writes).

::

    <root>/<video>/frame1.jpg, frame2.jpg, ..., frame10.jpg   JPEG or PNG, natural sort order
    <root>/<video>/masks/frame1.png ...                        optional uint8 label maps (0 = background)
    <root>/<video>/meta.json                                   optional: fps, split, objects

Video folders may be nested (``<root>/child_S/2013_08/``): the video id is the folder path
relative to the root, with ``/``. A folder is a video if it holds frames, or if it is a leaf
(then it is reported as an empty video). Hidden names (``.partial-*`` folders of a generator
still writing) are ignored. ``meta.json``'s ``split`` overrides the hash split; its ``objects``
are what :meth:`FrameFolderSource.attributes` returns (with the rest of ``meta.json``).

Listing stats every frame and mask file (their identity feeds the extraction fingerprint) but
decodes nothing; a corrupt frame is found when it is read, and named with its frame index.

Frames and masks are decoded as a viewer shows them: an EXIF orientation (phone and action
cameras write JPEGs sideways with a rotate-on-display tag) is applied, so a frame and its mask,
drawn upright, stay aligned.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from natsort import natsorted, ns
from PIL import Image, ImageOps

from egoslots.pipeline.data import ListedSource
from egoslots.pipeline.data.base import (
    FileIdentity,
    Frame,
    SourceError,
    VideoInfo,
    check_same_size,
    refuse_special,
    to_rgb_uint8,
)

log = logging.getLogger("egoslots")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_DIR = "masks"
META_FILE = "meta.json"


@dataclass(frozen=True)
class _VideoFolder:
    path: Path
    frames: tuple[str, ...]  # file names, natural order
    masks: tuple[str, ...] | None  # mask file names, one per frame, or None


class FrameFolderSource(ListedSource):
    """Videos stored as folders of frames; see the module docstring for the layout."""

    kind = "frames"

    def __init__(self, root: str | Path, **common):
        super().__init__(root, **common)
        self._folders: dict[str, _VideoFolder] = {}
        self._first_size: dict[str, tuple[int, int]] = {}
        self._meta: dict[str, dict | None] = {}

    # -- listing ------------------------------------------------------------------------------
    def _candidates(self) -> Iterator[tuple[str, tuple]]:
        if not self.root.is_dir():
            raise SourceError(f"dataset.path {self.root} is not a folder of videos")
        yield from self._walk(self.root)

    def _walk(
        self, folder: Path, ancestors: frozenset = frozenset()
    ) -> Iterator[tuple[str, tuple]]:
        """Video folders under ``folder`` in natural order: (id, (folder, frame entries, dirs)).
        A link that loops (to itself, or back to a folder above it) is one SourceError naming it."""
        try:
            entries = list(os.scandir(folder))
            here = os.stat(folder)
        except OSError as err:
            raise SourceError(f"{folder}: cannot list folder ({err})") from err
        ancestors = ancestors | {(here.st_dev, here.st_ino)}
        frames, subdirs = [], []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
                if is_dir and (entry.stat().st_dev, entry.stat().st_ino) in ancestors:
                    raise OSError(errno.ELOOP, "it leads back to a folder above it")
            except OSError as err:
                raise SourceError(
                    f"{entry.path}: a symbolic link that loops ({err.strerror}): remove it or "
                    "point it at a real folder"
                ) from err
            if is_dir:
                subdirs.append(entry.name)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                frames.append(entry)
        if frames:
            subdirs = [d for d in subdirs if d != MASK_DIR]
        elif MASK_DIR in subdirs:  # masks/ with no frames beside it: never a video of its own
            raise SourceError(self._layout_error(folder, [d for d in subdirs if d != MASK_DIR]))
        is_leaf = not [d for d in subdirs if d != MASK_DIR]
        if frames or (is_leaf and folder != self.root):
            yield self._video_id(folder), (folder, frames, subdirs)
        for name in natsorted(subdirs, alg=ns.PATH):
            if frames or not is_leaf:
                yield from self._walk(folder / name, ancestors)

    def _layout_error(self, folder: Path, others: list[str]) -> str:
        """The message for a ``masks/`` folder whose parent holds no frames: frames one folder
        deeper (``<video>/rgb/*.png`` beside ``<video>/masks/``), or masks beside videos."""
        expected = (
            "expected <root>/<video>/<frame>.jpg|png with their masks in <root>/<video>/masks/"
            '<frame stem>.png (docs/architecture.md "Frame-folder format")'
        )
        if len(others) == 1 and folder != self.root:
            return (
                f"{folder}: unexpected layout: it holds {others[0]}/ and masks/ but no frames; "
                f"{expected}: move the frames of {folder / others[0]} up into {folder}"
            )
        beside = f" beside {', '.join(d + '/' for d in sorted(others)[:3])}" if others else ""
        return (
            f"{folder / MASK_DIR}: a masks/ folder{beside} with no frames in {folder}; "
            f"{expected}. A masks/ folder is never read as a video"
        )

    def _video_id(self, folder: Path) -> str:
        return folder.name if folder == self.root else folder.relative_to(self.root).as_posix()

    def _describe(self, video_id: str, candidate) -> VideoInfo:
        folder, frame_entries, subdirs = candidate
        if not frame_entries:
            raise SourceError(
                f"{folder}: empty video folder (no {', '.join(IMAGE_SUFFIXES)} frames)"
            )
        by_name = {e.name: e for e in frame_entries}
        names = tuple(natsorted(by_name))  # plain file names: natsort's default (fast) key suffices
        prefix = "" if folder == self.root else video_id + "/"
        files = [self._identity(by_name[n], prefix) for n in names]
        masks = None
        mask_dir = folder / MASK_DIR
        if mask_dir.is_dir():
            masks, mask_files = self._match_masks(folder, names, prefix)
            files.extend(mask_files)
        meta = self._read_meta(folder)
        self._meta[video_id] = meta
        self._folders[video_id] = _VideoFolder(folder, names, masks)
        meta = meta or {}
        split = self.split_for(video_id, meta.get("split"), where=str(folder / META_FILE))
        fps = meta.get("fps")
        return VideoInfo(
            video_id, len(names), split, tuple(files), None if fps is None else float(fps)
        )

    @staticmethod
    def _identity(entry: os.DirEntry, prefix: str) -> FileIdentity:
        """Path relative to the root (built as a string: pathlib is the bottleneck at SAYCam scale)."""
        try:
            stat = entry.stat()
        except OSError as err:
            if entry.is_symlink():  # a copy made with links (cp -s, rsync -l) lost its target
                raise SourceError(
                    f"{entry.path}: a symbolic link to {os.readlink(entry.path)}, which "
                    f"{'does not exist' if err.errno == errno.ENOENT else 'cannot be read'} "
                    f"({err.strerror}): restore its target, or remove the link"
                ) from err
            raise SourceError(f"{entry.path}: cannot stat ({err})") from err
        refuse_special(entry.path, stat.st_mode)  # a FIFO would block the decoder forever
        return FileIdentity(prefix + entry.name, stat.st_size)

    def _match_masks(
        self, folder: Path, names: tuple[str, ...], prefix: str
    ) -> tuple[tuple[str, ...], list[FileIdentity]]:
        """One ``masks/<frame stem>.png`` per frame, in frame order."""
        mask_dir = folder / MASK_DIR
        entries = {
            os.path.splitext(e.name)[0]: e
            for e in os.scandir(mask_dir)
            if e.name.lower().endswith(".png") and not e.name.startswith(".")
        }
        stems = [os.path.splitext(n)[0] for n in names]
        if len(set(stems)) != len(stems):
            dup = next(s for s in stems if stems.count(s) > 1)
            raise SourceError(
                f"{folder}: two frames share the name '{dup}', so masks/{dup}.png is ambiguous"
            )
        missing = [(i, s) for i, s in enumerate(stems) if s not in entries]
        if missing:
            i, stem = missing[0]
            raise SourceError(
                f"{mask_dir}: no mask for frame {i} ({names[i]}): expected {MASK_DIR}/{stem}.png "
                f"({len(missing)} of {len(names)} frames lack a mask)"
            )
        chosen = [entries[s] for s in stems]
        return tuple(e.name for e in chosen), [
            self._identity(e, prefix + MASK_DIR + "/") for e in chosen
        ]

    def _read_meta(self, folder: Path) -> dict | None:
        path = folder / META_FILE
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SourceError(f"{path}: cannot read meta.json ({err})") from err
        if not isinstance(meta, dict):
            raise SourceError(
                f"{path}: meta.json must hold a JSON object, got {type(meta).__name__}"
            )
        if meta.get("fps") is not None and not isinstance(meta["fps"], (int, float)):
            raise SourceError(f"{path}: 'fps' must be a number, got {meta['fps']!r}")
        return meta

    def _has_masks(self) -> bool:
        with_masks = sum(f.masks is not None for f in self._folders.values())
        if 0 < with_masks < len(self._folders) and not getattr(self, "_warned_mixed", False):
            self._warned_mixed = True
            log.warning(
                "%s: only %d of %d videos have masks/; masks are not used",
                self.root,
                with_masks,
                len(self._folders),
            )
        return bool(self._folders) and with_masks == len(self._folders)

    # -- reading ------------------------------------------------------------------------------
    def _folder(self, video_id: str) -> _VideoFolder:
        if video_id not in self._folders:
            self.videos()
        if video_id not in self._folders:
            raise SourceError(f"no video '{video_id}' in {self.root}")
        return self._folders[video_id]

    def read_frames(
        self, video_id: str, start: int = 0, stop: int | None = None
    ) -> Iterator[Frame]:
        video = self._folder(video_id)
        n = len(video.frames)
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise SourceError(
                f"video '{video_id}': frames {start}..{stop} out of range (it has {n})"
            )
        with_masks = video.masks is not None and self.has_masks
        expected = self._expected_size(video_id, video)
        for i in range(start, stop):
            path = video.path / video.frames[i]
            where = f"{path}: frame {i} of video '{video_id}'"
            rgb = load_rgb(path, where)
            check_same_size(rgb.shape, expected, where)
            mask = None
            if with_masks:
                mask_path = video.path / MASK_DIR / video.masks[i]
                mask = load_mask(mask_path, f"{mask_path}: mask of frame {i} of video '{video_id}'")
                if mask.shape != rgb.shape[:2]:
                    raise SourceError(
                        f"{mask_path}: mask of frame {i} of video '{video_id}' is "
                        f"{mask.shape[1]}x{mask.shape[0]} but the frame is {rgb.shape[1]}x{rgb.shape[0]}"
                    )
            yield Frame(video_id, i, rgb, mask)

    def _expected_size(self, video_id: str, video: _VideoFolder) -> tuple[int, int]:
        """(H, W) of frame 0, from its header only, so every read checks against the same size."""
        if video_id not in self._first_size:
            path = video.path / video.frames[0]
            try:
                with Image.open(path) as im:
                    w, h = im.size
                    if exif_orientation(im) in SWAPS_SIDES:  # stored sideways: upright is h x w
                        w, h = h, w
            except (OSError, SyntaxError, ValueError) as err:
                raise SourceError(
                    f"{path}: frame 0 of video '{video_id}': cannot read image ({err})"
                ) from err
            self._first_size[video_id] = (h, w)
        return self._first_size[video_id]

    def attributes(self, video_id: str) -> dict | None:
        """``meta.json`` (with its ``objects``) of a video, or None if it has no objects."""
        if video_id not in self._meta:
            folder = (
                self.root
                if video_id == self.root.name and not (self.root / video_id).is_dir()
                else self.root / video_id
            )
            self._meta[video_id] = self._read_meta(folder)
        meta = self._meta[video_id]
        return meta if meta and meta.get("objects") is not None else None


EXIF_ORIENTATION = 0x0112
SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees


def exif_orientation(im: Image.Image) -> int:
    """The image's EXIF orientation tag (1 = upright as stored; 1 where there is none)."""
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (AttributeError, TypeError, ValueError, SyntaxError):  # unreadable EXIF: as stored
        return 1


def upright(im: Image.Image) -> Image.Image:
    """The decoded image as a viewer shows it: its EXIF orientation applied (and dropped)."""
    if exif_orientation(im) in (1, 0):
        return im
    return ImageOps.exif_transpose(im)


def load_rgb(path: Path, where: str) -> np.ndarray:
    """Decode one frame to (H, W, 3) uint8, upright (EXIF orientation applied); grayscale,
    palette, RGBA and 16-bit are converted."""
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now, so that a truncated file fails here and not later
            im = upright(opened)
            if im.mode in ("RGB", "RGBA", "L"):
                arr = np.array(im)  # a writable copy (asarray's view is read-only; torch warns)
            elif im.mode.startswith("I;16"):  # 16-bit grey: by the file's bit depth, so a dark
                arr = np.asarray(im).astype(np.int64) // 257  # frame scales as its neighbours do
            elif im.mode.startswith("I"):  # 32-bit integer grey: must hold 0..255 (to_rgb_uint8)
                arr = np.asarray(im).astype(np.int64)
            else:  # palette, CMYK, YCbCr, LA, 1-bit: let Pillow map them to RGB
                arr = np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SourceError(f"{where}: cannot decode image ({err})") from err
    return to_rgb_uint8(arr, where)


def load_mask(path: Path, where: str) -> np.ndarray:
    """Decode one label map to (H, W) uint8, upright as its frame (EXIF orientation applied).
    Palette PNGs give their indices (DAVIS-style)."""
    try:
        with Image.open(path) as opened:
            opened.load()
            im = upright(opened)
            mode = im.mode
            arr = np.array(im)
    except (OSError, SyntaxError, ValueError) as err:
        raise SourceError(f"{where}: cannot decode mask ({err})") from err
    if mode == "1":
        return arr.astype(np.uint8)
    if arr.ndim == 3:  # a grey label map saved as RGB(A) is fine; colour-coded masks are not
        rgb = arr[..., :3]
        if not (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        ):
            raise SourceError(
                f"{where}: colour mask ({mode}); expected a single-channel uint8 label map "
                "(0 = background, 1..255 = objects)"
            )
        arr = rgb[..., 0]
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise SourceError(
                f"{where}: labels {arr.min()}..{arr.max()} do not fit a uint8 label map"
            )
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)
