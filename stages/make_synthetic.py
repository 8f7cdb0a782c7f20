"""`egoslots make-synthetic OUT`: MOVi-like videos with ground-truth masks, written as a dataset.

The scenes (families ``tabletop``, ``room``, ``clutter``: ``--scene``) and their pictures come
from :mod:`egoslots.pipeline.data.synthetic` (pybullet); this module
writes them in the frame-folder format of ``docs/architecture.md``, and is the command line and
the stage entry point ``generate_dataset`` that ``egoslots run`` calls::

    OUT/dataset.json                     generator arguments and version
    OUT/video_0000/00000.png ...         RGB frames
    OUT/video_0000/masks/00000.png ...   uint8 label maps: 0 = background, objects 1..n
    OUT/video_0000/meta.json             fps, camera, light and per-object attributes

Each video is written into a hidden temporary folder and renamed when complete, so an
interrupted run leaves no half video, and running again only makes the missing ones. The same
arguments give the same bytes, in one process or several (``--workers``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import click
import numpy as np
from PIL import Image

from egoslots.cache.location import remove_orphans, write_text
from egoslots.pipeline.data.synthetic import (
    DEFAULT_FPS,
    DEFAULT_SCENE,
    GENERATOR_VERSION,
    PHYSICS_HZ,
    SCENES,
    Timings,
    object_range,
    render_video,
    sample_scene,
    video_meta,
    video_rng,
)
from egoslots.stages.machinery.common import StageError, setup_logging

log = logging.getLogger("egoslots")

PNG_COMPRESS_LEVEL = 1  # fixed, so the same pictures give the same bytes (and fast to write)
TEMP_PREFIX = ".partial-"  # hidden folders of videos being written; loaders skip dot-folders


def video_name(index: int) -> str:
    return f"video_{index:04d}"


def save_png(path: Path, image: np.ndarray) -> None:
    """PNG with fixed settings (no timestamps or optimisation), so equal pixels give equal bytes."""
    Image.fromarray(image).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def generate_video(
    out: Path | str,
    index: int,
    seed: int,
    frames: int,
    size: int,
    min_objects: int | None = None,
    max_objects: int | None = None,
    fps: float = DEFAULT_FPS,
    scene: str = DEFAULT_SCENE,
) -> Timings:
    """Make ``OUT/video_<index>`` (frames, masks, meta.json) unless it exists; returns timings.
    ``min_objects``/``max_objects`` None: the scene family's own range.

    The video is written to a hidden ``OUT/.partial-video_<index>-<pid>`` folder and renamed
    when complete, so the folder ``video_<index>`` is either whole or absent.
    """
    out = Path(out)
    final = out / video_name(index)
    timings = Timings()
    if final.is_dir():
        return timings
    rng = video_rng(seed, index)
    spec = sample_scene(rng, frames, fps, min_objects, max_objects, scene=scene)
    temp = out / f"{TEMP_PREFIX}{video_name(index)}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    (temp / "masks").mkdir(parents=True)
    try:
        positions, quaternions = [], []
        for t, (rgb, labels, pos, quat) in enumerate(
            render_video(spec, frames, size, fps, timings)
        ):
            start = time.perf_counter()
            save_png(temp / f"{t:05d}.png", rgb)
            save_png(temp / "masks" / f"{t:05d}.png", labels)
            timings.write += time.perf_counter() - start
            positions.append(pos)
            quaternions.append(quat)
        meta = video_meta(
            spec, index, seed, frames, size, fps, np.stack(positions, 1), np.stack(quaternions, 1)
        )
        (temp / "meta.json").write_text(to_json(meta))
        try:
            os.rename(temp, final)
        except OSError:
            if not final.is_dir():  # not a concurrent run that finished the same video first
                raise
            shutil.rmtree(temp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return timings


def to_json(obj) -> str:
    """Indented JSON with each innermost list of numbers on one line (a (T, 3) array = T lines)."""
    text = json.dumps(obj, indent=1)
    return (
        re.sub(
            r"\[\s*([-0-9.e,\s]+?)\s*\]",
            lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]",
            text,
        )
        + "\n"
    )


def dataset_args(
    videos: int,
    frames: int,
    size: int,
    seed: int,
    min_objects: int,
    max_objects: int,
    fps: float,
    scene: str = DEFAULT_SCENE,
) -> dict:
    return {
        "videos": videos,
        "frames": frames,
        "size": size,
        "seed": seed,
        "min_objects": min_objects,
        "max_objects": max_objects,
        "fps": fps,
        "scene": scene,
    }


def check_args(
    videos: int, frames: int, size: int, seed: int, min_objects: int, max_objects: int, fps: float
) -> None:
    if videos < 0 or frames < 1 or size < 8:
        raise ValueError(
            f"need videos >= 0, frames >= 1 and size >= 8 (got {videos}, {frames}, {size})"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (got {seed})")
    if not 1 <= min_objects <= max_objects <= 255:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects <= 255 (got {min_objects}, {max_objects})"
        )
    if not 0 < fps <= PHYSICS_HZ:
        raise ValueError(f"fps must be in (0, {PHYSICS_HZ:g}] (got {fps})")


def _write_dataset_json(out: Path, args: dict) -> None:
    """Record (or check) what the folder holds, so two settings never mix in one folder."""
    import pybullet as p

    path = out / "dataset.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{path}: unreadable ({err}); delete it or choose another folder"
            ) from err
        old_args = dict(old.get("args", {}))
        old_args.setdefault("scene", DEFAULT_SCENE)  # folders made before scene families
        if old.get("version") != GENERATOR_VERSION:
            raise ValueError(
                f"{path}: made by generator version {old.get('version')}, this is "
                f"{GENERATOR_VERSION}; choose another folder"
            )
        differs = {
            k: (old_args.get(k), v)
            for k, v in args.items()
            if k != "videos" and old_args.get(k) != v
        }
        if differs:
            detail = ", ".join(f"{k} {a} != {b}" for k, (a, b) in differs.items())
            raise ValueError(
                f"{path}: the folder holds videos made with other settings ({detail}); "
                f"choose another folder or delete it"
            )
        if args["videos"] < old_args.get("videos", 0):
            args = dict(args, videos=old_args["videos"])  # asking for fewer: keep what is there
    record = {
        "generator": "egoslots.synthetic",
        "version": GENERATOR_VERSION,
        "pybullet_api": p.getAPIVersion(),
        "args": args,
        "format": "frame-folder",
        "labels": "masks/*.png: uint8, 0 = background (ground, sky), 1..n = meta.json objects[].id",
    }
    text = to_json(record)
    if path.is_file() and path.read_text() == text:
        return  # a finished or resumed dataset: leave the file (and its mtime) alone
    write_text(path, text)


def generate_dataset(
    out: Path | str,
    videos: int,
    frames: int,
    size: int,
    seed: int,
    min_objects: int | None = None,
    max_objects: int | None = None,
    fps: float = DEFAULT_FPS,
    progress: bool = True,
    workers: int = 1,
    scene: str = DEFAULT_SCENE,
) -> Path:
    """Make ``videos`` synthetic videos of scene family ``scene`` in ``out`` (frame-folder
    format); returns ``out``. ``min_objects``/``max_objects`` None: the family's own range.

    Videos already there are kept, so an interrupted run resumes, and a finished one returns at
    once. Raises ValueError if ``out`` holds videos made with other settings.
    ``workers`` > 1 renders videos in that many processes (same bytes as one process).
    """
    from tqdm import tqdm

    min_objects, max_objects = object_range(scene, min_objects, max_objects)  # checks scene
    check_args(videos, frames, size, seed, min_objects, max_objects, fps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    args = dataset_args(videos, frames, size, seed, min_objects, max_objects, fps, scene)
    _write_dataset_json(out, args)
    remove_orphans(out.glob(f"{TEMP_PREFIX}*"))  # half-written videos of killed runs
    todo = [i for i in range(videos) if not (out / video_name(i)).is_dir()]
    if not todo:
        return out
    log.info("make-synthetic: %d of %d %s videos to make in %s", len(todo), videos, scene, out)
    total = Timings()
    bar = tqdm(total=len(todo) * frames, unit="frame", desc=f"{scene} videos", disable=not progress)
    job = dict(
        seed=seed,
        frames=frames,
        size=size,
        min_objects=min_objects,
        max_objects=max_objects,
        fps=fps,
        scene=scene,
    )
    try:
        if workers <= 1:
            for i in todo:
                total.add(generate_video(out, i, **job))
                bar.update(frames)
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                for timings in pool.map(_generate_one, [(out, i, job) for i in todo]):
                    total.add(timings)
                    bar.update(frames)
    finally:
        bar.close()
    if total.frames:
        log.info(
            "make-synthetic: %d frames in %.1f s (%.0f frames/s; physics %.0f%%, render %.0f%%, "
            "PNG %.0f%%)",
            total.frames,
            total.total,
            total.frames / max(total.total, 1e-9),
            *(100 * x / max(total.total, 1e-9) for x in (total.physics, total.render, total.write)),
        )
    return out


def _generate_one(task) -> Timings:
    out, index, job = task
    return generate_video(out, index, **job)


EXAMPLE = "egoslots make-synthetic data/synthetic --videos 24 --frames 24 --size 128 --seed 0"
ROOM_EXAMPLE = "egoslots make-synthetic data/rooms --scene room --videos 24 --frames 16"


@click.command(
    name="make-synthetic",
    epilog=f"\b\nExample:\n  {EXAMPLE}\n  {ROOM_EXAMPLE}\n  egoslots extract-features configs/base.yaml dataset.source=frames dataset.path=data/synthetic",
)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--videos", type=click.IntRange(min=0), default=24, show_default=True, help="Number of videos."
)
@click.option(
    "--frames", type=click.IntRange(min=1), default=24, show_default=True, help="Frames per video."
)
@click.option(
    "--size",
    type=click.IntRange(min=8),
    default=128,
    show_default=True,
    help="Frame side in pixels (square).",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**31 - 1),
    default=0,
    show_default=True,
    help="Same seed, same bytes.",
)
@click.option(
    "--scene",
    type=click.Choice(list(SCENES)),
    default=DEFAULT_SCENE,
    show_default=True,
    help="Scene family: tabletop (objects dropped on a floor), room (egocentric rooms with "
    "furniture, walking camera), clutter (heaps of objects hiding one another).",
)
@click.option(
    "--min-objects",
    type=click.IntRange(1, 255),
    default=None,
    help="Fewest objects per video [default: the scene's: tabletop 3, room 4, clutter 10].",
)
@click.option(
    "--max-objects",
    type=click.IntRange(1, 255),
    default=None,
    help="Most objects per video [default: the scene's: tabletop 10, room 8, clutter 20].",
)
@click.option(
    "--fps",
    type=click.FloatRange(min=0, min_open=True, max=1000),
    default=DEFAULT_FPS,
    show_default=True,
    help="Frame rate (physics runs at 240 Hz).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes rendering videos in parallel (output is the same).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def make_synthetic(
    out, videos, frames, size, seed, scene, min_objects, max_objects, fps, workers, quiet
):
    """Generate MOVi-like synthetic videos with masks into OUT (frame-folder format).

    Each video holds pybullet objects (cubes, spheres, ducks, mugs, ... and random blobs) with
    random colours, textures and sizes, in a scene family (--scene): tabletop (3-10 objects
    dropped and pushed onto a textured ground, filmed by a head-mounted camera), room (a room
    with textured walls and furniture, 4-8 small objects, a camera walking at head height) or
    clutter (10-20 objects heaped together, seen from low down). Writes
    OUT/video_0000/00000.png ..., masks/00000.png (uint8 labels, 0 = background) and meta.json
    (per-object mesh, colour, size, positions). Finished videos are kept: rerun the same
    command to resume an interrupted run.
    """
    setup_logging()
    lo, hi = object_range(scene, min_objects, max_objects)
    if lo > hi:
        raise click.BadParameter(
            f"--min-objects {lo} is more than --max-objects {hi} (scene {scene}); "
            "give both, with min <= max"
        )
    try:
        generate_dataset(
            out,
            videos=videos,
            frames=frames,
            size=size,
            seed=seed,
            min_objects=min_objects,
            max_objects=max_objects,
            fps=fps,
            progress=not quiet,
            workers=workers,
            scene=scene,
        )
    except (ValueError, OSError) as err:  # bad arguments, a folder of other settings, disk full
        raise StageError(str(err)) from err
    click.echo(f"{videos} {scene} videos in {out}")
