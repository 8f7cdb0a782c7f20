"""Feature store and fingerprint: what changes a fingerprint, dtypes, disk full, mismatches,
corruption found by `cache verify`, unreadable frames, and finding the store a config means.
"""

from __future__ import annotations

import errno
import warnings

import numpy as np
import pytest
import torch
import zarr
import zarr.storage._local as zarr_local
from click.testing import CliRunner

import egoslots.cache.fingerprint as fingerprint_mod
from egoslots.cache.catalog import store_for_config
from egoslots.cache.fingerprint import fingerprint_inputs, fingerprint_of
from egoslots.cache.store import FeatureStore, StoreError, VideoRecord
from egoslots.cache.verify import Finding, forget_chunks
from egoslots.pipeline.data.base import FileIdentity, SourceError, VideoInfo
from egoslots.pipeline.data.memory import InMemorySource
from egoslots.pipeline.preprocess import preprocess_frame, resize_mask, resize_rgb
from egoslots.stages.extract_features import extract, plan_extraction
from egoslots.stages.machinery.extract_chunks import to_storage
from tests.helpers.data import extract_cfg, memory_source
from tests.helpers.stores import assert_same_store, snapshot

# ---------------------------------------------------------------------------- shared helpers


# ---------------------------------------------------------------------------- fingerprint
def test_fingerprint_changes_with_every_config_input_and_only_then(tmp_path):
    source = memory_source()
    base = plan_extraction(extract_cfg(tmp_path), source).fingerprint
    changing = [
        "extract.dtype=bfloat16",
        "extract.dtype=int8",
        "augment.hflip=cache",
        "extract.frame_size=8",
        "globals.IMAGE_SIZE=48",
        "backbone.patch_size=4",
        "backbone.proj_dim=16",
        "backbone.mean=[0.5,0.5,0.5]",
        "backbone.std=[0.5,0.5,0.5]",
        "dataset.max_videos=3",
    ]
    seen = {base}
    for override in changing:
        fp = plan_extraction(extract_cfg(tmp_path, override), source).fingerprint
        assert fp not in seen, f"{override} did not change the fingerprint"
        seen.add(fp)
    same = [
        "extract.batch_size=7",
        "extract.num_workers=2",
        "extract.frames_per_chunk=5",
        "extract.inner_chunk=4",
        "extract.compressor=zstd",
        f"work_dir={tmp_path / 'elsewhere'}",
        "run_name=other",
        "dataset.batch_size=3",
        "extract.device=auto",
    ]
    for override in same:
        assert plan_extraction(extract_cfg(tmp_path, override), source).fingerprint == base, (
            override
        )


