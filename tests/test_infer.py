"""`egoslots infer RUN VIDEO_OR_FOLDER`: a trained run on new frames without a store gives
export-slots' slots on the same frames, and writes the overlay and the slot timeline."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from egoslots.stages.export_slots import export_slots_run
from egoslots.stages.extract_features import extract
from egoslots.stages.infer import infer_run
from egoslots.stages.machinery.common import StageError
from egoslots.stages.train_slots import train
from tests.helpers.data import extract_cfg, write_frame_folder, write_video
from tests.helpers.footage import clip_path

VIDEOS, FRAMES, SLOTS = 2, 7, 3  # 7 frames in windows of 3: the last window is short


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Frame folders -> a store (patch-pixels, extract-features) -> a 3-step slot run."""
    root = tmp_path_factory.mktemp("infer")
    data = write_frame_folder(root / "data", VIDEOS, FRAMES, (40, 48))
    cfg = extract_cfg(
        root / "work",
        "dataset.source=frames",
        f"dataset.path={data}",
        "dataset.split.val=0",
        "dataset.split.test=0",
        "globals.USE_DVAE=false",
        "globals.USE_STEVE_DECODER=false",
        f"globals.NUM_SLOTS={SLOTS}",
        "globals.SLOT_DIM=16",
        "globals.NUM_FRAMES=3",
        "globals.BATCH_SIZE_PER_GPU=2",
        "dataset.num_workers=0",
        "decoder.hidden_dims=[32]",
        "predictor.num_heads=2",
        "inference.restarts=2",
        "optimizer.warmup_steps=1",
        "trainer.max_steps=3",
        "trainer.ckpt_every=3",
        "trainer.val_every=100",
        "trainer.image_every=100",
        "trainer.precision=32",
        "trainer.accelerator=cpu",
        "run_name=slots",
        "seed=0",
    )
    extract(cfg)
    run_dir = train(cfg)
    return run_dir, data


def _rows(npz, video_id):
    ids = [str(v) for v in npz["video_ids"]]
    v = ids.index(video_id)
    first, length = int(npz["video_first"][v]), int(npz["video_length"][v])
    return slice(first, first + length)


def test_infer_gives_export_slots_slots_and_writes_pictures(trained, tmp_path):
    run_dir, data = trained
    exported = np.load(export_slots_run(run_dir, split="train", out=tmp_path / "export.npz"))
    out = infer_run(run_dir, data / "clip01", out=tmp_path / "one")
    got = np.load(out / "slots.npz")
    assert [str(v) for v in got["video_ids"]] == ["clip01"]
    rows = _rows(exported, "clip01")
    assert got["slots"].shape == (FRAMES, SLOTS, 16)
    np.testing.assert_allclose(got["slots"], exported["slots"][rows], atol=1e-5)
    np.testing.assert_allclose(
        got["masks"].astype(np.float32), exported["masks"][rows].astype(np.float32), atol=2e-3
    )
    # the token labels too (both --track match, the default; near-ties at 1e-3 aside)
    assert (got["labels"] == exported["labels"][rows]).mean() >= 0.99
    meta = json.loads(str(got["meta"]))
    assert meta["restarts"] == 2 and meta["track"] == "match" and meta["num_frames"] == FRAMES

    gif = iio.imread(out / "clip01.gif", index=None)  # frame | its slot masks, per frame
    size = 16  # the store's frame size (extract_cfg: FRAME_SIZE=16)
    assert gif.shape[:4] == (FRAMES, size, 2 * size, 3)
    timeline = iio.imread(out / "clip01.timeline.png")
    assert timeline.ndim == 3 and timeline.shape[1] > FRAMES


