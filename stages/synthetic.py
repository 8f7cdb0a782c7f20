"""`egoslots make-synthetic OUT`: MOVi-like videos with ground-truth masks, made with pybullet.

The generator itself lives in :mod:`pipeline.data.synthetic`; this module is its command line
and the stage entry point ``generate_dataset`` that ``egoslots run`` calls.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.data.synthetic import DEFAULT_FPS, generate_dataset
from stages.common import StageError, setup_logging

__all__ = ["generate_dataset", "make_synthetic"]

EXAMPLE = "egoslots make-synthetic data/synthetic --videos 24 --frames 24 --size 128 --seed 0"


@click.command(
    name="make-synthetic",
    epilog=f"\b\nExample:\n  {EXAMPLE}\n  egoslots extract-features configs/base.yaml dataset.source=frames dataset.path=data/synthetic",
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
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--min-objects", type=click.IntRange(1, 255), default=3, show_default=True)
@click.option("--max-objects", type=click.IntRange(1, 255), default=10, show_default=True)
@click.option(
    "--fps",
    type=float,
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
def make_synthetic(out, videos, frames, size, seed, min_objects, max_objects, fps, workers, quiet):
    """Generate MOVi-like synthetic videos with masks into OUT (frame-folder format).

    Each video holds 3-10 pybullet objects (cubes, spheres, ducks, mugs, ... and random blobs)
    with random colours, textures and sizes, dropped and pushed onto a textured ground and
    filmed by a moving head-mounted camera: OUT/video_0000/00000.png ..., masks/00000.png
    (uint8 labels, 0 = background) and meta.json (per-object mesh, colour, size, positions).
    Finished videos are kept: rerun the same command to resume an interrupted run.
    """
    setup_logging()
    if min_objects > max_objects:
        raise click.BadParameter(
            f"--min-objects {min_objects} is more than --max-objects {max_objects}"
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
        )
    except (ValueError, OSError) as err:  # bad arguments, a folder of other settings, disk full
        raise StageError(str(err)) from err
    click.echo(f"{videos} videos in {out}")
