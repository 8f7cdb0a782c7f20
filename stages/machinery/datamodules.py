"""The data of the training stages, as LightningDataModules read from a feature store.

- :class:`FrameData` (pretrain-dvae): single cached frames of the train split, flipped rows
  included (:func:`training_rows`).
- :class:`ClipData` (train-slots): clips of cached features (and token ids) of the train split,
  and whole validation clips with masks where the store has them.

Training batches follow one seeded stream of samples (:class:`ResumableRandomSampler`): rank r of
W takes its slice of each global batch, and a resumed run continues the stream at its step, so
W ranks with batch B read what one process with batch B*W reads, and a resumed run what the
uninterrupted run read. Batches are read ahead in a thread of the training process
(``num_workers: 0``, :class:`ReadAheadLoader`) or in worker processes, which ignore SIGTERM and
run one torch thread each.
"""

from __future__ import annotations

import logging
import queue
import threading

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, default_collate

from egoslots.cache.reader import ClipBatches, ClipDataset, batch_tensor
from egoslots.cache.store import FeatureStore
from egoslots.stages.machinery.common import StageError
from egoslots.stages.machinery.interrupts import ignore_sigterm_in_worker
from egoslots.stages.machinery.runtime import one_thread_per_worker
from egoslots.stages.machinery.training import ResumableRandomSampler

log = logging.getLogger("egoslots")


