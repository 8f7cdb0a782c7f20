"""`visualize`: GIF with one image per frame, PNG strip, colours fixed per slot."""

import imageio.v3 as iio
import numpy as np
import pytest
from click.testing import CliRunner
from test_evaluate_support import FRAMES, SIZE, install_run, make_run

from stages import visualize as viz


@pytest.fixture
def run(tmp_path, monkeypatch):
    install_run(monkeypatch)
    run_dir, _ = make_run(tmp_path)
    return run_dir


def test_visualize_default_video(run):
    png = viz.visualize_run(run)
    assert png == run / "viz" / "video_03.png"  # the first test video
    gif = iio.imread(png.with_suffix(".gif"), index=None)
    assert gif.shape[0] == FRAMES
    assert gif.shape[1] == SIZE and gif.shape[2] >= 2 * SIZE  # frame | overlay (| reconstruction)
    strip = iio.imread(png)
    assert strip.shape[0] >= 2 * SIZE and strip.shape[1] == FRAMES * (SIZE + 2) - 2


def test_visualize_named_video_and_strip_column_limit(run, tmp_path):
    png = viz.visualize_run(run, video_id="video_01", out=tmp_path / "pics", max_columns=4)
    assert png == tmp_path / "pics" / "video_01.png"
    assert iio.imread(png).shape[1] == 4 * (SIZE + 2) - 2
    with pytest.raises(Exception, match="no video 'nope'"):
        viz.visualize_run(run, video_id="nope")


def test_slot_colours_are_fixed_by_index():
    labels = np.array([[[0, 1], [2, 3]], [[3, 2], [1, 0]]])
    colours = viz.slot_colours(labels)
    assert (colours[0, 0, 1] == colours[1, 1, 0]).all()  # slot 1 keeps its colour over time
    assert len({tuple(c) for c in viz.PALETTE}) == len(viz.PALETTE)


def test_cli_visualize(run):
    import cli

    result = CliRunner().invoke(cli.main, ["visualize", str(run), "--video", "video_04"])
    assert result.exit_code == 0, result.output
    assert "video_04.gif" in result.output and (run / "viz" / "video_04.png").exists()


def test_real_run_visualize(tmp_path_factory, tmp_path):
    from test_evaluate_support import trained_run

    png = viz.visualize_run(trained_run(tmp_path_factory), out=tmp_path)
    gif = iio.imread(png.with_suffix(".gif"), index=None)
    assert gif.shape[:3] == (
        FRAMES,
        SIZE,
        3 * SIZE,
    )  # frame | slot masks | dVAE reconstruction of the tokens
    assert iio.imread(png).shape[0] == 3 * SIZE + 2 * 2  # three rows in the strip
