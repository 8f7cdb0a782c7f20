"""Video sources on real files the tests write: frame folders, video files, HDF5, make_source."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from egoslots.pipeline.config import ConfigError
from egoslots.pipeline.data import make_source
from egoslots.pipeline.data.base import SourceError, split_of
from egoslots.pipeline.data.frames import FrameFolderSource
from egoslots.pipeline.data.hdf5 import Hdf5Source
from egoslots.pipeline.data.video import VideoFileSource, subsample
from tests.helpers.data import (
    cfg_for,
    frame_image,
    frame_value,
    write_emorl_h5,
    write_frames,
    write_video,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- builders


# ---------------------------------------------------------------------------------- frame folders
def test_frame_folders_natural_order_nested_masks_meta(tmp_path):
    root = tmp_path / "data"
    write_frames(root / "child_S" / "vid2", 3, "jpg", names=["frame10", "frame2", "frame1"])
    write_frames(
        root / "child_S" / "vid10",
        2,
        "png",
        masks=True,
        meta={"fps": 12, "split": "test", "objects": [{"id": 1, "mesh": "cube"}]},
    )
    write_frames(root / "plain", 4, "png", masks=True)
    (root / ".partial-video_0003-123").mkdir()  # a generator still writing: ignored
    src = FrameFolderSource(root)
    rows = src.videos()
    assert [r.video_id for r in rows] == ["child_S/vid2", "child_S/vid10", "plain"]
    vid2 = rows[0]
    assert vid2.num_frames == 3 and vid2.split == split_of("child_S/vid2")
    assert [f.path for f in vid2.files] == [
        "child_S/vid2/frame1.jpg",
        "child_S/vid2/frame2.jpg",
        "child_S/vid2/frame10.jpg",
    ]
    assert all(f.size > 0 and f.content == 0 for f in vid2.files)  # never the mtime
    # frame2 (written as image 1) comes before frame10 (written as image 0)
    frames = list(src.read_frames("child_S/vid2"))
    assert [f.index for f in frames] == [0, 1, 2]
    assert [abs(int(f.rgb[5, 5, 0]) - v) <= 3 for f, v in zip(frames, (16, 8, 0))] == [True] * 3
    assert frames[0].rgb.dtype == np.uint8 and frames[0].rgb.shape == (12, 16, 3)
    vid10 = rows[1]
    assert vid10.split == "test" and vid10.fps == 12.0
    assert len(vid10.files) == 4  # 2 frames + 2 masks
    assert src.attributes("child_S/vid10")["objects"] == [{"id": 1, "mesh": "cube"}]
    assert src.attributes("plain") is None
    # one video without masks: the source as a whole has none
    assert src.has_masks is False


def test_frame_folder_masks_and_partial_reads(tmp_path):
    root = tmp_path / "data"
    write_frames(root / "a", 5, masks=True)
    write_frames(root / "b", 3, masks=True)
    src = FrameFolderSource(root)
    assert src.has_masks
    part = list(src.read_frames("a", 2, 4))
    assert [f.index for f in part] == [2, 3]
    assert part[0].mask.dtype == np.uint8 and part[0].mask.shape == (12, 16)
    assert int(part[0].mask[0, 0]) == 2 and int(part[1].mask[0, 0]) == 3
    assert np.array_equal(part[1].rgb, frame_image(3))  # PNG is lossless


def test_grayscale_rgba_palette_are_converted(tmp_path):
    folder = tmp_path / "data" / "v"
    folder.mkdir(parents=True)
    base = frame_image(5)
    Image.fromarray(base[..., 0]).save(folder / "0.png")  # L
    Image.fromarray(np.dstack([base, np.full(base.shape[:2], 7, np.uint8)])).save(
        folder / "1.png"
    )  # RGBA
    Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "2.png"
    )  # palette
    Image.fromarray(base[..., 0].astype(np.uint16) * 257).save(folder / "3.png")  # 16-bit grey
    frames = list(FrameFolderSource(tmp_path / "data").read_frames("v"))
    for f in frames:
        assert f.rgb.shape == (12, 16, 3) and f.rgb.dtype == np.uint8
        assert np.array_equal(f.rgb[..., 0], base[..., 0]), f.index


def test_source_pickles_for_worker_processes(tmp_path):
    write_frames(tmp_path / "v", 3)
    src = FrameFolderSource(tmp_path)
    src.videos()
    clone = pickle.loads(pickle.dumps(src))
    assert [f.index for f in clone.read_frames("v")] == [0, 1, 2]


def test_listing_does_not_decode_frames(tmp_path, monkeypatch):
    write_frames(tmp_path / "v", 4)
    opened = []
    monkeypatch.setattr(
        Image, "open", lambda *a, **k: opened.append(a) or (_ for _ in ()).throw(AssertionError)
    )
    assert FrameFolderSource(tmp_path).videos()[0].num_frames == 4
    assert opened == []


# ---------------------------------------------------------------------------------- video files
def test_subsample_rule():
    times = np.arange(60) / 30
    assert subsample(times, 5).tolist() == list(range(0, 60, 6))
    assert subsample(times, None).tolist() == list(range(60))
    jitter = np.round(times * 1000) / 1000  # millisecond timestamps
    assert subsample(jitter, 5).tolist() == list(range(0, 60, 6))
    assert subsample(times, 60).tolist() == list(
        range(60)
    )  # denser than the file: every frame once


def test_video_file_source_reads_every_frame_in_order(tmp_path):
    write_video(tmp_path / "clips" / "b.mp4", 20)
    write_video(tmp_path / "a.mkv", 5)
    src = VideoFileSource(tmp_path)
    rows = src.videos()
    assert [r.video_id for r in rows] == ["a.mkv", "clips/b.mp4"]
    assert [r.num_frames for r in rows] == [5, 20] and rows[1].fps == 30.0
    assert rows[1].files[0].path == "clips/b.mp4" and rows[1].files[0].size > 0
    frames = list(src.read_frames("clips/b.mp4"))
    assert [frame_value(f) for f in frames] == list(range(20))
    assert (
        frames[3].rgb.shape == (16, 16, 3)
        and frames[3].rgb.dtype == np.uint8
        and frames[3].mask is None
    )


def test_video_fps_subsampling_and_chunked_reads(tmp_path):
    write_video(tmp_path / "v.mp4", 60)
    src = VideoFileSource(tmp_path, fps=5)
    (row,) = src.videos()
    assert row.num_frames == 10 and row.fps == 5.0
    assert [frame_value(f) for f in src.read_frames("v.mp4")] == list(range(0, 60, 6))
    # chunks in order reuse the decoder; a jump backwards seeks; indices are the subsampled ones
    got = [
        (f.index, frame_value(f))
        for a, b in ((0, 3), (3, 7), (7, 10), (5, 6))
        for f in src.read_frames("v.mp4", a, b)
    ]
    assert got == [(i, 6 * i) for i in range(10)] + [(5, 30)]


@pytest.mark.parametrize("name", ["v.mp4", "v.mkv", "v.avi"])
def test_video_seek_into_the_middle(tmp_path, name):
    write_video(tmp_path / name, 40)
    src = VideoFileSource(tmp_path)
    assert [frame_value(f) for f in src.read_frames(name, 27, 31)] == [27, 28, 29, 30]
    assert [frame_value(f) for f in src.read_frames(name, 9, 10)] == [9]


# ---------------------------------------------------------------------------------- HDF5
def test_hdf5_efficientmorl_layout_binary_masks_to_labels(tmp_path):
    path = tmp_path / "clevr6.h5"
    truth = write_emorl_h5(path)
    src = Hdf5Source(path, image_key="imgs", mask_key="masks", layout="image")
    rows = src.videos()
    assert (
        len(rows) == 10
        and rows[0].video_id == "test/000000"
        and rows[-1].video_id == "train/000004"
    )
    assert {r.split for r in rows} == {"train", "test"}
    assert all(r.num_frames == 1 and r.files[0].path == "clevr6.h5" for r in rows)
    assert src.has_masks
    (frame,) = list(src.read_frames("train/000003"))
    imgs, labels = truth["train"]
    assert np.array_equal(frame.rgb, imgs[3])
    assert frame.mask.dtype == np.uint8 and np.array_equal(frame.mask, labels[3])


def test_hdf5_video_layout_float_images_label_masks(tmp_path):
    path = tmp_path / "vids.h5"
    imgs = np.random.default_rng(1).random((3, 4, 8, 8, 3)).astype(np.float32)
    masks = np.random.default_rng(2).integers(0, 5, (3, 4, 8, 8)).astype(np.int32)
    with h5py.File(path, "w") as f:
        f["image"] = imgs
        f["mask"] = masks
    src = Hdf5Source(tmp_path)  # a folder of files: ids carry the file name
    rows = src.videos()
    assert [r.video_id for r in rows] == ["vids/000000", "vids/000001", "vids/000002"]
    assert rows[0].num_frames == 4 and rows[0].split == split_of("vids/000000")
    frames = list(src.read_frames("vids/000001", 1, 3))
    assert [f.index for f in frames] == [1, 2]
    assert np.abs(frames[0].rgb.astype(int) - np.round(imgs[1, 1] * 255)).max() <= 1
    assert np.array_equal(frames[1].mask, masks[1, 2].astype(np.uint8))


def test_hdf5_handles_are_opened_per_process(tmp_path):
    path = tmp_path / "x.h5"
    write_emorl_h5(path, n=2)
    src = Hdf5Source(path, image_key="imgs", mask_key="masks", layout="image")
    list(src.read_frames("train/000000"))
    assert src._open_files  # opened lazily in this process
    clone = pickle.loads(pickle.dumps(src))
    assert clone._open_files is None  # never pickled (spawned workers)
    src._open_pid = -1  # as seen from a forked child: it must open its own handle
    list(src.read_frames("train/000001"))
    assert src._open_pid > 0


def _checksums(src, ids, start=0):
    return [int(sum(int(f.rgb.sum()) for f in src.read_frames(v, start))) for v in ids]


_INHERITED = {}  # set before forking: children use the parent's object itself, not a pickled copy


def _child_checksums(ids):
    return _checksums(_INHERITED["src"], ids, start=1)


@pytest.mark.parametrize("kind", ["hdf5", "video"])
def test_reads_in_forked_workers_after_the_parent_read(tmp_path, kind):
    """A parent that holds an open file / decoder forks DataLoader-style workers; each must open its own."""
    import multiprocessing

    if kind == "hdf5":
        path = tmp_path / "x.h5"
        with h5py.File(path, "w") as f:
            f["image"] = np.random.default_rng(0).integers(0, 255, (3, 6, 8, 8, 3), dtype=np.uint8)
        make = lambda: Hdf5Source(path, mask_key=None)  # noqa: E731
    else:
        write_video(tmp_path / "v.mp4", 12)
        make = lambda: VideoFileSource(tmp_path)  # noqa: E731
    src = make()
    ids = [r.video_id for r in src.videos()]
    expected = _checksums(make(), ids, start=1)
    list(src.read_frames(ids[0], 0, 1))  # leaves a handle / decoder positioned at frame 1 open
    _INHERITED["src"] = src
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.map(_child_checksums, [ids] * 4)
    finally:
        _INHERITED.clear()
    assert results == [expected] * 4


# ---------------------------------------------------------------------------------- make_source


def test_make_source_kinds_and_max_videos(tmp_path):
    for i in range(5):
        write_frames(tmp_path / "frames" / f"v{i}", 2)
    src = make_source(
        cfg_for(
            "dataset.source=frames", f"dataset.path={tmp_path / 'frames'}", "dataset.max_videos=3"
        )
    )
    assert isinstance(src, FrameFolderSource) and [r.video_id for r in src.videos()] == [
        "v0",
        "v1",
        "v2",
    ]
    write_video(tmp_path / "vid" / "a.mp4", 12)
    src = make_source(
        cfg_for("dataset.source=video", f"dataset.path={tmp_path / 'vid'}", "dataset.fps=10")
    )
    assert isinstance(src, VideoFileSource) and src.videos()[0].num_frames == 4
    write_emorl_h5(tmp_path / "x.h5", n=2)
    src = make_source(
        cfg_for(
            "dataset.source=hdf5",
            f"dataset.path={tmp_path / 'x.h5'}",
            "dataset.hdf5.image_key=imgs",
            "dataset.hdf5.mask_key=masks",
            "dataset.hdf5.layout=image",
        )
    )
    assert isinstance(src, Hdf5Source) and len(src.videos()) == 4
    src = make_source(cfg_for("dataset.source=synthetic", f"dataset.path={tmp_path / 'frames'}"))
    assert isinstance(src, FrameFolderSource) and len(src.videos()) == 5


def test_make_source_split_fractions(tmp_path):
    for i in range(40):
        write_frames(tmp_path / f"v{i}", 1, size=(2, 2))
    src = make_source(
        cfg_for(
            "dataset.source=frames",
            f"dataset.path={tmp_path}",
            "dataset.split.val=0.5",
            "dataset.split.test=0.5",
        )
    )
    assert {r.split for r in src.videos()} == {"val", "test"}
    with pytest.raises(SourceError, match="dataset.split"):  # the source's own check
        FrameFolderSource(tmp_path, val=0.8, test=0.5)
    with pytest.raises(ConfigError, match="dataset.split.val=0.8 and dataset.split.test=0.5 sum"):
        cfg_for("dataset.source=frames", "dataset.split.val=0.8", "dataset.split.test=0.5")


def test_make_source_missing_synthetic_data_says_how_to_make_it(tmp_path):
    with pytest.raises(SourceError, match="make-synthetic") as err:
        make_source(cfg_for("dataset.source=synthetic", f"dataset.path={tmp_path / 'nope'}"))
    assert "egoslots run" in str(err.value) and str(tmp_path / "nope") in str(err.value)
    with pytest.raises(ConfigError, match="dataset.source='mp3' is not allowed: must be one of"):
        cfg_for("dataset.source=mp3")  # refused by the config check, before make_source


def test_split_is_deterministic_and_roughly_80_10_10():
    ids = [f"child_S/video_{i:05d}" for i in range(4000)]
    first = [split_of(v) for v in ids]
    assert first == [split_of(v) for v in ids]
    share = {s: first.count(s) / len(ids) for s in ("train", "val", "test")}
    assert (
        abs(share["train"] - 0.8) < 0.03
        and abs(share["val"] - 0.1) < 0.02
        and abs(share["test"] - 0.1) < 0.02
    )


# ---------------------------------------------------------------------------------- inspect-data
def test_inspect_data_command(tmp_path):
    from egoslots.cli import main

    write_frames(
        tmp_path / "a", 5, masks=True, meta={"objects": [{"id": 1, "mesh": "duck", "size": 0.1}]}
    )
    write_frames(tmp_path / "b", 2, masks=True)
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        main,
        [
            "inspect-data",
            str(REPO / "configs" / "demo.yaml"),
            "dataset.source=frames",
            f"dataset.path={tmp_path}",
            "dataset.ep_length=3",
            "--skip-bad",
            "--check",
        ],
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "videos        2" in out and "frames        7" in out
    assert "16x12" in out and "masks         yes" in out
    assert "objects       1-1 per video; attributes: id, mesh, size" in out
    assert "skipped       1 bad video(s)" in out and "empty: " in out
    # without --skip-bad the empty folder is one clean error line naming it
    result = CliRunner().invoke(
        main,
        [
            "inspect-data",
            str(REPO / "configs" / "demo.yaml"),
            "dataset.source=frames",
            f"dataset.path={tmp_path}",
        ],
    )
    assert (
        result.exit_code != 0
        and "empty video folder" in result.output
        and "Traceback" not in result.output
    )


def test_inspect_data_subprocess_help():
    import subprocess

    out = subprocess.run(
        [sys.executable, "cli.py", "inspect-data", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "egoslots inspect-data configs/demo.yaml" in out.stdout
