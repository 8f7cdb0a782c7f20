"""The three parts of an extraction that run at once, one store chunk at a time.

- Decoding (:class:`ChunkFrames`, in DataLoader workers): the frames of one chunk's rows (video
  segments, :func:`chunk_segments`), preprocessed to the ViT input, the cached frame and mask.
- Storage conversion (:func:`start_storage_copy` / :func:`finish_storage`): model output to the
  store's dtype, copied off the GPU asynchronously.
- Writing (:class:`ChunkWriter`, a thread behind a bounded queue): each finished chunk, then its
  done flag; a write error stops the extraction with one line, finished chunks kept.

The store's row layout (:func:`video_rows`): each video's rows, then its flipped rows if cached.
Stopping (:func:`stop_on_signals`, :func:`extract_worker`): SIGTERM and Ctrl-C end the
extraction in one line, finished chunks kept (:func:`stopped_extraction`).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import queue
import signal
import threading
import types
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from egoslots.cache.store import FeatureStore, StoreError, VideoRecord, chunk_bounds
from egoslots.pipeline.config import ConfigError
from egoslots.pipeline.data.base import SourceError
from egoslots.pipeline.preprocess import preprocess_frame
from egoslots.stages.machinery.common import write_failure
from egoslots.stages.machinery.runtime import (
    one_thread_per_worker,
    quiet_when_the_main_process_hangs_up,
)

log = logging.getLogger("egoslots")


def video_rows(videos, hflip: str) -> list[VideoRecord]:
    """The store's video table: each video's rows, followed by its flipped rows if cached."""
    if hflip not in ("none", "cache"):
        raise ConfigError(f"augment.hflip={hflip!r}: choose none or cache")
    rows, first = [], 0
    for v in videos:
        for flipped in (False, True) if hflip == "cache" else (False,):
            rows.append(VideoRecord(v.video_id, first, int(v.num_frames), v.split, flipped))
            first += int(v.num_frames)
    return rows


@dataclass(frozen=True)
class Segment:
    """The part of one video row that falls in one chunk."""

    record: VideoRecord
    start: int  # frame index within the video
    stop: int


def chunk_segments(
    records: list[VideoRecord], firsts: list[int], lo: int, hi: int
) -> list[Segment]:
    """Video segments covering store rows [lo, hi), in row order."""
    segments = []
    i = max(0, bisect.bisect_right(firsts, lo) - 1)
    while i < len(records) and records[i].first < hi:
        r = records[i]
        a, b = max(lo, r.first), min(hi, r.stop)
        if a < b:
            segments.append(Segment(r, a - r.first, b - r.first))
        i += 1
    return segments


class ChunkFrames(Dataset):
    """Item i = store chunk ``chunks[i]``, decoded and preprocessed (runs in DataLoader workers).

    Returns ``chunk``, ``images`` (n, 3, I, I) uint8 (ViT input), ``frames`` (n, S, S, 3) uint8,
    ``masks`` (n, S, S) uint8 or None, ``skipped`` [{id, hflip, error}] and ``error`` (a message
    naming the file, or None). Errors are returned rather than raised so the main process can
    stop cleanly after writing what is finished.
    """

    def __init__(
        self,
        source,
        records: list[VideoRecord],
        chunks: list[int],
        chunk_len: int,
        num_frames: int,
        input_size: int,
        frame_size: int,
        has_masks: bool,
        skip_bad: bool,
    ):
        self.source = source
        self.records = records
        self.firsts = [r.first for r in records]
        self.chunks = chunks
        self.chunk_len = chunk_len
        self.num_frames = num_frames
        self.input_size = input_size
        self.frame_size = frame_size
        self.has_masks = has_masks
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        chunk = self.chunks[i]
        lo, hi = chunk_bounds(chunk, self.chunk_len, self.num_frames)
        n, s, inp = hi - lo, self.frame_size, self.input_size
        images = torch.zeros(n, 3, inp, inp, dtype=torch.uint8)
        frames = torch.zeros(n, s, s, 3, dtype=torch.uint8)
        masks = torch.zeros(n, s, s, dtype=torch.uint8) if self.has_masks else None
        item = {
            "chunk": chunk,
            "images": images,
            "frames": frames,
            "masks": masks,
            "skipped": [],
            "error": None,
        }
        for seg in chunk_segments(self.records, self.firsts, lo, hi):
            row = seg.record.first + seg.start - lo
            try:
                self._decode(seg, images, frames, masks, row)
            except Exception as err:  # noqa: BLE001 - reported with the video and chunk
                message = (
                    str(err) if isinstance(err, SourceError) else f"{type(err).__name__}: {err}"
                )
                where = f"video '{seg.record.id}' frames {seg.start}..{seg.stop - 1} (store chunk {chunk})"
                if not self.skip_bad:
                    item["error"] = f"{where}: {message}"
                    return item
                log.warning("skipping unreadable %s: %s", where, message)
                count = seg.stop - seg.start
                for array in (images, frames, masks):
                    if array is not None:
                        array[row : row + count] = 0
                item["skipped"].append(
                    {"id": seg.record.id, "hflip": seg.record.hflip, "error": message}
                )
        return item

    def _decode(self, seg: Segment, images, frames, masks, row: int) -> None:
        got = 0
        for frame in self.source.read_frames(seg.record.id, seg.start, seg.stop):
            if got >= seg.stop - seg.start:
                break
            if self.has_masks and frame.mask is None:
                raise SourceError(f"frame {frame.index} has no mask although the source has masks")
            vit, small, mask = preprocess_frame(
                frame.rgb, frame.mask, self.input_size, self.frame_size, hflip=seg.record.hflip
            )
            images[row + got] = vit
            frames[row + got] = small
            if masks is not None:
                masks[row + got] = mask
            got += 1
        if got != seg.stop - seg.start:
            raise SourceError(
                f"expected {seg.stop - seg.start} frames from frame {seg.start}, the source gave {got}"
            )


class ChunkWriter:
    """A thread that writes finished chunks (bounded queue) and flags each done after its data."""

    def __init__(self, store: FeatureStore, max_pending: int = 4):
        self.store = store
        self.jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.failed_chunk: int | None = None
        self.thread = threading.Thread(target=self._run, name="egoslots-chunk-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None:
                continue  # drain without writing after a failure
            chunk, (host, event), arrays, skipped = job
            try:
                arrays.update(
                    finish_storage(host, event, self.store.meta["feature_dtype"], self.store)
                )
                self.store.record_skipped(chunk, skipped)
                self.store.write_chunk(chunk, arrays)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                self.error, self.failed_chunk = err, chunk

    def put(self, chunk: int, features: tuple, arrays: dict, skipped: list) -> None:
        """Queue one chunk: ``features`` from :func:`start_storage_copy`, the other arrays as numpy."""
        self.raise_if_failed()
        self.jobs.put((chunk, features, arrays, skipped))

    def close(self) -> None:
        """Wait until every queued chunk is written; then raise the first write error, if any."""
        self.jobs.put(None)
        self.thread.join()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.error is None:
            return
        err = self.error
        if isinstance(err, OSError):
            message = write_failure(
                err,
                f"chunk {self.failed_chunk} of {self.store.path}",
                kept="Finished chunks are kept",
                resume="rerun the same command to resume",
                not_writable="the store's folder must be writable (a read-only mount, or another "
                "user's folder): make it writable or set work_dir / store_dir to a writable place",
            )
            raise StoreError(message) from err
        raise err


def start_storage_copy(
    feats: torch.Tensor, dtype: str
) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Convert model output (n, N, D) to the storage dtype on its device and start copying it
    to the host. On a GPU the copy is asynchronous (pinned memory + an event), so the model
    goes on with the next chunk while the writer thread waits for the copy."""
    if dtype == "float16":
        out = feats.to(torch.float16)
    elif dtype == "bfloat16":  # the bits of a bfloat16, round-to-nearest-even like encode_features
        out = feats.to(torch.bfloat16).view(torch.int16)
    else:  # float32, and int8 (quantised on the host by FeatureStore.encode_features)
        out = feats.float()
    if out.device.type != "cuda":
        return out, None
    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    host.copy_(out, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def finish_storage(
    host: torch.Tensor, event, dtype: str, store: FeatureStore
) -> dict[str, np.ndarray]:
    """Wait for :func:`start_storage_copy`'s copy; the store's storage arrays as numpy."""
    if event is not None:
        event.synchronize()
    values = host.numpy()
    if dtype == "bfloat16":
        return {"features": values.view(np.uint16)}
    if dtype == "int8":
        return store.encode_features(values)
    return {"features": values}


def to_storage(feats: torch.Tensor, dtype: str, store: FeatureStore) -> dict[str, np.ndarray]:
    """Model output (n, N, D) -> the store's storage arrays (synchronously)."""
    return finish_storage(*start_storage_copy(feats, dtype), dtype, store)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C is, so the same cleanup runs."""


@contextlib.contextmanager
def stop_on_signals():
    """While extracting, SIGTERM (a scheduler, ``kill``) stops as Ctrl-C does: the chunk writer
    finishes what it holds, and the command ends in one line saying what is kept (before:
    SIGTERM killed the process without a word, Ctrl-C printed click's bare "Aborted!").
    Yields a namespace whose ``signum`` says which signal came (SIGINT unless SIGTERM)."""
    state = types.SimpleNamespace(signum=signal.SIGINT)
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def on_sigterm(signum, frame):
        state.signum = signal.SIGTERM
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped_extraction(store: FeatureStore, signum: int):
    """The one line for an extraction stopped by a signal (a ``Stopped``: exit 130 / 143):
    what is kept, how to go on."""
    from egoslots.stages.machinery.interrupts import Stopped  # Lightning: only when needed

    try:
        done, total = store.progress()
        kept = f"{done} of {total} chunks of {store.path} are written and kept"
    except Exception:  # noqa: BLE001 - the store's flags unreadable now: say less
        kept = f"the finished chunks of {store.path} are kept"
    how = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    return Stopped(
        f"extraction stopped by {how}: {kept}; rerun the same command to resume with the rest",
        signum,
    )


def extract_worker(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: one torch thread, and SIGTERM / Ctrl-C left to the main
    process (which stops cleanly; a worker killed by them made the loader raise instead)."""
    one_thread_per_worker(worker_id)
    quiet_when_the_main_process_hangs_up(worker_id)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
