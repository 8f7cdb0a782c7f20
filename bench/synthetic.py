"""Speed of the synthetic generator, and the picture in docs/synthetic.png.

    python bench/synthetic.py                      # frames/s at 64 and 128 px, with the time split
    python bench/synthetic.py --videos 8 --frames 24 --sizes 128
    python bench/synthetic.py --scenes tabletop room clutter --videos 4 --frames 16 --sizes 128
    python bench/synthetic.py --picture docs/synthetic.png   # one row per scene family

Frames/s counts everything a user waits for (scene setup, physics, rendering, PNG writing) in
one process (pybullet's TinyRenderer is single-threaded, so one core). It is printed per second
of wall time and per second of this process's CPU time: on a shared machine the second is the
figure one free core would give.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egoslots.pipeline.data.synthetic import SCENES, Timings  # noqa: E402
from egoslots.stages.make_synthetic import generate_video  # noqa: E402


def bench(size: int, videos: int, frames: int, seed: int, scene: str = "tabletop") -> None:
    total = Timings()
    with tempfile.TemporaryDirectory() as out:
        start, start_cpu = time.perf_counter(), time.process_time()
        for i in range(videos):
            total.add(generate_video(out, i, seed=seed, frames=frames, size=size, scene=scene))
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    split = ", ".join(
        f"{k} {100 * getattr(total, k) / total.total:.0f}% ({1000 * getattr(total, k) / total.frames:.1f} ms)"
        for k in ("setup", "physics", "render", "write")
    )
    print(
        f"{scene:8s} {size:4d} px: {total.frames / wall:6.1f} frames/s wall, {total.frames / cpu:6.1f} frames/s of CPU time, "
        f"{cpu / videos:.2f} s of CPU per video "
        f"({videos} videos x {frames} frames in {wall:.1f} s; per frame: {split})"
    )


def picture(
    path: Path,
    size: int,
    seed: int,
    scenes=tuple(SCENES),
    frames: int = 16,
    shown: int = 4,
    videos: int = 2,
) -> None:
    """``videos`` rows per scene family (its videos 0, 1, ... of ``seed``): ``shown`` frames,
    each beside its mask, colour-coded per label (black = background)."""
    palette = np.array(
        [[0, 0, 0]] + [[int(255 * c) for c in _hue(k)] for k in range(1, 256)], dtype=np.uint8
    )
    steps = np.linspace(0, frames - 1, shown).round().astype(int)
    gap = 4
    sheet = Image.new(
        "RGB",
        (shown * (2 * size + gap) + gap * (shown - 1), len(scenes) * videos * (size + gap) - gap),
        "white",
    )
    with tempfile.TemporaryDirectory() as out:
        for row, (scene, video) in enumerate((s, v) for s in scenes for v in range(videos)):
            folder = Path(out) / scene
            generate_video(folder, video, seed=seed, frames=frames, size=size, scene=scene)
            folder = folder / f"video_{video:04d}"
            for j, t in enumerate(steps):
                frame = Image.open(folder / f"{t:05d}.png").convert("RGB")
                labels = np.asarray(Image.open(folder / "masks" / f"{t:05d}.png"))
                x = j * (2 * size + 2 * gap)
                sheet.paste(frame, (x, row * (size + gap)))
                sheet.paste(Image.fromarray(palette[labels]), (x + size, row * (size + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    print(
        f"wrote {path} ({videos} rows each: {', '.join(scenes)}; seed {seed}, "
        f"frames {steps.tolist()}, each frame beside its mask)"
    )


def _hue(k: int) -> tuple[float, float, float]:
    import colorsys

    return colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.75, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes", nargs="+", choices=list(SCENES), default=["tabletop"])
    parser.add_argument(
        "--picture", type=Path, help="write the frames-and-masks picture here instead"
    )
    parser.add_argument("--picture-size", type=int, default=128)
    parser.add_argument("--picture-videos", type=int, default=2, help="rows per scene family")
    args = parser.parse_args()
    if args.picture:
        picture(args.picture, args.picture_size, args.seed, videos=args.picture_videos)
        return
    for scene in args.scenes:
        for size in args.sizes:
            bench(size, args.videos, args.frames, args.seed, scene)


if __name__ == "__main__":
    main()
