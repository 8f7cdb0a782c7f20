"""The synthetic generator: determinism, masks that agree with the pictures, meta.json, resume."""

from __future__ import annotations

import errno
import hashlib
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


@pytest.mark.parametrize(
    "scene, seed, objects",
    [("tabletop", 11, (6, 8)), ("room", 2, (6, 8)), ("clutter", 4, (10, 14))],
)
def test_every_masked_object_is_really_there(scene, seed, objects):
    """Hiding object k must change (nearly) every pixel its mask claims: masks and renders agree,
    and labels map to the right bodies, in every scene family."""
    rng = video_rng(seed, 0)
    spec = sample_scene(rng, frames=6, min_objects=objects[0], max_objects=objects[1], scene=scene)
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


@pytest.mark.parametrize("scene", ["tabletop", "room", "clutter"])
def test_meta_positions_project_into_their_masks(tmp_path, scene):
    """The object listed as id k in meta.json is the one labelled k: its 3-D centre, projected
    with the recorded camera, lands on (or next to) the pixels labelled k."""
    import pybullet as p

    size = 64
    generate_dataset(tmp_path, videos=2, frames=6, size=size, seed=1, progress=False, scene=scene)
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


# ---------------------------------------------------------------------------------------------
# Scene families


def video_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# sha256 of whole video folders (frames, masks, meta.json) made by the generator *before* scene
# families existed (main at c154e0e), with this pybullet build on this kind of machine.
TABLETOP_DIGESTS = {
    (0, 5, 5, 32): "b332a99ba099e8ac196d60c73a6eb8822ff07a9241f257dc49ec78729ec25518",
    (3, 1234, 3, 48): "3138c7ea8431aba9f1dc9656b4d21936bf8dd9d44d4ccbf44154f91654af6e09",
}


def test_default_scene_still_makes_the_same_videos(tmp_path):
    """Adding scene families changed no byte of the tabletop videos: existing configs, the demo
    and datasets resumed with this version get what they got before."""
    for (index, seed, frames, size), expected in TABLETOP_DIGESTS.items():
        generate_video(tmp_path / "default", index, seed=seed, frames=frames, size=size)
        generate_video(
            tmp_path / "named", index, seed=seed, frames=frames, size=size, scene="tabletop"
        )
        name = f"video_{index:04d}"
        assert video_digest(tmp_path / "default" / name) == expected
        assert video_digest(tmp_path / "named" / name) == expected


@pytest.mark.parametrize("scene", ["room", "clutter"])
def test_scene_family_writes_masks_and_object_attributes(tmp_path, scene):
    frames, size = 4, 48
    out = generate_dataset(
        tmp_path / scene, videos=2, frames=frames, size=size, seed=0, progress=False, scene=scene
    )
    info = json.loads((out / "dataset.json").read_text())
    lo, hi = synthetic.object_range(scene)
    assert info["args"]["scene"] == scene
    assert (info["args"]["min_objects"], info["args"]["max_objects"]) == (lo, hi)
    seen = set()
    for video in ["video_0000", "video_0001"]:
        folder = out / video
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["scene"] == scene and meta["background"], "background geometry is listed"
        objects = meta["objects"]
        assert lo <= len(objects) <= hi
        assert [o["id"] for o in objects] == list(range(1, len(objects) + 1))
        for o in objects:
            assert {"id", "mesh", "color", "size", "positions"} <= set(o)
            assert np.asarray(o["positions"]).shape == (frames, 3)
            assert 0.05 < o["size"] < 0.5, "movable objects are small"
        for t in range(frames):
            frame = np.asarray(Image.open(folder / f"{t:05d}.png"))
            labels = np.asarray(Image.open(folder / "masks" / f"{t:05d}.png"))
            assert frame.shape == (size, size, 3) and labels.shape == (size, size)
            assert set(np.unique(labels)) <= set(range(len(objects) + 1))
            assert (labels == 0).mean() > 0.3, "floor, walls and furniture are background"
            seen |= set(np.unique(labels[labels > 0]).tolist())
    assert len(seen) >= 3