def test_fingerprint_tracks_video_table_files_and_versions(monkeypatch):
    def table(**change):
        rows = {
            "id": "v0",
            "n": 10,
            "split": "train",
            "path": "v0/0001.jpg",
            "size": 1000,
            "content": 5,
        }
        rows.update(change)
        files = (FileIdentity(rows["path"], rows["size"], rows["content"]),)
        return [
            VideoInfo(rows["id"], rows["n"], rows["split"], files),
            VideoInfo("v1", 3, "val", ()),
        ]

    def fp(videos=None, **kw):
        args = dict(
            videos=videos or table(),
            preprocessing={"version": 1},
            compute_dtype="fp32",
            backbone={"name": "vit", "checkpoint_sha256": "aa", "block": 11, "final_norm": False},
            storage_dtype="float16",
            hflip="none",
            frame_size=128,
        )
        args.update(kw)
        return fingerprint_of(fingerprint_inputs(**args))

    base = fp()
    variants = [
        fp(table(id="v9")),
        fp(table(n=11)),
        fp(table(split="test")),
        fp(table(path="v0/0002.jpg")),
        fp(table(size=1001)),
        fp(table(content=6)),
        fp(table()[:1]),
        fp(list(reversed(table()))),
        fp(compute_dtype="bf16"),
        fp(storage_dtype="bfloat16"),
        fp(hflip="cache"),
        fp(frame_size=64),
        fp(preprocessing={"version": 2}),
        fp(backbone={"name": "vit", "checkpoint_sha256": "ab", "block": 11, "final_norm": False}),
        fp(backbone={"name": "vit", "checkpoint_sha256": "aa", "block": 10, "final_norm": False}),
        fp(backbone={"name": "vit", "checkpoint_sha256": "aa", "block": 11, "final_norm": True}),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert fp() == base and len(base) == 16 and int(base, 16) >= 0  # deterministic short hex
    # dict order never matters; the store format version does
    assert (
        fp(backbone={"final_norm": False, "block": 11, "checkpoint_sha256": "aa", "name": "vit"})
        == base
    )
    monkeypatch.setattr(fingerprint_mod, "FORMAT_VERSION", 99)
    assert fp() != base


def test_fingerprint_ignores_chunk_progress(tmp_path):
    source = memory_source()
    cfg = extract_cfg(tmp_path)
    path = extract(cfg, source=source)
    assert (
        plan_extraction(cfg, source).fingerprint == FeatureStore.open(path).fingerprint == path.stem
    )


# ---------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize(
    "dtype,tol", [("float32", 0.0), ("float16", 1e-3), ("bfloat16", 8e-3), ("int8", 1e-2)]
)
def test_feature_dtypes_round_trip(tmp_path, dtype, tol):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(10, 6, 8)).astype(np.float32) * 3
    store = FeatureStore.create(
        tmp_path / "s.zarr",
        fingerprint="x",
        videos=[VideoRecord("a", 0, 10, "train")],
        num_tokens=6,
        feature_dim=8,
        grid=(2, 3),
        frame_size=4,
        feature_dtype=dtype,
        chunk_len=4,
    )
    for chunk in range(3):
        lo, hi = chunk * 4, min(chunk * 4 + 4, 10)
        arrays = to_storage(torch.from_numpy(feats[lo:hi]), dtype, store)
        reference = store.encode_features(
            feats[lo:hi]
        )  # numpy path: the torch path must give the same bytes
        assert arrays.keys() == reference.keys()
        for name in arrays:
            assert arrays[name].tobytes() == reference[name].tobytes(), name
        arrays["frames"] = np.zeros((hi - lo, 4, 4, 3), np.uint8)
        store.write_chunk(chunk, arrays)
    back = FeatureStore.open(tmp_path / "s.zarr", require_complete=False).read_features(0, 10)
    assert back.dtype == np.float32
    relative = np.abs(back - feats).max() / np.abs(feats).max()
    assert relative <= tol
    if dtype == "int8":
        assert "features_scale" in store.group and store.group["features"].dtype == np.int8


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(StoreError, match="float16"):
        FeatureStore.create(
            tmp_path / "s.zarr",
            fingerprint="x",
            videos=[VideoRecord("a", 0, 3, "train")],
            num_tokens=1,
            feature_dim=2,
            grid=(1, 1),
            frame_size=4,
            feature_dtype="float8",
        )


# ---------------------------------------------------------------------------- preprocessing
def test_non_square_frames_are_resized_on_the_short_side_and_centre_cropped():
    h, w = 20, 40  # wide: the centre 20x20 square is columns 10..29
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, 10:30] = 200
    mask = np.zeros((h, w), np.uint8)
    mask[:, 10:30] = 3
    mask[:, :10] = 1
    out = resize_rgb(rgb, 10)  # (3, 10, 10)
    assert out.shape == (3, 10, 10) and out.dtype == torch.uint8
    assert (
        int(out.min()) > 150 and int(out[:, :, 2:8].min()) == 200
    )  # the dark sides are cropped away
    small = resize_mask(mask, 10)
    assert set(np.unique(small.numpy())) == {
        3
    }  # nearest: no label mixing, side labels cropped away
    tall = resize_rgb(np.ascontiguousarray(rgb.transpose(1, 0, 2)), 10)
    assert int(tall.min()) > 150
    # antialiased: a fine checkerboard shrinks to mid grey, not aliasing stripes
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, 2)
    grey = resize_rgb(board, 8).float()
    assert 100 < float(grey.mean()) < 155 and float(grey.std()) < 10


