"""Bad inputs, round 3 (issue 26), data and store side: nothing silently wrong. Damaged store
bytes stop every read path, frames decode upright, frame-folder layouts are detected (a
``masks`` folder is never a video), special files are refused by name, symlinked stores are
removed safely, and exports never land inside a store or a run. Rows 65-79 of
docs/bad-inputs.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from egoslots.cache.reader import ClipBatches, ClipDataset
from egoslots.cache.store import FeatureStore, StoreCorrupt, StoreError
from tests.helpers.errors import one_error_line
from tests.helpers.runs import slot_run
from tests.helpers.stores import frames_store, records, write_store

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    """``egoslots ARGS`` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def flip_bytes(path: Path, offset: int, count: int = 12) -> None:
    """Invert ``count`` bytes of a file in place from ``offset`` (a disk's silent corruption)."""
    raw = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


# --------------------------------------------------------------------------------------------
# 65-66: damaged store bytes stop every read path
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", [1, 4])
def test_flipped_bytes_stop_the_fast_reader_naming_store_array_and_chunk(tmp_path, inner):
    videos = records([("a", 16, "train"), ("b", 8, "train")])
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(24, 4, 8)).astype(np.float32)
    frames = rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8)
    store = FeatureStore.create(
        tmp_path / "s.zarr", fingerprint="fp", videos=videos, num_tokens=4, feature_dim=8,
        grid=(2, 2), frame_size=8, chunk_len=8, inner_chunk_len=inner,
    )  # fmt: skip
    for chunk in range(3):
        rows = slice(chunk * 8, chunk * 8 + 8)
        store.write_chunk(chunk, {**store.encode_features(feats[rows]), "frames": frames[rows]})
    store.mark_complete_if_done()
    store = FeatureStore.open(store.path)
    assert store._fast_reader("features") is not None  # the path under test is the fast one
    before = store.read_rows("frames", 9, 14)
    flip_bytes(store.chunk_file("frames", 1), 3 * 8 * 8 * 3 + 7)  # inside row 11 (3rd of chunk 1)
    store = FeatureStore.open(store.path)
    assert np.array_equal(store.read_rows("frames", 0, 8), frames[:8])  # sound chunks still read
    assert np.array_equal(store.read_rows("frames", 16, 24), frames[16:])
    if inner == 4:  # rows 12..15 are another inner chunk than row 11's: still readable
        assert np.array_equal(store.read_rows("frames", 12, 16), frames[12:16])
    for start, stop in ((11, 12), (9, 14), (10, 12), (0, 24)):
        with pytest.raises(StoreCorrupt) as err:
            store.read_rows("frames", start, stop)
        text = str(err.value)
        for part in (str(store.path), "'frames'", "chunk 1", "egoslots cache verify", "--repair"):
            assert part in text, text
    assert before.shape == (5, 8, 8, 3)
    # a training batch and single items stop too, not only the low-level read
    data = ClipBatches(store, split="train", clip_length=4, fields=("frames",))
    hit = [i for i, c in enumerate(data.clips) if data.videos[c.video].first + c.start in (8, 9)]
    with pytest.raises(StoreCorrupt, match="chunk 1"):
        data.read_batch(hit[:2])
    with pytest.raises(StoreCorrupt, match="chunk 1"):
        ClipDataset(store, split="train", clip_length=4, fields=("frames",))[hit[0]]
    # read in a DataLoader worker process: torch re-raises it with the worker's traceback in the
    # message; the user still reads the one line
    items = ClipDataset(store.path, split="train", clip_length=4, fields=("frames",))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(items, hit[:1]), batch_size=1, num_workers=1
    )
    with pytest.raises(StoreCorrupt) as err:
        next(iter(loader))
    assert str(err.value).startswith(f"store {store.path}: array 'frames', chunk 1")
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_a_damaged_shard_index_and_a_damaged_compressed_chunk_are_named(tmp_path):
    store = frames_store(tmp_path / "s.zarr", hflip=False)
    index_file = store.chunk_file("features", 2)
    flip_bytes(index_file, index_file.stat().st_size - 20)  # inside the index at the end
    masks = records([("a", 16, "train")])
    labels = np.arange(16 * 8 * 8, dtype=np.uint32).reshape(16, 8, 8).astype(np.uint8)
    zstd = write_store(
        tmp_path / "m.zarr", masks, features=np.zeros((16, 4, 8), np.float32),
        frames=np.zeros((16, 8, 8, 3), np.uint8), masks=labels, grid=(2, 2), fingerprint="m",
    )  # fmt: skip
    assert zstd._fast_reader("masks") is None  # compressed: read through zarr
    mask_file = zstd.chunk_file("masks", 1)
    flip_bytes(mask_file, 8)
    store, zstd = FeatureStore.open(store.path), FeatureStore.open(zstd.path)
    with pytest.raises(StoreCorrupt, match=r"'features', chunk 2 .*shard index"):
        store.read_features(16, 20)
    with pytest.raises(StoreCorrupt, match=r"'masks', chunk 1 .*egoslots cache verify"):
        zstd.read_rows("masks", 4, 12)
    assert np.array_equal(zstd.read_rows("masks", 0, 8), labels[:8])


