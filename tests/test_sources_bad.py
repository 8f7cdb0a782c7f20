"""Bad input: one clear SourceError naming the file (and frame), or a counted skip under skip-bad."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from egoslots.pipeline.data import make_source
from egoslots.pipeline.data.base import SourceError
from egoslots.pipeline.data.frames import FrameFolderSource
from egoslots.pipeline.data.hdf5 import Hdf5Source
from egoslots.pipeline.data.video import VideoFileSource
from tests.helpers.data import cfg_for, write_emorl_h5, write_frames, write_video


def test_corrupt_jpeg_is_named_with_its_frame_index_when_read(tmp_path):
    write_frames(tmp_path / "v", 4, "jpg")
    bad = tmp_path / "v" / "frame2.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    src = FrameFolderSource(tmp_path)
    assert src.videos()[0].num_frames == 4  # listing does not decode
    frames = src.read_frames("v")
    assert [next(frames).index, next(frames).index] == [0, 1]
    with pytest.raises(SourceError) as err:
        next(frames)
    assert str(bad) in str(err.value) and "frame 2 of video 'v'" in str(err.value)


def test_unreadable_image_file(tmp_path):
    write_frames(tmp_path / "v", 2)
    (tmp_path / "v" / "frame1.png").write_bytes(b"not a png at all")
    with pytest.raises(
        SourceError, match=r"frame1\.png: frame 1 of video 'v': cannot decode image"
    ):
        list(FrameFolderSource(tmp_path).read_frames("v"))


def test_empty_folder(tmp_path):
    write_frames(tmp_path / "good", 2)
    (tmp_path / "empty_video").mkdir()
    with pytest.raises(SourceError, match=r"empty_video: empty video folder"):
        FrameFolderSource(tmp_path).videos()
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(SourceError, match=r"no videos found in .*empty_root"):
        FrameFolderSource(tmp_path / "empty_root").videos()
    with pytest.raises(SourceError, match=r"does not exist"):
        FrameFolderSource(tmp_path / "missing").videos()


def test_frames_of_different_sizes(tmp_path):
    write_frames(tmp_path / "v", 3)
    Image.fromarray(np.zeros((20, 16, 3), np.uint8)).save(tmp_path / "v" / "frame2.png")
    with pytest.raises(SourceError) as err:
        list(FrameFolderSource(tmp_path).read_frames("v"))
    msg = str(err.value)
    assert "frame2.png" in msg and "frame 2" in msg and "(20, 16)" in msg and "(12, 16)" in msg
    # the same check when reading starts past frame 0
    with pytest.raises(SourceError, match="frame 2"):
        list(FrameFolderSource(tmp_path).read_frames("v", 2, 3))


def test_mask_size_mismatch_missing_mask_and_colour_mask(tmp_path):
    write_frames(tmp_path / "v", 3, masks=True)
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "v" / "masks" / "frame1.png")
    with pytest.raises(SourceError) as err:
        list(FrameFolderSource(tmp_path).read_frames("v"))
    assert (
        "masks/frame1.png" in str(err.value)
        and "frame 1" in str(err.value)
        and "8x6" in str(err.value)
    )

    colour = np.zeros((12, 16, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp_path / "v" / "masks" / "frame1.png")
    with pytest.raises(SourceError, match=r"frame1\.png: mask of frame 1 .*colour mask"):
        list(FrameFolderSource(tmp_path).read_frames("v"))

    (tmp_path / "v" / "masks" / "frame1.png").unlink()
    with pytest.raises(
        SourceError, match=r"no mask for frame 1 \(frame1\.png\): expected masks/frame1\.png"
    ):
        FrameFolderSource(tmp_path).videos()


def test_bad_meta_json(tmp_path):
    write_frames(tmp_path / "v", 2)
    (tmp_path / "v" / "meta.json").write_text("{not json")
    with pytest.raises(SourceError, match=r"v/meta\.json: cannot read meta\.json"):
        FrameFolderSource(tmp_path).videos()
    (tmp_path / "v" / "meta.json").write_text(json.dumps({"split": "holdout"}))
    with pytest.raises(
        SourceError, match=r"meta\.json: split 'holdout' is not one of train, val, test"
    ):
        FrameFolderSource(tmp_path).videos()


def test_undecodable_and_truncated_video_files(tmp_path):
    (tmp_path / "garbage.mp4").write_bytes(b"\x00" * 4096)
    with pytest.raises(SourceError, match=r"garbage\.mp4: cannot read video"):
        VideoFileSource(tmp_path).videos()
    write_video(tmp_path / "cut" / "v.mp4", 10)
    data = (tmp_path / "cut" / "v.mp4").read_bytes()
    (tmp_path / "cut" / "v.mp4").write_bytes(
        data[: len(data) // 2]
    )  # the index (moov) is at the end
    with pytest.raises(SourceError, match=r"v\.mp4: cannot read video"):
        VideoFileSource(tmp_path / "cut").videos()


def test_video_frames_lost_after_listing_are_named(tmp_path):
    write_video(tmp_path / "v.mkv", 12)
    src = VideoFileSource(tmp_path)
    src.videos()
    write_video(tmp_path / "v.mkv", 7)  # the file changed under us: fewer frames than listed
    with pytest.raises(SourceError, match=r"v\.mkv: video 'v\.mkv' ended at frame 7 of 12"):
        list(src.read_frames("v.mkv"))


def test_hdf5_missing_keys_list_what_the_file_has(tmp_path):
    path = tmp_path / "data.h5"
    write_emorl_h5(path, n=2)
    with pytest.raises(SourceError) as err:
        Hdf5Source(path).videos()  # default keys 'image'/'mask' are not EfficientMORL's
    msg = str(err.value)
    assert (
        str(path) in msg
        and "'image'" in msg
        and "train/imgs (2, 8, 10, 3)" in msg
        and "did you mean 'imgs'" in msg
    )
    with pytest.raises(SourceError, match=r"no dataset 'mask' .*mask_key=null.*train/masks"):
        Hdf5Source(path, image_key="imgs", layout="image").videos()
    assert len(Hdf5Source(path, image_key="imgs", mask_key=None, layout="image").videos()) == 4


def test_hdf5_bad_shapes_and_files(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((2, 3, 8, 8, 3), np.uint8)
        f["mask"] = np.zeros((2, 3, 4, 4), np.uint8)
    with pytest.raises(
        SourceError,
        match=r"x\.h5:/mask: mask shape \(2, 3, 4, 4\) does not match the frames' size 8x8",
    ):
        Hdf5Source(path).videos()
    with pytest.raises(SourceError, match=r"does not fit dataset.hdf5.layout=image"):
        Hdf5Source(path, mask_key=None, layout="image").videos()
    (tmp_path / "junk.h5").write_bytes(b"junk" * 100)
    with pytest.raises(SourceError, match=r"junk\.h5: cannot read HDF5 file"):
        Hdf5Source(tmp_path / "junk.h5").videos()


def test_skip_bad_skips_counts_and_lists(tmp_path):
    for name in ("a", "b", "c"):
        write_frames(tmp_path / name, 2)
    (tmp_path / "b" / "meta.json").write_text("[")
    (tmp_path / "d").mkdir()
    src = make_source(
        cfg_for("dataset.source=frames", f"dataset.path={tmp_path}", "dataset.skip_bad=true")
    )
    assert [r.video_id for r in src.videos()] == ["a", "c"]
    assert [vid for vid, _ in src.skipped] == ["b", "d"]
    assert "meta.json" in src.skipped[0][1] and "empty video folder" in src.skipped[1][1]
    # the --skip-bad flag a stage passes does the same without the config key
    src = make_source(cfg_for("dataset.source=frames", f"dataset.path={tmp_path}"), skip_bad=True)
    assert len(src.videos()) == 2 and len(src.skipped) == 2
    # max_videos counts good videos only
    src = make_source(
        cfg_for("dataset.source=frames", f"dataset.path={tmp_path}", "dataset.max_videos=2"),
        skip_bad=True,
    )
    assert [r.video_id for r in src.videos()] == ["a", "c"]


def test_skip_bad_video_files_and_nothing_left(tmp_path):
    write_video(tmp_path / "good.mp4", 4)
    (tmp_path / "bad.avi").write_bytes(b"RIFF" + b"\x01" * 500)
    src = VideoFileSource(tmp_path, skip_bad=True)
    assert [r.video_id for r in src.videos()] == ["good.mp4"]
    assert src.skipped[0][0] == "bad.avi" and "bad.avi" in src.skipped[0][1]
    (tmp_path / "good.mp4").unlink()
    with pytest.raises(SourceError, match=r"no videos found .*1 skipped as bad"):
        VideoFileSource(tmp_path, skip_bad=True).videos()


def test_bad_config_values():
    with pytest.raises(SourceError, match="dataset.hdf5.layout 'frames'"):
        Hdf5Source(Path("."), layout="frames")
    with pytest.raises(SourceError, match="dataset.fps must be > 0"):
        VideoFileSource(Path("."), fps=0)
    with pytest.raises(SourceError, match="dataset.max_videos"):
        FrameFolderSource(Path("."), max_videos=0)
