"""Checking a store chunk by chunk (`egoslots cache verify`) and forgetting bad chunks (`--repair`).

Every chunk flagged done must have its files, decode (each inner chunk's crc32c catches a
corrupted byte) and hold finite values; :func:`forget_chunks` then unflags the chunks with bad
data so that rerunning the stage that wrote them rewrites exactly those chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from egoslots.cache.location import is_remote, join, remote_keys, remove_file
from egoslots.cache.store import FeatureStore, chunk_bounds


@dataclass(frozen=True)
class Finding:
    """One problem ``verify`` found. ``chunk``/``array`` name the bad data, when it is data."""

    text: str
    chunk: int | None = None
    array: str | None = None

    def __str__(self) -> str:
        return self.text


def verify_store(store: FeatureStore, progress=None) -> list[Finding]:
    """Every problem found, one line each naming the chunk and array; [] if the store is sound.

    Checks that every chunk is flagged done, every chunk file exists and decodes (crc32c
    checksums catch corrupted bytes), floating-point values are finite, and the video table
    stays inside the frame axis.
    """
    problems = []
    done = store.done_chunks()
    if not done.all():
        missing = np.flatnonzero(~done)
        problems.append(
            Finding(
                f"{len(missing)} chunk(s) not flagged done: {', '.join(map(str, missing[:10]))}"
                + (" ..." if len(missing) > 10 else "")
            )
        )
    for v in store.videos:
        if v.first < 0 or v.stop > store.num_frames:
            problems.append(
                Finding(
                    f"video table row '{v.id}' (hflip={v.hflip}) spans rows "
                    f"{v.first}..{v.stop - 1}, outside the {store.num_frames} frames"
                )
            )
    for dvae_hash in store.token_group_names():
        if f"tokens/{dvae_hash}/done" not in store.group:
            problems.append(
                Finding(
                    f"tokens of dVAE {dvae_hash}: an unfinished token group (no done flags); "
                    "rerun `egoslots tokenize RUN` to recreate it"
                )
            )
            continue
        token_done = store.done_chunks(f"tokens/{dvae_hash}/done")
        if not token_done.all():
            problems.append(
                Finding(
                    f"tokens of dVAE {dvae_hash}: {int((~token_done).sum())} chunk(s) not "
                    "flagged done"
                )
            )
    names = store.data_arrays()
    token_flags = {
        f"tokens/{h}/ids": store.done_chunks(f"tokens/{h}/done") for h in store.token_group_names()
    }
    remote_files = set(remote_keys(store.path)) if is_remote(store.path) else None
    for chunk in range(done.size):
        start, stop = chunk_bounds(chunk, store.chunk_len, store.num_frames)
        for name in names:
            if not token_flags.get(name, done)[chunk]:
                continue  # not written yet (counted above): nothing to check
            where = f"chunk {chunk} of '{name}' (rows {start}..{stop - 1}"
            path = store.chunk_file(name, chunk)
            if remote_files is not None:
                path_key = store.chunk_key(name, chunk)
                where += f", object {path_key})"
                missing = path_key not in remote_files
            else:
                where += f", file {path})" if path is not None else ")"
                missing = path is not None and not path.exists()
            if missing:
                if not name.startswith("tokens/"):  # token writers may skip all-zero chunks
                    problems.append(Finding(f"{where}: file missing", chunk, name))
                continue
            try:  # through zarr, which checks every inner chunk's crc32c
                values = store.group[name][start:stop]
                if name == "features" and store.meta["feature_dtype"] == "bfloat16":
                    values = (values.astype(np.uint32) << 16).view(np.float32)
            except Exception as err:  # noqa: BLE001 - any decode failure is a finding
                problems.append(
                    Finding(f"{where}: unreadable ({type(err).__name__}: {err})", chunk, name)
                )
                continue
            if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                bad = int((~np.isfinite(values)).sum())
                problems.append(Finding(f"{where}: {bad} non-finite value(s)", chunk, name))
        if progress is not None:
            progress(chunk)
    return problems


def forget_chunks(store: FeatureStore, findings: list[Finding]) -> dict[str, list[int]]:
    """Delete the chunks holding bad data and their flags, so a rerun rewrites exactly them.

    Frame arrays: the store's ``done`` flags and ``complete`` (rerun ``extract-features``);
    token ids are computed from frames, so the same chunks of every token group are
    forgotten too. Token ids: that dVAE's token flags (rerun ``tokenize``). Crash-safe order:
    first mark incomplete, then delete flags, then data; a chunk whose data is gone is never
    flagged done in a complete store. Run it with no writer active (``cache verify --repair``
    refuses incomplete stores). Returns {flag array: chunks}.
    """
    targets: dict[str, set[int]] = {}
    bad_data: set[tuple[str, int]] = set()
    token_groups = [f"tokens/{h}" for h in store.token_group_names()]
    for f in findings:
        if f.chunk is None or f.array is None:
            continue
        bad_data.add((f.array, f.chunk))
        if f.array.startswith("tokens/"):
            targets.setdefault(f.array.rsplit("/", 1)[0] + "/done", set()).add(f.chunk)
        else:
            targets.setdefault("done", set()).add(f.chunk)
            for group in token_groups:  # tokens of a rewritten frame chunk must be rewritten too
                targets.setdefault(f"{group}/done", set()).add(f.chunk)
    if "done" in targets:
        with store.lock():
            store.update_meta(complete=False)
    for flags in targets:
        if flags != "done":
            store.group[flags.rsplit("/", 1)[0]].attrs["complete"] = False
    for flags, chunks in targets.items():
        for chunk in sorted(chunks):  # a flag is present exactly when its chunk is done
            remove_file(join(store.path, *store.chunk_key(flags, chunk).split("/")))
    for array, chunk in sorted(
        bad_data
    ):  # zarr rewrites a shard by reading it first: a damaged one fails
        remove_file(join(store.path, *store.chunk_key(array, chunk).split("/")))
    return {k: sorted(v) for k, v in targets.items()}