def test_export_slots_on_a_damaged_store_is_one_line(tmp_path_factory, tmp_path):
    run = slot_run(tmp_path_factory, tmp_path / "work")
    store_path = tmp_path / "work" / "stores" / "tinyfp.zarr"
    store = FeatureStore.open(store_path)
    test_video = store.videos_in("test")[0]
    chunk = test_video.first // store.chunk_len
    row = test_video.first - chunk * store.chunk_len
    row_bytes = store.features.nbytes // store.num_frames
    inner = store.meta["inner_chunk_len"]
    offset = (row // inner) * (inner * row_bytes + 4) + (row % inner) * row_bytes + 16
    flip_bytes(store.chunk_file("features", chunk), offset)  # first row of a test video
    proc = cli("export-slots", str(run), str(tmp_path / "out.zarr"), "--split", "test")
    one_error_line(proc, str(store_path), "'features'", f"chunk {chunk}", "cache verify")
    assert not (tmp_path / "out.zarr").exists()


# --------------------------------------------------------------------------------------------
# 67: frames decode upright (EXIF orientation), aligned with their masks
# --------------------------------------------------------------------------------------------
def test_exif_rotated_jpeg_frames_are_decoded_upright_beside_their_masks(tmp_path):
    from PIL import Image

    from egoslots.pipeline.data.frames import FrameFolderSource

    size = 16
    upright = np.full((size, 24, 3), 30, np.uint8)  # wider than tall, as the viewer shows it
    upright[:6, :8] = (250, 250, 250)  # an object at the top left
    label = np.zeros((size, 24), np.uint8)
    label[:6, :8] = 1
    folder = tmp_path / "data" / "phone"
    (folder / "masks").mkdir(parents=True)
    for i in range(2):
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored turned to the left
        sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
        sideways.save(folder / f"f{i}.jpg", quality=98, exif=exif)
        Image.fromarray(label).save(folder / "masks" / f"f{i}.png")
    source = FrameFolderSource(tmp_path / "data")
    assert source.has_masks
    frames = list(source.read_frames("phone"))
    assert [f.rgb.shape for f in frames] == [(size, 24, 3)] * 2
    for frame in frames:
        assert np.array_equal(frame.mask, label)
        inside, outside = frame.rgb[frame.mask == 1], frame.rgb[frame.mask == 0]
        assert inside.mean() > 200 and outside.mean() < 60  # the object lies under its mask


# --------------------------------------------------------------------------------------------
# 68-69: frame-folder layouts; a masks/ folder is never a video
# --------------------------------------------------------------------------------------------
def test_frames_one_folder_deeper_are_refused_naming_the_folder(tmp_path):
    from egoslots.pipeline.data.base import SourceError
    from egoslots.pipeline.data.frames import FrameFolderSource
    from tests.helpers.data import write_frames

    root = tmp_path / "data"
    for video in ("kitchen", "garden"):
        write_frames(root / video / "rgb", 3)
        write_frames(root / video / "masks", 3)  # label maps in masks/, beside rgb/
    with pytest.raises(SourceError) as err:
        FrameFolderSource(root).videos()
    text = str(err.value)
    assert str(root / "garden") in text and "rgb" in text, text
    assert "Frame-folder format" in text and "masks/" in text, text


def test_a_masks_folder_beside_video_folders_never_becomes_a_video(tmp_path):
    from egoslots.pipeline.data.base import SourceError
    from egoslots.pipeline.data.frames import FrameFolderSource
    from tests.helpers.data import write_frames

    root = tmp_path / "data"
    write_frames(root / "a", 3)
    write_frames(root / "b", 3)
    write_frames(root / "masks", 3)  # masks of... nothing beside them
    with pytest.raises(SourceError, match=r"masks.*never read as a video"):
        FrameFolderSource(root).videos()
    # the documented layout still lists, masks attached and not a video
    good = tmp_path / "good"
    write_frames(good / "a", 3, masks=True)
    write_frames(good / "b", 3, masks=True)
    source = FrameFolderSource(good)
    assert [v.video_id for v in source.videos()] == ["a", "b"] and source.has_masks


# --------------------------------------------------------------------------------------------
# 70: FIFOs, sockets and devices are refused by name before anything opens them
# --------------------------------------------------------------------------------------------
def test_a_fifo_among_frames_videos_or_as_the_dataset_is_refused_by_name(tmp_path):
    import socket

    from egoslots.pipeline.data.base import SourceError
    from egoslots.pipeline.data.frames import FrameFolderSource
    from egoslots.pipeline.data.hdf5 import Hdf5Source
    from egoslots.pipeline.data.video import VideoFileSource
    from tests.helpers.data import write_frames, write_video

    root = tmp_path / "frames"
    write_frames(root / "a", 3, masks=True)
    os.mkfifo(root / "a" / "frame3.png")  # a reader would block on it forever
    with pytest.raises(SourceError, match=r"frame3\.png: a FIFO \(named pipe\)"):
        FrameFolderSource(root).videos()
    os.unlink(root / "a" / "frame3.png")
    os.unlink(root / "a" / "masks" / "frame2.png")
    with socket.socket(socket.AF_UNIX) as sock:  # a socket where a mask should be
        sock.bind(str(root / "a" / "masks" / "frame2.png"))
        with pytest.raises(SourceError, match=r"masks/frame2\.png: a socket"):
            FrameFolderSource(root).videos()
    videos = tmp_path / "videos"
    write_video(videos / "ok.mp4", 4)
    os.mkfifo(videos / "live.mp4")
    with pytest.raises(SourceError, match=r"live\.mp4: a FIFO"):
        VideoFileSource(videos).videos()
    os.mkfifo(tmp_path / "data.h5")
    with pytest.raises(SourceError, match=r"data\.h5: a FIFO"):
        Hdf5Source(tmp_path / "data.h5", image_key="video").videos()


# --------------------------------------------------------------------------------------------
# 71-72: symbolic links to stores (cache rm, extract-features --overwrite)
# --------------------------------------------------------------------------------------------
def test_cache_rm_of_a_linked_store_removes_the_link_and_keeps_the_store(tmp_path):
    from click.testing import CliRunner

    from egoslots.cli import main

    real = frames_store(tmp_path / "disk2" / "shared.zarr", fingerprint="abcdef0123456789")
    stores = tmp_path / "work" / "stores"
    stores.mkdir(parents=True)
    link = stores / "abcdef0123456789.zarr"
    link.symlink_to(real.path, target_is_directory=True)
    result = CliRunner().invoke(
        main, ["cache", "rm", "abcdef", "--work-dir", str(tmp_path / "work"), "--yes"]
    )
    assert result.exit_code == 0, result.output
    assert "removed the link" in result.output and str(real.path) in result.output
    assert "kept" in result.output and result.exception is None
    assert not link.is_symlink() and not link.exists()
    assert FeatureStore.open(real.path).fingerprint == "abcdef0123456789"  # untouched
    # and the store itself, named by its real path, still goes
    result = CliRunner().invoke(main, ["cache", "rm", str(real.path), "--yes"])
    assert result.exit_code == 0 and "deleted" in result.output and not real.path.exists()


def test_overwrite_of_a_linked_store_replaces_it_where_it_lives_and_keeps_the_link(tmp_path):
    from egoslots.cache.catalog import NewStore, open_or_create

    old = frames_store(tmp_path / "disk2" / "s.zarr", fingerprint="old0000000000000")
    link = tmp_path / "work" / "stores" / "s.zarr"
    link.parent.mkdir(parents=True)
    link.symlink_to(old.path, target_is_directory=True)
    kwargs = dict(
        videos=records([("v", 8, "train")]), num_tokens=4, feature_dim=8, grid=(2, 2),
        frame_size=8, chunk_len=8,
    )  # fmt: skip
    new = NewStore(link, "new0000000000000", {}, kwargs, "config: yes\n")
    with pytest.raises(StoreError, match="different settings"):
        open_or_create(new, overwrite=False, shard_id=0)
    store = open_or_create(new, overwrite=True, shard_id=0)
    assert link.is_symlink() and Path(os.path.realpath(link)) == old.path
    assert store.fingerprint == "new0000000000000"
    assert FeatureStore.open(link, require_complete=False).fingerprint == "new0000000000000"
    link.unlink()
    link.symlink_to(tmp_path / "gone.zarr", target_is_directory=True)  # a dangling link
    with pytest.raises(StoreError, match=r"symbolic link to .*gone\.zarr, which does not exist"):
        open_or_create(new, overwrite=True, shard_id=0)


# --------------------------------------------------------------------------------------------
# 73: export-slots never writes into a feature store or a run's checkpoints
# --------------------------------------------------------------------------------------------
def test_export_slots_refuses_an_output_inside_a_store_or_checkpoints(tmp_path_factory, tmp_path):
    from click.testing import CliRunner

    from egoslots.cli import main

    run = slot_run(tmp_path_factory, tmp_path / "work")
    store = tmp_path / "work" / "stores" / "tinyfp.zarr"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link").symlink_to(store, target_is_directory=True)
    before = sorted(p.name for p in store.iterdir())
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    cases = [
        (store / "slots.zarr", "inside the feature store"),
        (store / "features" / "slots.npz", "inside the feature store"),
        (store, "is a feature store"),
        (tmp_path / "elsewhere" / "link" / "slots.zarr", "inside the feature store"),
        (run / "checkpoints" / "slots.zarr", "inside the checkpoints folder"),
        (run / "checkpoints", "the checkpoints folder"),
    ]
    for out, says in cases:
        result = CliRunner().invoke(main, ["export-slots", str(run), str(out), "--overwrite"])
        assert result.exit_code == 1, (out, result.output)
        assert says in result.output and "choose a path outside it" in result.output, result.output
    assert sorted(p.name for p in store.iterdir()) == before
    assert FeatureStore.open(store).complete
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints


# --------------------------------------------------------------------------------------------
# 74: a group with forged or incomplete egoslots attrs is never read as a store
# --------------------------------------------------------------------------------------------
def test_forged_or_incomplete_store_attrs_are_refused_at_open(tmp_path):
    import zarr
    from click.testing import CliRunner

    from egoslots.cli import main

    real = frames_store(tmp_path / "real.zarr", hflip=False)
    attrs = dict(real.meta)

    def forged(name: str, meta: dict, arrays: bool = False) -> Path:
        group = zarr.open_group(str(tmp_path / name), mode="w", zarr_format=3)
        if arrays:
            group.create_array("features", shape=(5, 4, 8), dtype="float16")
        group.attrs["egoslots"] = meta
        return tmp_path / name

    cases = {
        forged("bare.zarr", {"format_version": 1, "fingerprint": "x"}): "'complete' is None",
        forged("empty.zarr", attrs): "no 'features' array",
        forged("shapes.zarr", attrs, arrays=True): "'features' is (5, 4, 8) float16",
        forged("table.zarr", {**attrs, "videos": [{"id": "v", "first": 30, "length": 9, "split": "train"}]}): "past the",
        forged("rows.zarr", {**attrs, "videos": [["v", 0, 8]]}): "video table row 0",
        forged("count.zarr", {**attrs, "num_frames": "32"}): "'num_frames' is '32'",
    }  # fmt: skip
    for path, says in cases.items():
        with pytest.raises(StoreError) as err:
            FeatureStore.open(path, require_complete=False)
        assert says in str(err.value) and "egoslots reads only stores it wrote" in str(err.value)
        result = CliRunner().invoke(main, ["cache", "info", str(path)])
        assert result.exit_code == 1 and result.exception is not None, result.output
        assert isinstance(result.exception, SystemExit) and says in result.output, result.output
    # token groups: ids of another shape than the store's frame axis
    store = FeatureStore.open(real.path, mode="r+")
    sub = store.group.require_group("tokens/abc")
    sub.create_array("ids", shape=(3, 2, 2), dtype="uint16")
    sub.attrs["complete"] = True
    with pytest.raises(StoreError, match=r"tokens of dVAE abc .*ids \(3, 2, 2\) uint16"):
        store.tokens("abc")
    assert FeatureStore.open(real.path).num_frames == 32  # the real store still opens