def test_scene_families_are_deterministic_and_differ():
    """Same seed, same pictures within a family; the families draw different scenes."""
    pictures = {}
    for scene in ["tabletop", "room", "clutter", "room"]:
        spec = sample_scene(video_rng(9, 0), frames=2, scene=scene)
        rgb = [r for r, _, _, _ in synthetic.render_video(spec, 2, 32)]
        if scene in pictures:
            assert all(np.array_equal(a, b) for a, b in zip(pictures[scene], rgb))
        pictures[scene] = rgb
    assert not np.array_equal(pictures["room"][0], pictures["tabletop"][0])
    assert not np.array_equal(pictures["clutter"][0], pictures["room"][0])


def test_room_background_is_label_zero_and_camera_walks_at_head_height():
    """Walls, floor and furniture draw pictures but never labels; the camera is at head height,
    turns its head and walks; and some objects get pushed while it moves."""
    moved = turned = 0
    for index in range(3):
        spec = sample_scene(video_rng(5, index), frames=12, scene="room")
        assert {s.name for s in spec.statics} >= {"wall"} and len(spec.statics) > 4
        eye, target = spec.camera.eye, spec.camera.target
        assert np.all((1.4 < eye[:, 2]) & (eye[:, 2] < 1.8))
        forward = target - eye
        yaw = np.unwrap(np.arctan2(forward[:, 1], forward[:, 0]))
        turned += np.ptp(yaw) > np.radians(5)
        assert np.all(forward[:, 2] < 0), "looking down at the floor"
        with Simulation(spec, size=32) as sim:
            start, _ = sim.poses()
            for t in range(1, 12):
                sim.step(t)
            end, _ = sim.poses()
            moved += int(np.sum(np.linalg.norm(end - start, axis=1) > 0.05))
            for label in range(1, len(spec.objects) + 1):
                sim.hide(label)
            rgb, labels = sim.render(0)
            assert not labels.any(), "only the movable objects are objects"
            assert rgb.reshape(-1, 3).std(axis=0).max() > 10, "the room itself is drawn"
    assert turned >= 2 and moved >= 1


def _occluded_fraction(scene: str, seeds, size: int = 48) -> tuple[int, int]:
    """(objects partly hidden by another object, objects visible) over frames 0 and 5: an
    object is partly hidden when rendering it alone shows >= 15% more of it."""
    hidden = visible = 0
    for seed in seeds:
        spec = sample_scene(video_rng(seed, 0), frames=6, scene=scene)
        with Simulation(spec, size=size) as sim:
            for t in range(6):
                if t:
                    sim.step(t)
                if t not in (0, 5):
                    continue
                _, labels = sim.render(t)
                positions, quaternions = sim.poses()
                for k in np.unique(labels[labels > 0]):
                    for other in range(1, len(spec.objects) + 1):
                        if other != k:
                            sim.hide(other)
                    _, alone = sim.render(t)
                    for j in range(len(spec.objects)):
                        sim.p.resetBasePositionAndOrientation(
                            sim.bodies[j],
                            positions[j].tolist(),
                            quaternions[j].tolist(),
                            physicsClientId=sim.client,
                        )
                    visible += 1
                    hidden += (alone == k).sum() >= 1.15 * (labels == k).sum()
    return hidden, visible


def test_clutter_hides_objects_behind_one_another():
    """Occlusion is the rule in clutter: more of its objects are partly hidden by others, and
    more objects are in view, than in tabletop scenes of the same seeds."""
    hidden_c, visible_c = _occluded_fraction("clutter", [0, 1])
    hidden_t, visible_t = _occluded_fraction("tabletop", [0, 1])
    assert visible_c > visible_t
    assert hidden_c / visible_c > 0.3
    assert hidden_c / visible_c > hidden_t / max(visible_t, 1) + 0.1


