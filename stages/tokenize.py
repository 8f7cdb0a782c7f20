"""Stage 2, `egoslots tokenize RUN`: a trained dVAE's token ids for every cached frame.

Encodes every frame of the store the dVAE run trained on to argmax token ids and writes them
into that store as ``tokens/<hash>/ids`` (F, h, w) uint16, one done flag per chunk written after
the chunk's ids, so an interrupted `tokenize` redoes only the chunks whose flag is 0 and a
finished one returns at once. ``pretrain-dvae`` runs it after training. Both stage-2 commands
check a store's frames here (:func:`check_frames`) and name a dVAE by the hash of its weights
(:func:`sha256_16`).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
import torch
from tqdm.auto import tqdm

from egoslots.cache.store import FeatureStore, StoreError, chunk_bounds
from egoslots.pipeline.checkpoints import sha256_file
from egoslots.pipeline.config import ConfigError
from egoslots.pipeline.dvae import DVAE, PATCH, load_dvae
from egoslots.stages.machinery.batch_memory import check_tokenize_batch
from egoslots.stages.machinery.common import StageError, setup_logging, write_failure
from egoslots.stages.machinery.locks import run_lock
from egoslots.stages.machinery.run_paths import store_of_run
from egoslots.stages.machinery.rundirs import read_json, saved_config
from egoslots.stages.machinery.runtime import pick_device

log = logging.getLogger("egoslots")


class TokenWriteError(StoreError, OSError):
    """Writing token ids into the store failed (disk full, read-only, no permission). A StoreError
    (one clear line for the user) and still an OSError for callers that catch those."""

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] strerror"
        return str(self.args[0]) if self.args else ""


def check_frames(store: FeatureStore) -> int:
    """The store's frame size, after checking it has frames the dVAE can take."""
    if "frames" not in store.group:
        raise StoreError(
            f"{store.path} holds no cached frames, which the dVAE trains on: re-extract with "
            "`egoslots extract-features CONFIG --overwrite` (a current egoslots always caches "
            "frames)"
        )
    size = store.frame_size
    shape = tuple(store.frames.shape[1:])
    if shape != (size, size, 3):
        raise StoreError(f"{store.path}: frames have shape {shape}, expected ({size}, {size}, 3)")
    if size % PATCH:
        raise StoreError(
            f"{store.path} caches {size} px frames, but the dVAE needs a frame size divisible by "
            f"{PATCH} (one token per {PATCH}x{PATCH} pixels): re-extract with extract.frame_size "
            f"(globals.FRAME_SIZE) set to e.g. {size - size % PATCH or PATCH}"
        )
    return size


def sha256_16(path: Path) -> str:
    """A dVAE's hash: the first 16 hex digits of its dvae.pt's sha256."""
    return sha256_file(path)[:16]


def tokenize_run(
    run_dir: str | Path, batch_size: int | None = None, device: str | None = None
) -> str:
    """Encode every cached frame of the run's store to argmax token ids; returns the dVAE hash.

    Writes ``tokens/<hash>/ids`` (F, h, w) uint16 chunk by chunk, each chunk's done flag after its
    ids; resumes with the pending chunks only and returns at once when the tokens are complete.
    Holds the run directory's lock meanwhile (:mod:`egoslots.stages.machinery.locks`).
    """
    with run_lock(Path(run_dir), "egoslots tokenize"):
        return _tokenize_locked(Path(run_dir), batch_size, device)