def test_infer_on_a_folder_of_videos_matches_export_for_every_video(trained, tmp_path):
    run_dir, data = trained
    exported = np.load(export_slots_run(run_dir, split="train", out=tmp_path / "export.npz"))
    out = infer_run(run_dir, data, out=tmp_path / "all", export_format="zarr", overlay="none")
    import zarr

    got = zarr.open_group(str(out / "slots.zarr"), mode="r")
    ids = [str(v) for v in got["video_ids"][:]]
    assert sorted(ids) == [f"clip{v:02d}" for v in range(VIDEOS)]
    for vid in ids:
        np.testing.assert_allclose(
            got["slots"][_rows(got, vid)], exported["slots"][_rows(exported, vid)], atol=1e-5
        )
    assert not list(out.glob("*.gif")) and len(list(out.glob("*.timeline.png"))) == VIDEOS


def test_infer_track_match_renames_slots_only(trained, tmp_path):
    run_dir, data = trained
    plain = np.load(
        infer_run(run_dir, data / "clip00", out=tmp_path / "a", track="off") / "slots.npz"
    )
    tracked = np.load(infer_run(run_dir, data / "clip00", out=tmp_path / "b") / "slots.npz")
    for t in range(FRAMES):  # the same slots per frame, possibly in another order
        a, b = plain["slots"][t], tracked["slots"][t]
        order = [int(np.abs(a - row).sum(1).argmin()) for row in b]
        assert sorted(order) == list(range(SLOTS))
        np.testing.assert_allclose(a[order], b, atol=1e-6)


def test_infer_reruns_at_once_and_refuses_other_settings(trained, tmp_path, monkeypatch):
    run_dir, data = trained
    out = infer_run(run_dir, data / "clip00", out=tmp_path / "r", overlay="none")
    from egoslots.stages import infer as infer_module

    monkeypatch.setattr(infer_module, "_infer_one", lambda *a, **k: pytest.fail("recomputed"))
    assert infer_run(run_dir, data / "clip00", out=out, overlay="none") == out
    with pytest.raises(StageError, match="--overwrite"):
        infer_run(run_dir, data / "clip00", out=out, overlay="none", restarts=5)


def test_infer_on_real_footage_writes_an_mp4_overlay(trained, tmp_path):
    """carphone (176x144 H.264) sampled at 5 fps: decoded, cropped and encoded like a store."""
    run_dir, _ = trained
    out = infer_run(run_dir, clip_path("carphone"), out=tmp_path / "real", fps=5.0, overlay="mp4")
    got = np.load(out / "slots.npz")
    assert 15 <= got["slots"].shape[0] <= 25 and np.isfinite(got["slots"]).all()
    video = iio.imread(out / "carphone_pristine.mp4.mp4", index=None, plugin="pyav")
    assert video.shape[0] == got["slots"].shape[0] and video.shape[2] == 2 * video.shape[1]


def test_infer_bad_inputs_are_one_line(trained, tmp_path):
    from egoslots import cli

    run_dir, data = trained
    runner = CliRunner()
    for target, message in [
        (tmp_path / "nothing", "no such file or folder"),
        (data / "clip00" / "0000.png", "not a video file"),
    ]:
        result = runner.invoke(cli.main, ["infer", str(run_dir), str(target)])
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(cli.main, ["infer", str(run_dir), str(empty)])
    assert result.exit_code != 0 and "no video files" in result.output
    broken = tmp_path / "broken" / "bad.mp4"
    broken.parent.mkdir()
    broken.write_bytes(b"not a video")
    result = runner.invoke(cli.main, ["infer", str(run_dir), str(broken)])
    assert result.exit_code != 0 and "bad.mp4" in result.output and "Traceback" not in result.output


def test_cli_infer_on_a_video_file(trained, tmp_path):
    from egoslots import cli

    run_dir, _ = trained
    video = tmp_path / "clip.mp4"
    write_video(video, 5, size=(24, 32))
    result = CliRunner().invoke(
        cli.main, ["infer", str(run_dir), str(video), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "slots.npz").is_file() and (tmp_path / "o" / "clip.mp4.gif").is_file()
    slots = np.load(tmp_path / "o" / "slots.npz")["slots"]
    assert slots.shape[0] == 5 and torch.isfinite(torch.from_numpy(slots)).all()
