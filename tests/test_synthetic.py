"""The synthetic generator: determinism, masks that agree with the pictures, meta.json, resume."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from egoslots.pipeline.data import synthetic
from egoslots.pipeline.data.synthetic import Simulation, sample_scene, video_rng
from egoslots.stages import make_synthetic as writer
from egoslots.stages.make_synthetic import generate_dataset, generate_video

REPO = Path(__file__).resolve().parents[1]
TINY = dict(videos=2, frames=4, size=32, seed=3, progress=False)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = tree_bytes(generate_dataset(tmp_path / "a", **TINY))
    b = tree_bytes(generate_dataset(tmp_path / "b", **TINY))
    c = tree_bytes(generate_dataset(tmp_path / "c", **dict(TINY, seed=4)))
    assert a == b
    assert sorted(a) == sorted(c)
    frames_a = {k: v for k, v in a.items() if k.endswith(".png")}
    assert all(frames_a[k] != c[k] for k in frames_a if "/masks/" not in k), (
        "another seed gave the same frame"
    )


def test_one_video_alone_equals_it_inside_a_dataset(tmp_path):
    """A video depends only on (seed, index), so resuming or parallel workers give the same bytes."""
    generate_dataset(tmp_path / "all", **TINY)
    generate_video(tmp_path / "one", 1, seed=TINY["seed"], frames=TINY["frames"], size=TINY["size"])
    assert tree_bytes(tmp_path / "one" / "video_0001") == tree_bytes(
        tmp_path / "all" / "video_0001"
    )


def test_finished_dataset_is_left_alone_and_can_be_extended(tmp_path):
    out = generate_dataset(tmp_path / "d", **TINY)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    generate_dataset(out, **TINY)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    generate_dataset(out, **dict(TINY, videos=3))
    assert json.loads((out / "dataset.json").read_text())["args"]["videos"] == 3
    assert sorted(p.name for p in out.glob("video_*")) == ["video_0000", "video_0001", "video_0002"]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name != "dataset.json")


def test_worker_processes_give_the_same_bytes(tmp_path):
    one = tree_bytes(generate_dataset(tmp_path / "one", **TINY))
    two = tree_bytes(generate_dataset(tmp_path / "two", **TINY, workers=2))
    assert one == two


def test_frame_folder_layout_and_meta(tmp_path):
    out = generate_dataset(
        tmp_path / "d",
        videos=2,
        frames=5,
        size=48,
        seed=0,
        min_objects=4,
        max_objects=6,
        progress=False,
    )
    info = json.loads((out / "dataset.json").read_text())
    assert (
        info["args"]["videos"] == 2
        and info["args"]["frames"] == 5
        and info["version"] == synthetic.GENERATOR_VERSION
    )
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "video_0000", "video_0001"]
    for video in ["video_0000", "video_0001"]:
        folder = out / video
        assert sorted(p.name for p in folder.glob("*.png")) == [f"{t:05d}.png" for t in range(5)]
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["fps"] > 0 and meta["num_frames"] == 5
        objects = meta["objects"]
        assert 4 <= len(objects) <= 6
        assert [o["id"] for o in objects] == list(range(1, len(objects) + 1))
        for o in objects:
            assert (
                isinstance(o["mesh"]["name"], str) and 0 <= o["mesh"]["id"] < synthetic.num_meshes()
            )
            assert len(o["color"]) == 3 and all(0.0 <= c <= 1.0 for c in o["color"])
            assert o["size"] > 0
            assert np.asarray(o["positions"]).shape == (5, 3)
            assert np.asarray(o["quaternions"]).shape == (5, 4)
        assert np.asarray(meta["camera"]["eye"]).shape == (5, 3)
        for t in range(5):
            frame = Image.open(folder / f"{t:05d}.png")
            mask = Image.open(folder / "masks" / f"{t:05d}.png")
            assert frame.mode == "RGB" and frame.size == (48, 48)
            assert mask.mode == "L" and mask.size == (48, 48)
            labels = np.asarray(mask)
            assert labels.dtype == np.uint8
            assert 0 in labels, "the ground is background"
            assert set(np.unique(labels)) <= set(range(len(objects) + 1))


def test_every_masked_object_is_really_there():
    """Hiding object k must change (nearly) every pixel its mask claims: masks and renders agree,
    and labels map to the right bodies."""
    rng = video_rng(11, 0)
    spec = sample_scene(rng, frames=6, min_objects=6, max_objects=8)
    checked = 0
    with Simulation(spec, size=64) as sim:
        for t in range(6):
            if t:
                sim.step(t)
            if t not in (0, 5):
                continue
            rgb, labels = sim.render(t)
            assert labels.dtype == np.uint8 and labels.shape == (64, 64)
            positions, quaternions = sim.poses()
            for k in np.unique(labels[labels > 0]):
                sim.hide(int(k))
                rgb_without, labels_without = sim.render(t)
                sim.p.resetBasePositionAndOrientation(
                    sim.bodies[k - 1],
                    positions[k - 1].tolist(),
                    quaternions[k - 1].tolist(),
                    physicsClientId=sim.client,
                )
                claimed = labels == k
                changed = np.any(rgb != rgb_without, axis=-1)
                assert not np.any(labels_without == k)
                assert changed[claimed].mean() > 0.9, (
                    f"object {k}: its mask covers pixels it does not draw"
                )
                # labels change only where object k was (what it hid shows through there)
                assert np.array_equal(labels_without[~claimed], labels[~claimed])
                checked += 1
            # and putting everything back gives the same picture
            rgb_again, labels_again = sim.render(t)
            assert np.array_equal(rgb_again, rgb) and np.array_equal(labels_again, labels)
    assert checked >= 4


def test_meta_positions_project_into_their_masks(tmp_path):
    """The object listed as id k in meta.json is the one labelled k: its 3-D centre, projected
    with the recorded camera, lands on (or next to) the pixels labelled k."""
    import pybullet as p

    size = 64
    generate_dataset(tmp_path, videos=2, frames=6, size=size, seed=1, progress=False)
    hits = total = 0
    for video in ["video_0000", "video_0001"]:
        meta = json.loads((tmp_path / video / "meta.json").read_text())
        cam = meta["camera"]
        proj = np.array(p.computeProjectionMatrixFOV(cam["fov"], 1.0, 0.05, 30.0)).reshape(4, 4).T
        for t in range(6):
            labels = np.asarray(Image.open(tmp_path / video / "masks" / f"{t:05d}.png"))
            view = (
                np.array(p.computeViewMatrix(cam["eye"][t], cam["target"][t], cam["up"][t]))
                .reshape(4, 4)
                .T
            )
            for obj in meta["objects"]:
                rows, cols = np.nonzero(labels == obj["id"])
                if len(rows) < 12:
                    continue
                clip = proj @ view @ np.append(obj["positions"][t], 1.0)
                col = (clip[0] / clip[3] + 1) / 2 * size
                row = (1 - clip[1] / clip[3]) / 2 * size
                total += 1
                hits += (
                    rows.min() - 2 <= row <= rows.max() + 3
                    and cols.min() - 2 <= col <= cols.max() + 3
                )
    assert total >= 10
    assert hits / total > 0.85, f"only {hits}/{total} objects project into their own mask"


def test_interrupted_run_leaves_no_partial_video_and_resumes(tmp_path, monkeypatch):
    reference = tree_bytes(generate_dataset(tmp_path / "ref", **TINY))
    calls = {"n": 0}
    real_save = writer.save_png

    def disk_fills_up(path, image):
        calls["n"] += 1
        if calls["n"] == 2 * TINY["frames"] + 3:  # in the middle of the second video
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, image)

    monkeypatch.setattr(writer, "save_png", disk_fills_up)
    out = tmp_path / "out"
    with pytest.raises(OSError) as err:
        generate_dataset(out, **TINY)
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "video_0000"]  # no half video
    monkeypatch.setattr(writer, "save_png", real_save)
    generate_dataset(out, **TINY)
    assert tree_bytes(out) == reference


def test_killed_process_resumes_from_finished_videos(tmp_path):
    """SIGKILL the real command mid-run: the rerun removes its half video and completes the rest."""
    out = tmp_path / "out"
    args = ["--videos", "40", "--frames", "6", "--size", "32", "--seed", "2", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "cli.py", "make-synthetic", str(out), *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not (out / "video_0001").is_dir() and time.time() < deadline:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = sorted(p.name for p in out.glob("video_*"))
    assert "video_0001" in finished and len(finished) < 40
    for name in finished:
        assert len(list((out / name).glob("*.png"))) == 6 and (out / name / "meta.json").is_file()
    # A rerun with a smaller count still honours the folder's settings and cleans up.
    result = CliRunner().invoke(
        _cli(), ["make-synthetic", str(out), *args[:1], str(len(finished) + 1), *args[2:]]
    )
    assert result.exit_code == 0, result.output
    assert not list(out.glob(f"{writer.TEMP_PREFIX}*")), "a killed run's half video was left behind"
    last = f"video_{len(finished):04d}"
    generate_video(tmp_path / "ref", len(finished), seed=2, frames=6, size=32)
    assert tree_bytes(out / last) == tree_bytes(tmp_path / "ref" / last)


def test_cli_refuses_to_mix_settings_in_one_folder(tmp_path):
    runner = CliRunner()
    first = runner.invoke(
        _cli(),
        [
            "make-synthetic",
            str(tmp_path),
            "--videos",
            "1",
            "--frames",
            "2",
            "--size",
            "32",
            "--quiet",
        ],
    )
    assert first.exit_code == 0, first.output
    again = runner.invoke(
        _cli(),
        [
            "make-synthetic",
            str(tmp_path),
            "--videos",
            "1",
            "--frames",
            "3",
            "--size",
            "32",
            "--quiet",
        ],
    )
    assert again.exit_code != 0
    assert "frames 2 != 3" in again.output and "dataset.json" in again.output
    assert (
        len(list((tmp_path / "video_0000").glob("*.png"))) == 2
    )  # nothing already written was touched


def test_the_frame_folder_loader_reads_what_it_wrote(tmp_path):
    """End to end through the loader users' data goes through (dataset.source=synthetic)."""
    from egoslots.pipeline.config import load_config
    from egoslots.pipeline.data import make_source

    out = generate_dataset(
        tmp_path / "synthetic", videos=3, frames=4, size=32, seed=0, progress=False
    )
    (out / f"{writer.TEMP_PREFIX}video_0003-1").mkdir()  # as if another run were writing one
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"dataset.path={out}"])
    source = make_source(cfg)
    assert [v.video_id for v in source.videos()] == ["video_0000", "video_0001", "video_0002"]
    assert source.has_masks and all(
        v.num_frames == 4 and v.fps == synthetic.DEFAULT_FPS for v in source.videos()
    )
    for frame in source.read_frames("video_0001"):
        png = out / "video_0001" / f"{frame.index:05d}.png"
        assert np.array_equal(frame.rgb, np.asarray(Image.open(png)))
        assert np.array_equal(frame.mask, np.asarray(Image.open(png.parent / "masks" / png.name)))
    meta = source.attributes("video_0001")
    assert meta["objects"] == json.loads((out / "video_0001" / "meta.json").read_text())["objects"]


def _cli():
    from egoslots.cli import main

    return main