def test_cli_scene_option_and_folder_settings(tmp_path):
    runner = CliRunner()
    args = ["--videos", "1", "--frames", "2", "--size", "32", "--quiet"]
    made = runner.invoke(_cli(), ["make-synthetic", str(tmp_path / "r"), "--scene", "room", *args])
    assert made.exit_code == 0, made.output
    meta = json.loads((tmp_path / "r" / "video_0000" / "meta.json").read_text())
    assert meta["scene"] == "room" and 4 <= len(meta["objects"]) <= 8
    other = runner.invoke(
        _cli(), ["make-synthetic", str(tmp_path / "r"), "--scene", "clutter", *args]
    )
    assert other.exit_code != 0 and "scene room != clutter" in other.output
    bad = runner.invoke(_cli(), ["make-synthetic", str(tmp_path / "b"), "--scene", "kitchen"])
    assert bad.exit_code == 2 and "'kitchen' is not one of" in bad.output
    swapped = runner.invoke(
        _cli(),
        ["make-synthetic", str(tmp_path / "c"), "--scene", "clutter", "--max-objects", "5", *args],
    )
    assert swapped.exit_code != 0 and "--min-objects 10 is more than --max-objects 5" in (
        swapped.output
    )


def test_folder_made_before_scene_families_resumes_as_tabletop(tmp_path):
    out = generate_dataset(tmp_path / "d", **TINY)
    record = json.loads((out / "dataset.json").read_text())
    del record["args"]["scene"]  # what older versions wrote
    (out / "dataset.json").write_text(json.dumps(record))
    generate_dataset(out, **dict(TINY, videos=3))
    assert json.loads((out / "dataset.json").read_text())["args"]["scene"] == "tabletop"
    with pytest.raises(ValueError, match="scene tabletop != room"):
        generate_dataset(out, **dict(TINY, videos=3), scene="room")
    with pytest.raises(ValueError, match="unknown scene 'kitchen': choose one of tabletop, room"):
        generate_dataset(tmp_path / "k", **TINY, scene="kitchen")
    assert not (tmp_path / "k").exists(), "nothing is written for a bad name"


def test_config_key_picks_the_scene(tmp_path):
    """dataset.synthetic.scene reaches the generator through `egoslots run`'s data step, and a
    wrong name is refused naming the key."""
    from egoslots.pipeline.config import ConfigError, load_config
    from egoslots.stages.run import ensure_synthetic_data

    small = [
        "dataset.synthetic.videos=1",
        "dataset.synthetic.frames=2",
        "dataset.synthetic.size=32",
    ]
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [f"dataset.path={tmp_path}", "dataset.synthetic.scene=clutter", *small],
    )
    root = ensure_synthetic_data(cfg)
    assert json.loads((root / "video_0000" / "meta.json").read_text())["scene"] == "clutter"
    assert load_config(REPO / "configs" / "demo.yaml", []).dataset.synthetic.scene == "tabletop"
    with pytest.raises(ConfigError, match="dataset.synthetic.scene"):
        load_config(REPO / "configs" / "demo.yaml", ["dataset.synthetic.scene=kitchen"])


@pytest.mark.parametrize("scene", ["tabletop", "room", "clutter"])
def test_each_family_varies_its_look_from_video_to_video(scene):
    """Textures, light and object sets are drawn per video: six videos of one family do not
    share a floor, a light or a set of meshes."""
    specs = [sample_scene(video_rng(0, i), frames=2, scene=scene) for i in range(6)]
    assert len({s.ground_pattern for s in specs}) >= 2
    assert len({tuple(np.round(s.ground_colors[0], 3)) for s in specs}) == 6
    assert np.ptp([s.ambient for s in specs]) > 0.05 and np.ptp([s.diffuse for s in specs]) > 0.05
    assert len({tuple(np.round(s.light_direction, 3)) for s in specs}) == 6
    assert len({tuple(o.mesh_id for o in s.objects) for s in specs}) == 6
    sizes = [o.size for s in specs for o in s.objects]
    assert max(sizes) > 1.5 * min(sizes)
    assert len({len(s.objects) for s in specs}) >= 2