def init_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` of the training loaders."""
    one_thread_per_worker(worker_id)
    ignore_sigterm_in_worker(worker_id)


def loader(
    dataset, batch: int, sampler, workers: int, drop_last: bool, collate_fn=None, prefetch: int = 2
) -> DataLoader:
    """A DataLoader that reads ahead (pinned memory where there is a GPU): in ``workers``
    processes, or with ``workers=0`` in a thread of this process (:class:`ReadAheadLoader`)."""
    kwargs = dict(
        batch_size=batch,
        sampler=sampler,
        shuffle=False,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_fn,
    )
    if workers == 0:
        return ReadAheadLoader(dataset, ahead=prefetch, **kwargs)
    return DataLoader(
        dataset,
        num_workers=workers,
        persistent_workers=True,
        prefetch_factor=prefetch,
        worker_init_fn=init_worker,
        **kwargs,
    )


class ReadAheadLoader(DataLoader):
    """A DataLoader without worker processes that reads ``ahead`` batches ahead in a thread.

    Reading a local store is a few ``preadv`` calls per batch (they release the GIL) into one
    tensor: a thread keeps up with the disk, where handing each batch from a worker process to
    this one (shared memory, file descriptors over a socket, two wake-ups) cost more than the
    read itself: 2.7 GB/s in-process vs 0.25-0.5 GB/s through two workers, docs/benchmarks.md.
    Errors of the reading thread are raised here, at the batch they concern.
    """

    def __init__(self, dataset, *, ahead: int = 2, **kwargs):
        super().__init__(dataset, num_workers=0, **kwargs)
        self.ahead = max(1, int(ahead))

    def __iter__(self):
        batches = queue.Queue(self.ahead)
        stop = threading.Event()
        source = super().__iter__()

        def read() -> None:
            try:
                for batch in source:
                    while not stop.is_set():
                        try:
                            batches.put((batch, None), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                batches.put((_END, None))
            except BaseException as err:  # noqa: BLE001 - raised in the consumer below
                batches.put((None, err))

        threading.Thread(target=read, name="egoslots-read-ahead", daemon=True).start()
        try:
            while True:
                batch, err = batches.get()
                if err is not None:
                    raise err
                if batch is _END:
                    return
                yield batch
        finally:
            stop.set()


_END = object()


def stream_sampler(trainer, size: int, batch: int, max_steps: int, seed: int):
    """This rank's slice of the run's seeded sample stream, from the step training (re)starts at."""
    start = min(trainer.global_step, max_steps) if trainer is not None else 0
    return ResumableRandomSampler(
        size,
        total=max_steps * batch,
        seed=seed,
        start=start * batch,
        batch=batch,
        rank=trainer.global_rank if trainer is not None else 0,
        world=trainer.world_size if trainer is not None else 1,
    )


# --------------------------------------------------------------------------------------------
# Stage 2: frames
# --------------------------------------------------------------------------------------------
class FrameDataset(Dataset):
    """Single frames (S, S, 3) uint8 of some store rows.

    Frames stay uint8 until the training step converts them to float in [0, 1] on the device
    (four times less to copy). The zarr handle is reopened in each DataLoader worker.
    """

    def __init__(self, store: FeatureStore, rows: np.ndarray):
        self.path = str(store.path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self._store: FeatureStore | None = None  # opened on first use, in whichever process reads

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            self._store = FeatureStore.open(self.path)
        return self._store

    def __getitem__(self, index: int) -> torch.Tensor:
        row = int(self.rows[index])
        return torch.from_numpy(
            np.ascontiguousarray(self.store.read_rows("frames", row, row + 1)[0])
        )

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        """A DataLoader batch (B, S, S, 3) uint8: read-ahead asked for every frame first (a
        cold disk reads them in parallel), then each read straight into one batch tensor
        (shared memory in a worker). The loader's collate passes it on (:func:`as_batch`)."""
        rows = [int(self.rows[i]) for i in indices]
        for row in rows:
            self.store.advise_rows("frames", row, row + 1)
        out = batch_tensor((len(rows), *self.store.row_shape("frames")), torch.uint8)
        frames = out.numpy()
        for b, row in enumerate(rows):
            self.store.read_rows("frames", row, row + 1, out=frames[b : b + 1])
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None  # reopened in the worker process
        return state


def training_rows(store: FeatureStore) -> np.ndarray:
    """Frame rows of the train split (flipped variants included); all rows if it is empty."""
    videos = store.videos_in("train", hflip=None)
    if not videos:
        log.warning(
            "%s has no train-split videos: the dVAE trains on all %d frames",
            store.path,
            store.num_frames,
        )
        videos = store.videos_in(None, hflip=None)
    return np.concatenate([np.arange(v.first, v.stop) for v in videos])


class FrameData(L.LightningDataModule):
    """pretrain-dvae's frames: ``dvae.batch_size`` per device, one seeded stream of train rows."""

    def __init__(self, store: FeatureStore, cfg: DictConfig):
        super().__init__()
        self.frames = FrameDataset(store, training_rows(store))
        self.batch, self.workers = int(cfg.dvae.batch_size), int(cfg.dvae.num_workers)
        self.max_steps, self.seed = int(cfg.dvae.max_steps), int(cfg.seed)

    def train_dataloader(self) -> DataLoader:
        sampler = stream_sampler(
            self.trainer, len(self.frames), self.batch, self.max_steps, self.seed
        )
        return loader(self.frames, self.batch, sampler, self.workers, True, as_batch)


# --------------------------------------------------------------------------------------------
# Stage 3: clips
# --------------------------------------------------------------------------------------------
def clip_fields(tokens_hash: str | None) -> tuple[str, ...]:
    """What a training clip holds: features, and token ids where the STEVE decoder is on."""
    return ("features", "tokens") if tokens_hash else ("features",)


def as_batch(batch):
    """The collate function of datasets that read whole batches (``__getitems__``)."""
    return batch


def collate_clips(items: list[dict] | dict) -> dict:
    """Stack tensors, keep ids as lists; a batch read whole (:class:`ClipBatches`) passes as
    it is. Tensors go through torch's ``default_collate``: in a DataLoader worker it stacks
    straight into shared memory, where ``torch.stack`` would be copied there once more."""
    if isinstance(items, dict):
        return items
    out: dict = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = default_collate(values) if torch.is_tensor(values[0]) else values
    return out


def example_clip(store: FeatureStore, cfg: DictConfig, tokens_hash: str | None) -> dict | None:
    """The first clip of the val split (else train) with its frames, for pictures."""
    for split in ("val", "train"):
        ds = ClipDataset(
            store,
            split,
            cfg.dataset.ep_length,
            1,
            cfg.dataset.frame_step,
            fields=clip_fields(tokens_hash) + ("frames",),
            tokens=tokens_hash,
            include_flipped=False,
        )
        if len(ds):
            return ds[0]
    return None


class ClipData(L.LightningDataModule):
    """train-slots' clips: random train clips (flipped rows included) in a seeded stream, and the
    val split's clips (masks included where the store has them) for validation."""

    def __init__(self, store: FeatureStore, cfg: DictConfig, tokens_hash: str | None):
        super().__init__()
        self.path, self.cfg, self.tokens = str(store.path), cfg, tokens_hash
        self.masks = store.has_masks
        self.has_val = len(store.videos_in("val")) > 0

    def train_dataloader(self) -> DataLoader:
        cfg, d = self.cfg, self.cfg.dataset
        dataset = ClipBatches(
            self.path,
            "train",
            d.ep_length,
            d.clip_stride,
            d.frame_step,
            fields=clip_fields(self.tokens),
            tokens=self.tokens,
            include_flipped=True,
            feature_dtype="stored",
        )
        if len(dataset) == 0:
            raise StageError(
                f"the train split of {self.path} has no clip of {d.ep_length} frames "
                f"(frame step {d.frame_step}): lower dataset.ep_length"
            )
        batch = int(d.batch_size)
        sampler = stream_sampler(
            self.trainer, len(dataset), batch, int(cfg.trainer.max_steps), int(cfg.seed)
        )
        return loader(dataset, batch, sampler, int(d.num_workers), True, collate_clips, 4)

    def val_dataloader(self):
        if not self.has_val:
            return []
        d = self.cfg.dataset
        fields = clip_fields(self.tokens) + (("masks",) if self.masks else ())
        dataset = ClipDataset(
            self.path,
            "val",
            d.ep_length,
            d.ep_length,
            d.frame_step,
            fields=fields,
            tokens=self.tokens,
            include_flipped=False,
        )
        return loader(dataset, int(d.batch_size), None, int(d.num_workers), False, collate_clips, 4)
