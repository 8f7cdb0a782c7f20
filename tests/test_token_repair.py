"""A damaged chunk of stage 2's token ids: `cache verify` names it, `--repair` unflags it (the
tokens become incomplete, so stage 3 refuses them), and `egoslots tokenize RUN` rewrites exactly
that chunk back to the original ids."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from egoslots.cache.store import FeatureStore, StoreError
from egoslots.stages.cache import cache
from egoslots.stages.tokenize import tokenize_run
from tests.helpers.runs import copy_dvae_run


def test_damaged_token_chunk_is_found_repaired_and_rewritten(trained_dvae, tmp_path):
    store_path, run_dir = copy_dvae_run(trained_dvae[0], tmp_path / "w")
    dvae_hash = tokenize_run(run_dir)
    store = FeatureStore.open(store_path)
    original = store.tokens(dvae_hash)[:]
    shard = store.chunk_file(f"tokens/{dvae_hash}/ids", 1)
    raw = bytearray(shard.read_bytes())
    raw[8:16] = b"\xab" * 8
    shard.write_bytes(bytes(raw))

    runner = CliRunner()
    found = runner.invoke(cache, ["verify", str(store_path)])
    assert found.exit_code != 0 and f"chunk 1 of 'tokens/{dvae_hash}/ids'" in found.output, (
        found.output
    )
    repaired = runner.invoke(cache, ["verify", str(store_path), "--repair"])
    assert "tokenize RUN" in repaired.output and "token chunk(s) 1" in repaired.output, (
        repaired.output
    )
    store = FeatureStore.open(store_path)
    assert store.complete  # the features are fine: only the tokens need rewriting
    with pytest.raises(StoreError, match="incomplete"):
        store.tokens(dvae_hash)

    assert tokenize_run(run_dir) == dvae_hash
    store = FeatureStore.open(store_path)
    assert store.tokens(dvae_hash)[:].tobytes() == original.tobytes()
    assert runner.invoke(cache, ["verify", str(store_path)]).exit_code == 0


def test_repairing_frames_also_forgets_the_tokens_made_from_them(trained_dvae, tmp_path):
    store_path, run_dir = copy_dvae_run(trained_dvae[0], tmp_path / "w")
    dvae_hash = tokenize_run(run_dir)
    store = FeatureStore.open(store_path)
    store.chunk_file("frames", 1).write_bytes(b"garbage")

    runner = CliRunner()
    repaired = runner.invoke(cache, ["verify", str(store_path), "--repair"])
    assert "extract-features" in repaired.output and "tokenize RUN" in repaired.output, (
        repaired.output
    )
    store = FeatureStore.open(store_path, require_complete=False)
    assert not store.complete and store.pending_chunks() == [1]
    assert list(np.flatnonzero(~store.done_chunks(f"tokens/{dvae_hash}/done"))) == [1]
    assert not store.chunk_file("frames", 1).exists()  # deleted, so the rerun can write it afresh
    again = runner.invoke(
        cache, ["verify", str(store_path), "--repair"]
    )  # a writer may be at work now
    assert again.exit_code != 0 and "incomplete" in again.output
