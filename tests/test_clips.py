"""Clip sampling (pipeline/data/clips.py): lengths, stride, frame step, too-short videos."""

from __future__ import annotations

import logging

import pytest

from egoslots.pipeline.data.clips import Clip, build_clip_index, clip_starts, span


def test_last_clip_ends_exactly_at_the_last_frame():
    starts = clip_starts(10, length=4)
    assert starts == list(range(7))
    last = Clip(0, starts[-1]).frames(4, 1)
    assert list(last) == [6, 7, 8, 9]
    assert clip_starts(4, length=4) == [0]  # a video exactly one clip long


def test_stride_and_frame_step():
    assert clip_starts(10, length=3, stride=3) == [0, 3, 6]
    assert span(3, 2) == 5
    assert clip_starts(10, length=3, step=2) == [0, 1, 2, 3, 4, 5]
    assert list(Clip(0, 5).frames(3, 2)) == [5, 7, 9]  # the last clip touches frame 9
    assert clip_starts(9, length=3, stride=4, step=2) == [0, 4]
    assert clip_starts(4, length=3, step=2) == []  # span 5 > 4 frames


def test_short_videos_give_no_clip_and_are_reported_once(caplog):
    with caplog.at_level(logging.WARNING):
        clips = build_clip_index([5, 2, 3, 1], length=3, names=["long", "short", "exact", "tiny"])
    assert [(c.video, c.start) for c in clips] == [(0, 0), (0, 1), (0, 2), (2, 0)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 video(s)" in warnings[0].getMessage() and "short, tiny" in warnings[0].getMessage()


def test_no_warning_when_every_video_has_a_clip(caplog):
    with caplog.at_level(logging.WARNING):
        assert len(build_clip_index([4, 4], length=4, stride=2)) == 2
    assert not caplog.records


@pytest.mark.parametrize("args", [(0, 1, 1), (2, 0, 1), (2, 1, 0)])
def test_invalid_clip_settings(args):
    with pytest.raises(ValueError, match="must be >= 1"):
        clip_starts(10, *args)


def test_clip_index_over_a_real_source(tmp_path):
    """The source's video table feeds the clip index as the store reader does."""
    from egoslots.pipeline.data.frames import FrameFolderSource
    from tests.helpers.data import write_frames

    write_frames(tmp_path / "a", 6, size=(4, 4))
    write_frames(tmp_path / "b", 2, size=(4, 4))
    rows = FrameFolderSource(tmp_path).videos()
    clips = build_clip_index(
        [r.num_frames for r in rows], length=3, stride=2, names=[r.video_id for r in rows]
    )
    assert [(rows[c.video].video_id, c.start) for c in clips] == [("a", 0), ("a", 2)]
    src = FrameFolderSource(tmp_path)
    frames = [f.index for f in src.read_frames("a", clips[-1].start, clips[-1].start + 3)]
    assert frames == [2, 3, 4]