def test_preprocess_frame_flips_all_outputs_alike():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (24, 30), dtype=np.uint8)
    vit, frame, small = preprocess_frame(rgb, mask, 16, 8)
    fvit, fframe, fsmall = preprocess_frame(rgb, mask, 16, 8, hflip=True)
    assert vit.shape == (3, 16, 16) and frame.shape == (8, 8, 3) and small.shape == (8, 8)
    assert (
        torch.equal(fvit, vit.flip(-1))
        and torch.equal(fframe, frame.flip(1))
        and torch.equal(fsmall, small.flip(-1))
    )


# ---------------------------------------------------------------------------- failures while writing
def test_disk_full_gives_clear_error_and_rerun_finishes(tmp_path, monkeypatch):
    source = memory_source()
    clean = extract(extract_cfg(tmp_path / "clean"), source=source)

    real_put, writes = zarr_local._put, {"n": 0}

    def put_until_full(path, value, exclusive=False):
        if "/c/" in str(path) and "/features/" in str(path):
            writes["n"] += 1
            if writes["n"] > 2:  # the third features chunk hits a full disk
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(zarr_local, "_put", put_until_full)
    cfg = extract_cfg(tmp_path / "full")
    with pytest.raises(
        StoreError,
        match=r"cannot write chunk 2 .*No space left on device \(ENOSPC\): the disk is full.*"
        r"rerun the same command",
    ):
        extract(cfg, source=source)
    store = FeatureStore.open(
        clean.parent.parent.parent / "full" / "stores" / clean.name, require_complete=False
    )
    assert (
        store.progress()[0] == 2 and not store.complete
    )  # finished chunks kept, nothing flagged falsely
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore.open(store.path)

    monkeypatch.setattr(zarr_local, "_put", real_put)
    finished = extract(cfg, source=source)
    assert_same_store(finished, clean)


def test_store_of_other_settings_is_refused_unless_overwrite(tmp_path):
    source = memory_source()
    first = extract(extract_cfg(tmp_path), source=source)
    other = extract_cfg(
        tmp_path, f"store={first}", "extract.dtype=bfloat16", "globals.IMAGE_SIZE=48"
    )
    with pytest.raises(StoreError) as info:
        extract(other, source=source)
    message = str(info.value)
    assert "--overwrite" in message and "storage_dtype" in message and "input_size" in message
    assert FeatureStore.open(first).meta["feature_dtype"] == "float16"  # untouched
    replaced = extract(other, overwrite=True, source=source)
    assert replaced == first and FeatureStore.open(first).meta["feature_dtype"] == "bfloat16"
    # a changed video table is explained too
    with pytest.raises(StoreError, match="video table: 1 added: vid04"):
        extract(
            extract_cfg(
                tmp_path, f"store={first}", "extract.dtype=bfloat16", "globals.IMAGE_SIZE=48"
            ),
            source=memory_source(num_videos=5),
        )


class BrokenSource(InMemorySource):
    """Frame ``bad_frame`` of video ``bad_video`` fails to decode, naming its file."""

    def __init__(self, base: InMemorySource, bad_video: str, bad_frame: int):
        super().__init__(base._videos, base._masks)
        self.bad_video, self.bad_frame = bad_video, bad_frame

    def read_frames(self, video_id, start=0, stop=None):
        for frame in super().read_frames(video_id, start, stop):
            if video_id == self.bad_video and frame.index == self.bad_frame:
                raise SourceError(
                    f"/data/{video_id}/{frame.index:05d}.jpg: cannot decode (truncated file)"
                )
            yield frame


def test_corrupt_frame_stops_with_file_name_and_keeps_finished_chunks(tmp_path):
    source = BrokenSource(memory_source(), "vid02", 4)  # vid02 = rows 19..29: chunk 2 holds frame 4
    cfg = extract_cfg(tmp_path)
    with pytest.raises(SourceError, match=r"vid02.*00004\.jpg.*--skip-bad"):
        extract(cfg, source=source)
    path = plan_extraction(cfg, source).path
    done = FeatureStore.open(path, require_complete=False).done_chunks()
    assert done[:2].all() and not done[2]  # chunks before the bad one are kept