def _tokenize_locked(run_dir: Path, batch_size: int | None, device: str | None) -> str:
    info = read_json(run_dir / "dvae.json")
    if info is None or not (run_dir / "dvae.pt").is_file():
        raise StoreError(
            f"{run_dir} holds no trained dVAE (dvae.json / dvae.pt): run "
            "`egoslots pretrain-dvae CONFIG`"
        )
    dvae_hash = info["hash"]
    if sha256_16(run_dir / "dvae.pt") != dvae_hash:
        raise StoreError(
            f"{run_dir / 'dvae.pt'} does not match the hash {dvae_hash} in dvae.json (modified or "
            "corrupt): rerun `egoslots pretrain-dvae CONFIG` to export it again"
        )
    store = FeatureStore.open(_store_of_run(run_dir, info), mode="r+")
    if store.fingerprint != info["store"]:
        raise StoreError(
            f"{store.path} has fingerprint {store.fingerprint}, but the dVAE in {run_dir} was "
            f"trained on store {info['store']}"
        )
    frame_size = check_frames(store)
    grid = (frame_size // PATCH, frame_size // PATCH)
    if list(grid) != list(info["token_grid"]):
        raise StoreError(
            f"{store.path} caches {frame_size} px frames; the dVAE in {run_dir} expects "
            f"a token grid of {info['token_grid']}"
        )

    try:
        sub = store.create_tokens(
            dvae_hash, grid, {"vocab_size": info["vocab_size"], "dvae_run": str(run_dir)}
        )
    except OSError as err:
        raise _token_write_error(err, f"tokens/{dvae_hash} in {store.path}", run_dir) from err
    if sub.attrs.get("complete"):
        return dvae_hash
    done = store.done_chunks(f"tokens/{dvae_hash}/done")
    pending = [c for c in range(done.size) if not done[c]]
    dcfg = (saved_config(run_dir) or {}).get("dvae", {})
    given_batch = batch_size is not None
    batch_size = int(batch_size or dcfg.get("tokenize_batch_size", 64))
    device = pick_device(
        device or dcfg.get("tokenize_device", "auto"),
        "--device" if device else "dvae.tokenize_device",
    )
    check_tokenize_batch(
        batch_size, store.chunk_len, frame_size, int(info.get("hidden") or dcfg.get("hidden", 64)),
        int(info["vocab_size"]), device.type == "cuda", "--batch-size" if given_batch else None,
    )  # fmt: skip
    model = load_dvae(run_dir).to(device)

    bounds = [chunk_bounds(c, store.chunk_len, store.num_frames) for c in pending]
    total = sum(b - a for a, b in bounds)
    log.info(
        "tokenizing %d frames (%d of %d chunks) of %s with dVAE %s on %s",
        total,
        len(pending),
        done.size,
        store.path,
        dvae_hash,
        device,
    )
    # writable(): every chunk file is written, even all-zero ones, so `cache verify` can check them
    ids_array = store.writable(f"tokens/{dvae_hash}/ids")
    done_array = store.writable(f"tokens/{dvae_hash}/done")
    with (
        ThreadPoolExecutor(max_workers=1) as reader,
        tqdm(total=total, unit="frame", desc=f"tokenize {dvae_hash}", dynamic_ncols=True) as bar,
    ):
        # read chunk i+1 while chunk i is being encoded
        next_frames = reader.submit(store.read_rows, "frames", *bounds[0]) if bounds else None
        for i, (chunk, (start, stop)) in enumerate(zip(pending, bounds)):
            frames = next_frames.result()  # (n, S, S, 3) uint8
            if i + 1 < len(bounds):
                next_frames = reader.submit(store.read_rows, "frames", *bounds[i + 1])
            ids = encode_frames(model, frames, batch_size, device)  # (n, h, w) uint16
            try:
                ids_array[start:stop] = ids
                store.fsync_chunk(f"tokens/{dvae_hash}/ids", chunk)
                done_array[chunk] = 1  # last: the chunk counts only once its ids are on disk
                store.fsync_chunk(f"tokens/{dvae_hash}/done", chunk)
            except OSError as err:
                raise _token_write_error(
                    err, f"token chunk {chunk} of {store.path}", run_dir
                ) from err
            bar.update(stop - start)
    store.remove_partial_files(f"tokens/{dvae_hash}")  # what writes killed mid-way left
    try:
        sub.attrs.update({"complete": True, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except OSError as err:
        raise _token_write_error(
            err, f"the complete flag of tokens/{dvae_hash} in {store.path}", run_dir
        ) from err
    log.info("tokens of dVAE %s complete in %s", dvae_hash, store.path)
    return dvae_hash


def _store_of_run(run_dir: Path, info: dict):
    """The store a dVAE run trained on: the one in the run's own work directory, else where
    inputs.json / dvae.json recorded it (``rundirs.store_of_run``)."""
    inputs = read_json(run_dir / "inputs.json") or {}
    recorded = [inputs.get("store"), info.get("store_path")]
    path = store_of_run(run_dir, info["store"], recorded)
    if path is None:
        raise StoreError(
            f"the store dVAE run {run_dir} was trained on ({info['store']}) is not at "
            f"{', '.join(str(p) for p in recorded if p)}; was it moved or removed?"
        )
    return path


def _token_write_error(err: OSError, what: str, run_dir: Path) -> TokenWriteError:
    """The clear error for a failed token write: what failed, the errno's meaning, that finished
    chunks are kept, and the command that resumes."""
    wrapped = TokenWriteError(
        write_failure(
            err,
            what,
            kept="Finished token chunks are kept",
            resume=f"rerun `egoslots tokenize {run_dir}` (or the same pretrain-dvae command) "
            "to resume",
            not_writable="tokens are written into the feature store, so it must be writable: "
            "make it writable, or copy it to a writable disk and point the dVAE run's "
            'inputs.json "store" at the copy',
        )
    )
    wrapped.errno, wrapped.filename = err.errno, err.filename
    return wrapped


@torch.no_grad()
def encode_frames(
    model: DVAE, frames: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """(n, S, S, 3) uint8 -> (n, S/4, S/4) uint16 argmax token ids, in batches."""
    out = []
    for i in range(0, len(frames), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(frames[i : i + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, S, S)
        out.append(model.encode_ids(x).to(torch.int32).cpu().numpy().astype(np.uint16))
    return np.concatenate(out)


@click.command(
    "tokenize",
    epilog="\b\nExample:\n  egoslots tokenize egoslots-work/runs/dvae",
)
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Frames per forward pass (default dvae.tokenize_batch_size).",
)
@click.option(
    "--device", default=None, help="auto | cpu | cuda | cuda:N (default dvae.tokenize_device)."
)
def tokenize(run: Path, batch_size: int | None, device: str | None):
    """Stage 2: write a trained dVAE's token ids for every cached frame into its store.

    RUN is a `pretrain-dvae` run directory. Resumable: rerun after an interruption and only
    the unfinished chunks are encoded.
    """
    setup_logging()
    try:
        dvae_hash = tokenize_run(run, batch_size=batch_size, device=device)
    except (StoreError, ConfigError) as err:
        raise StageError(str(err)) from err
    click.echo(f"tokens: {dvae_hash}")
