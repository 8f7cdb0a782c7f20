"""`egoslots inspect-data CONFIG`: what the configured dataset holds, before any stage runs.

Lists the video table (cheap: names, sizes, headers), reads the first frame of a few videos for
the frame size, and prints videos and frames per split, masks, object attributes, training clips
and skipped videos. ``--check`` decodes every frame once, which finds corrupt files up front.
"""

from __future__ import annotations

import statistics
from collections import Counter

import click
from tqdm import tqdm

from egoslots.pipeline.data import make_source
from egoslots.pipeline.data.base import SPLITS, SourceError
from egoslots.pipeline.data.clips import clip_starts, span
from egoslots.stages.machinery.common import config_command

SAMPLE_VIDEOS = 8  # videos whose first frame is decoded for the size summary


def summarize(cfg, skip_bad: bool = False, check: bool = False) -> dict:
    """The dataset summary as a dict (what the command prints)."""
    source = make_source(cfg, skip_bad=skip_bad)
    videos = source.videos()
    lengths = [v.num_frames for v in videos]
    per_split = {s: [v for v in videos if v.split == s] for s in SPLITS}
    step = max(1, len(videos) // SAMPLE_VIDEOS)
    sizes: Counter = Counter()
    for v in videos[::step][:SAMPLE_VIDEOS]:
        for frame in source.read_frames(v.video_id, 0, 1):
            sizes[f"{frame.rgb.shape[1]}x{frame.rgb.shape[0]}"] += 1
    objects = []
    attribute_names: set[str] = set()
    for v in videos[::step][:SAMPLE_VIDEOS]:
        attrs = source.attributes(v.video_id)
        if attrs and attrs.get("objects") is not None:
            objects.append(len(attrs["objects"]))
            for obj in attrs["objects"]:
                attribute_names.update(obj if isinstance(obj, dict) else ())
    bad_frames = []
    if check:
        bad_frames = check_frames(source, videos, skip_bad)
    t, stride, fstep = (
        int(cfg.dataset.ep_length),
        int(cfg.dataset.clip_stride),
        int(cfg.dataset.frame_step),
    )
    train = per_split["train"]
    return {
        "source": str(cfg.dataset.source),
        "root": str(source.root),
        "videos": len(videos),
        "videos_per_split": {s: len(per_split[s]) for s in SPLITS},
        "frames": sum(lengths),
        "frames_per_split": {s: sum(v.num_frames for v in per_split[s]) for s in SPLITS},
        "frames_per_video": (min(lengths), statistics.median(lengths), max(lengths)),
        "fps": sorted({v.fps for v in videos if v.fps is not None}),
        "frame_sizes": dict(sizes),
        "sampled_videos": sum(sizes.values()),
        "masks": bool(source.has_masks),
        "objects_per_video": (min(objects), max(objects)) if objects else None,
        "object_attributes": sorted(attribute_names),
        "train_clips": sum(len(clip_starts(v.num_frames, t, stride, fstep)) for v in train),
        "clip": (t, stride, fstep, span(t, fstep)),
        "too_short_for_a_clip": sum(v.num_frames < span(t, fstep) for v in train),
        "skipped": list(getattr(source, "skipped", [])),
        "bad_frames": bad_frames,
    }


def check_frames(source, videos, skip_bad: bool) -> list[tuple[str, str]]:
    """Decode every frame; the first error per video is returned (skip-bad) or raised."""
    bad = []
    with tqdm(total=sum(v.num_frames for v in videos), desc="checking frames", unit="frame") as bar:
        for v in videos:
            done = 0
            try:
                for _ in source.read_frames(v.video_id):
                    done += 1
                    bar.update()
            except SourceError as err:
                if not skip_bad:
                    raise
                bad.append((v.video_id, str(err)))
                bar.update(v.num_frames - done)
    return bad


def format_summary(s: dict) -> str:
    def split_line(counts: dict) -> str:
        return ", ".join(f"{name} {counts[name]:,}" for name in SPLITS)

    lo, med, hi = s["frames_per_video"]
    lines = [
        f"source        {s['source']}  ({s['root']})",
        f"videos        {s['videos']:,}  ({split_line(s['videos_per_split'])})",
        f"frames        {s['frames']:,}  ({split_line(s['frames_per_split'])})",
        f"per video     min {lo:,} / median {med:g} / max {hi:,} frames",
    ]
    if s["fps"]:
        lines.append(f"fps           {', '.join(f'{f:g}' for f in s['fps'][:5])}")
    sizes = ", ".join(f"{k} ({n})" for k, n in s["frame_sizes"].items())
    lines.append(f"frame size    {sizes}  (first frame of {s['sampled_videos']} video(s))")
    lines.append(f"masks         {'yes' if s['masks'] else 'no'}")
    if s["objects_per_video"]:
        lo_o, hi_o = s["objects_per_video"]
        lines.append(
            f"objects       {lo_o}-{hi_o} per video; attributes: {', '.join(s['object_attributes'])}"
        )
    t, stride, fstep, length = s["clip"]
    lines.append(
        f"train clips   {s['train_clips']:,}  (T={t}, stride {stride}, frame step {fstep}; "
        f"{s['too_short_for_a_clip']} train video(s) shorter than {length} frames)"
    )
    lines.append(f"skipped       {len(s['skipped'])} bad video(s)")
    for vid, why in s["skipped"][:10]:
        lines.append(f"  {vid}: {why}")
    if s["bad_frames"]:
        lines.append(
            f"bad frames    {len(s['bad_frames'])} video(s) with frames that do not decode"
        )
        for vid, why in s["bad_frames"][:10]:
            lines.append(f"  {vid}: {why}")
    return "\n".join(lines)


@config_command(
    "inspect-data", example="egoslots inspect-data configs/demo.yaml dataset.max_videos=10"
)
@click.option(
    "--skip-bad", is_flag=True, help="Skip bad videos (counted and listed) instead of stopping."
)
@click.option(
    "--check", is_flag=True, help="Decode every frame to find corrupt files (slow on big datasets)."
)
def inspect_data(cfg, skip_bad: bool = False, check: bool = False):
    """Summarise the dataset a config names: videos and frames per split, frame size, masks,
    object attributes, training clips and skipped videos. Reads no more than headers and a few
    frames unless --check is given."""
    click.echo(format_summary(summarize(cfg, skip_bad=skip_bad, check=check)))