def test_skip_bad_drops_the_video_and_keeps_the_rest(tmp_path):
    base = memory_source()
    clean = snapshot(extract(extract_cfg(tmp_path / "clean", "augment.hflip=cache"), source=base))
    path = extract(
        extract_cfg(tmp_path / "skip", "augment.hflip=cache"),
        source=BrokenSource(base, "vid02", 4),
        skip_bad=True,
    )
    store = FeatureStore.open(path)
    ids = [(v.id, v.hflip) for v in store.videos]
    assert ("vid02", False) not in ids and ("vid02", True) not in ids and len(ids) == 6
    assert {r["id"] for r in store.meta["skipped_videos"]} == {"vid02"}
    assert "00004.jpg" in store.meta["skipped_videos"][0]["error"]
    feats = store.read_features(0, store.num_frames)
    reference = FeatureStore.open(next((tmp_path / "clean" / "stores").iterdir())).read_features(
        0, store.num_frames
    )
    for v in store.videos:  # every kept video's rows equal the clean run's
        np.testing.assert_array_equal(feats[v.first : v.stop], reference[v.first : v.stop])
    assert [v for v in clean["videos"] if v["id"] != "vid02"] == store.meta["videos"]
    # the store stays a clean zarr hierarchy (no stray files), the config sits beside it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = sorted(
            name for name, _ in zarr.open_group(str(path), mode="r").members(max_depth=None)
        )
    assert "skipped" in names and "features" in names
    assert path.with_name(path.stem + ".config.yaml").is_file()


