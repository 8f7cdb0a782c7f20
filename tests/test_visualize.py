"""`visualize`: GIF with one image per frame, PNG strip, colours fixed per slot."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from egoslots.stages import visualize as viz
from egoslots.stages.machinery import pictures
from tests.helpers.runs import slot_run
from tests.helpers.stores import SQ_FRAMES as FRAMES
from tests.helpers.stores import SQ_SIZE as SIZE


@pytest.fixture
def run(tmp_path_factory, tmp_path):
    return slot_run(tmp_path_factory, tmp_path / "work")


def test_visualize_default_video(run):
    png = viz.visualize_run(run)
    assert png == run / "viz" / "video_03.png"  # the first test video
    gif = iio.imread(png.with_suffix(".gif"), index=None)
    # frame | slot masks | refined to pixels | refined, each slot's connected parts apart |
    # dVAE reconstruction of the tokens
    assert gif.shape[:4] == (FRAMES, SIZE, 5 * SIZE, 3)
    strip = iio.imread(png)  # the same five panels as rows, one column per frame
    assert strip.shape[:2] == (5 * SIZE + 4 * 2, FRAMES * (SIZE + 2) - 2)


def test_visualize_named_video_and_strip_column_limit(run, tmp_path):
    png = viz.visualize_run(run, video_id="video_01", out=tmp_path / "pics", max_columns=4)
    assert png == tmp_path / "pics" / "video_01.png"
    assert iio.imread(png).shape[1] == 4 * (SIZE + 2) - 2
    with pytest.raises(Exception, match="no video 'nope'"):
        viz.visualize_run(run, video_id="nope")


def test_slot_colours_are_fixed_by_index():
    labels = np.array([[[0, 1], [2, 3]], [[3, 2], [1, 0]]])
    colours = pictures.slot_colours(labels)
    assert (colours[0, 0, 1] == colours[1, 1, 0]).all()  # slot 1 keeps its colour over time
    assert len({tuple(c) for c in pictures.PALETTE}) == len(pictures.PALETTE)


def test_cli_visualize(run):
    from egoslots import cli

    result = CliRunner().invoke(cli.main, ["visualize", str(run), "--video", "video_04"])
    assert result.exit_code == 0, result.output
    assert "video_04.gif" in result.output and (run / "viz" / "video_04.png").exists()


def test_cli_visualize_passes_restarts_to_inference(run, monkeypatch):
    from egoslots import cli

    seen = []
    real = viz.infer_video
    monkeypatch.setattr(
        viz, "infer_video", lambda *a, **k: seen.append(a[0].config.restarts) or real(*a, **k)
    )
    result = CliRunner().invoke(cli.main, ["visualize", str(run), "--restarts", "3"])
    assert result.exit_code == 0, result.output
    assert seen == [3]
    bad = CliRunner().invoke(cli.main, ["visualize", str(run), "--restarts", "0"])
    assert bad.exit_code != 0 and "--restarts" in bad.output


def test_visualize_writes_the_slot_timeline(run):
    png = viz.visualize_run(run, video_id="video_01", track="match")
    picture = iio.imread(png.with_name("video_01.timeline.png"))
    assert picture.ndim == 3 and picture.shape[1] >= FRAMES  # a column (or more) per frame
    used = {tuple(c) for c in picture.reshape(-1, 3)}
    assert any(tuple(c) in used for c in pictures.PALETTE[:4])  # slots in the overlay's colours


def test_timeline_draws_each_slot_area_in_its_colour():
    # 4 frames, 3 slots: slot 0 owns frames 0-1, slot 2 frames 2-3 (an identity switch)
    areas = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0], [0.5, 0, 0.5]])
    picture = pictures.timeline(areas, ticks=[0, 2], lane_height=10)
    per = 8  # pixels per frame for a short video
    left, top, gap = 48, 64, 4
    blue, red, green = (tuple(pictures.PALETTE[k]) for k in (0, 2, 1))
    column = lambda t: left + t * per + per // 2  # noqa: E731
    assert {tuple(c) for c in picture[:top, column(0)]} == {blue}  # stacked shares: all slot 0
    assert {tuple(c) for c in picture[:top, column(2)]} == {red}
    assert {tuple(c) for c in picture[:top, column(3)]} == {blue, red}
    lane = lambda k, t: picture[top + gap + k * 10 : top + gap + k * 10 + 9, column(t)]  # noqa: E731
    assert (lane(0, 0) == blue).all(1).sum() >= 7 and not (lane(0, 2) == blue).all(1).any()
    assert (lane(2, 2) == red).all(1).sum() >= 7 and (lane(2, 3) == red).all(1).sum() in (3, 4, 5)
    assert not (lane(1, 1) == green).all(1).any()  # slot 1 never owns anything


def test_slot_areas_are_arg_max_shares():
    masks = torch.tensor([[[0.9, 0.2, 0.6, 0.1], [0.1, 0.8, 0.4, 0.9]]])  # (T=1, K=2, N=4)
    np.testing.assert_allclose(pictures.slot_areas(masks), [[0.5, 0.5]])
