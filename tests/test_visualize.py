"""`visualize`: GIF with one image per frame, PNG strip, colours fixed per slot."""

import imageio.v3 as iio
import numpy as np
import pytest
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
    # frame | slot masks | slot masks refined to pixels | dVAE reconstruction of the tokens
    assert gif.shape[:4] == (FRAMES, SIZE, 4 * SIZE, 3)
    strip = iio.imread(png)  # the same four panels as rows, one column per frame
    assert strip.shape[:2] == (4 * SIZE + 3 * 2, FRAMES * (SIZE + 2) - 2)


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
        viz, "infer_video", lambda *a, **k: seen.append(k["restarts"]) or real(*a, **k)
    )
    result = CliRunner().invoke(cli.main, ["visualize", str(run), "--restarts", "3"])
    assert result.exit_code == 0, result.output
    assert seen == [3]
    bad = CliRunner().invoke(cli.main, ["visualize", str(run), "--restarts", "0"])
    assert bad.exit_code != 0 and "--restarts" in bad.output