# ---------------------------------------------------------------------------- verify
def test_verify_finds_corrupted_and_non_finite_chunks(tmp_path):
    from egoslots.stages.cache import cache

    path = extract(extract_cfg(tmp_path), source=memory_source())
    runner = CliRunner()
    ok = runner.invoke(cache, ["verify", str(path)])
    assert ok.exit_code == 0, ok.output
    store = FeatureStore.open(path, mode="r+")
    # 1) garbage bytes in the middle of chunk 3's features shard (same size: only checksums catch it)
    shard = store.chunk_file("features", 3)
    raw = bytearray(shard.read_bytes())
    raw[100:140] = b"\xff" * 40
    shard.write_bytes(bytes(raw))
    # 2) NaNs written through zarr (valid checksums) into chunk 1 of frames' neighbour, features
    values = store.features[8:16]
    values[2, 0, 0] = np.nan
    store.group["features"][8:16] = values
    # 3) chunk 4's masks file deleted
    store.chunk_file("masks", 4).unlink()
    result = runner.invoke(cache, ["verify", path.stem, "--work-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "chunk 3 of 'features'" in result.output and "unreadable" in result.output
    assert "chunk 1 of 'features'" in result.output and "non-finite" in result.output
    assert "chunk 4 of 'masks'" in result.output and "file missing" in result.output
    assert "chunk 0 of" not in result.output


def test_verify_repair_then_rerun_rewrites_exactly_the_bad_chunks(tmp_path):
    """Corrupt one finished chunk: verify names it, --repair unflags it (later stages refuse the
    now-incomplete store), and rerunning extraction rewrites it back to the original bytes."""
    from egoslots.stages.cache import cache

    cfg = extract_cfg(tmp_path)
    path = extract(cfg, source=memory_source())
    original = snapshot(path)
    store = FeatureStore.open(path)
    shard = store.chunk_file("frames", 2)
    raw = bytearray(shard.read_bytes())
    raw[50:60] = bytes(10)  # zeroed bytes, size unchanged: only the crc32c sees it
    shard.write_bytes(bytes(raw))
    store.chunk_file("masks", 4).unlink()
    before = {
        c: store.chunk_file("features", c).stat().st_mtime_ns for c in range(store.progress()[1])
    }

    runner = CliRunner()
    found = runner.invoke(cache, ["verify", str(path)])
    assert found.exit_code != 0
    assert "chunk 2 of 'frames'" in found.output and "--repair" in found.output
    assert FeatureStore.open(path).complete  # plain verify changes nothing

    repaired = runner.invoke(cache, ["verify", str(path), "--repair"])
    assert repaired.exit_code != 0 and "chunk(s) 2, 4" in repaired.output, repaired.output
    assert "extract-features" in repaired.output
    with pytest.raises(StoreError, match="incomplete"):
        store_for_config(cfg)
    assert FeatureStore.open(path, require_complete=False).pending_chunks() == [2, 4]

    extract(cfg, source=memory_source())  # the plain rerun
    assert runner.invoke(cache, ["verify", str(path)]).exit_code == 0
    after = snapshot(path)
    assert after["videos"] == original["videos"]
    for name, values in original["arrays"].items():
        np.testing.assert_array_equal(after["arrays"][name], values, err_msg=name)
    store = FeatureStore.open(path)
    rewritten = {
        c for c, t in before.items() if store.chunk_file("features", c).stat().st_mtime_ns != t
    }
    assert rewritten == {2, 4}  # only the bad chunks were redone


def test_cache_ls_info_rm(tmp_path):
    from egoslots.stages.cache import cache

    path = extract(extract_cfg(tmp_path), source=memory_source())
    runner = CliRunner()
    listing = runner.invoke(cache, ["ls", str(tmp_path)])
    assert listing.exit_code == 0 and path.stem in listing.output and "complete" in listing.output
    info = runner.invoke(cache, ["info", path.stem[:6], "--work-dir", str(tmp_path)])
    assert (
        info.exit_code == 0
        and "patch-pixels" in info.output
        and "42 x 16 x 192 float16" in info.output
    )
    kept = runner.invoke(cache, ["rm", path.stem, "--work-dir", str(tmp_path)], input="n\n")
    assert kept.exit_code == 0 and path.exists()
    gone = runner.invoke(cache, ["rm", path.stem, "--work-dir", str(tmp_path), "--yes"])
    assert gone.exit_code == 0 and not path.exists()
    missing = runner.invoke(cache, ["info", "ffff", "--work-dir", str(tmp_path)])
    assert missing.exit_code != 0 and "no store 'ffff'" in missing.output


# ---------------------------------------------------------------------------- store_for_config
def test_store_for_config_by_name_or_matching_settings(tmp_path):
    source = memory_source()
    path = extract(extract_cfg(tmp_path), source=source)
    assert store_for_config(extract_cfg(tmp_path)).path == path  # settings match
    assert (
        store_for_config(extract_cfg(tmp_path, "extract.compute=auto")).path == path
    )  # auto matches any compute
    assert store_for_config(extract_cfg(tmp_path, f"store={path.stem}")).path == path
    assert store_for_config(extract_cfg(tmp_path, f"store={path}")).path == path
    with pytest.raises(StoreError, match="no feature store .* matches .*extract-features CONFIG"):
        store_for_config(extract_cfg(tmp_path, "extract.frame_size=8"))
    with pytest.raises(StoreError, match="store=0123456789abcdef: no feature store"):
        store_for_config(extract_cfg(tmp_path, "store=0123456789abcdef"))
    extract(
        extract_cfg(tmp_path, "extract.compute=bf16"), source=memory_source(seed=1)
    )  # other videos, same settings
    with pytest.raises(StoreError, match="several complete stores"):
        store_for_config(extract_cfg(tmp_path, "extract.compute=auto"))
    FeatureStore.open(path, mode="r+").update_meta(complete=False)
    with pytest.raises(StoreError, match="incomplete"):
        store_for_config(extract_cfg(tmp_path))


# ---------------------------------------------------------------------------- fast shard reads
@pytest.mark.parametrize(
    "inner,frames,chunk_len", [(1, 37, 8), (4, 37, 8), (3, 40, 9), (8, 64, 8), (1, 1100, 1100)]
)
def test_shard_reader_matches_zarr(tmp_path, inner, frames, chunk_len):
    """Rows read straight from the shard files equal zarr's, across inner chunks and shards,
    also when one shard's rows need more preadv buffers than one call takes (1100 rows)."""
    rng = np.random.default_rng(inner)
    videos = [VideoRecord("a", 0, frames, "train")]
    store = FeatureStore.create(
        tmp_path / "s.zarr",
        fingerprint="x",
        videos=videos,
        num_tokens=5,
        feature_dim=3,
        grid=(1, 5),
        frame_size=4,
        chunk_len=chunk_len,
        inner_chunk_len=inner,
        has_masks=True,
    )
    chunk_len = store.chunk_len
    data = {
        "features": rng.normal(size=(frames, 5, 3)).astype(np.float16),
        "frames": rng.integers(0, 256, (frames, 4, 4, 3), dtype=np.uint8),
        "masks": rng.integers(0, 3, (frames, 4, 4), dtype=np.uint8),
    }
    for c in range(-(-frames // chunk_len)):
        store.write_chunk(
            c, {k: v[c * chunk_len : (c + 1) * chunk_len] for k, v in data.items()}, durable=False
        )
    assert store.mark_complete_if_done()
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store._fast_reader("features") is not None  # the plain layout is recognised
    assert store._fast_reader("masks") is None  # compressed: zarr path
    for a, b in [(0, frames), (0, 1), (frames - 1, frames), (3, 21), (7, 9), (8, 16), (5, 6)]:
        for name in data:
            got = store.read_rows(name, a, b)
            assert got.dtype == data[name].dtype
            np.testing.assert_array_equal(got, data[name][a:b], err_msg=f"{name}[{a}:{b}]")


def test_done_flags_read_directly_match_zarr(tmp_path):
    store = FeatureStore.create(
        tmp_path / "s.zarr",
        fingerprint="x",
        videos=[VideoRecord("a", 0, 50, "train")],
        num_tokens=1,
        feature_dim=2,
        grid=(1, 1),
        frame_size=2,
        chunk_len=4,
    )
    for chunk in (0, 3, 12):
        lo, hi = chunk * 4, min(chunk * 4 + 4, 50)
        store.write_chunk(
            chunk,
            {
                "features": np.ones((hi - lo, 1, 2), np.float16),
                "frames": np.zeros((hi - lo, 2, 2, 3), np.uint8),
            },
            durable=False,
        )
    store.writable("done")[5] = 0  # an explicit 0 flag file counts as not done
    assert (tmp_path / "s.zarr" / "done" / "c" / "5").is_file()
    fast = store.done_chunks()
    assert fast.tolist() == np.asarray(store.group["done"][:], dtype=bool).tolist()
    assert np.flatnonzero(fast).tolist() == [0, 3, 12] and store.pending_chunks(1, 2) == [
        1,
        5,
        7,
        9,
        11,
    ]


def test_repaired_chunks_keep_the_record_of_skipped_videos(tmp_path):
    """Two videos skipped as unreadable; --repair + rerun of every chunk of one of them: both stay
    recorded in skipped_videos and out of the video table."""

    class TwoBroken(BrokenSource):
        def read_frames(self, video_id, start=0, stop=None):
            if video_id == "vid00":
                raise SourceError(f"/data/{video_id}/00000.jpg: cannot decode (truncated file)")
            yield from super().read_frames(video_id, start, stop)

    source = TwoBroken(memory_source(), "vid02", 4)
    cfg = extract_cfg(tmp_path)
    path = extract(cfg, source=source, skip_bad=True)
    store = FeatureStore.open(path)
    assert {r["id"] for r in store.meta["skipped_videos"]} == {"vid00", "vid02"}
    table = store.meta["videos"]
    vid00_chunks = {0, 1}  # vid00 = rows 0..8 with 8-frame chunks
    findings = [Finding("damaged", chunk, "frames") for chunk in sorted(vid00_chunks)]
    forget_chunks(FeatureStore.open(path, mode="r+"), findings)
    extract(cfg, source=source, skip_bad=True)  # rewrites chunks 0 and 1 without vid00
    store = FeatureStore.open(path)
    assert {r["id"] for r in store.meta["skipped_videos"]} == {"vid00", "vid02"}
    assert store.meta["videos"] == table
