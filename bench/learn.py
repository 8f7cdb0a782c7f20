"""Does stage 3 learn objects? FG-ARI / mBO against training steps on synthetic videos.

    python bench/learn.py                        # short: 24 videos, 600 steps, every 150
    python bench/learn.py --videos 64 --steps 5000 --every 500

Builds a feature store from pybullet MOVi-like videos (pipeline/data/synthetic) with the
parameter-free patch-pixels encoder (no weights), trains the slot model through
``egoslots.stages.train_slots.train`` (SlotContrast losses, no STEVE decoder: there is no dVAE here),
and scores every checkpoint on the test split with the evaluate stage's metrics, beside its
grid and k-means baselines (the same videos, the same metric code).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egoslots.cache.store import FeatureStore, VideoRecord  # noqa: E402
from egoslots.pipeline.backbones import PatchPixels  # noqa: E402
from egoslots.pipeline.config import load_config  # noqa: E402


def synthetic_store(
    path: Path, videos: int, frames: int, size: int, patch: int, seed: int
) -> FeatureStore:
    """Render videos and write frames, masks and patch-pixel features into one store."""
    from egoslots.pipeline.data import synthetic as syn

    encoder = PatchPixels(size, patch)
    splits = ["test" if i % 5 == 0 else "val" if i % 5 == 1 else "train" for i in range(videos)]
    records = [VideoRecord(f"video{i:03d}", i * frames, frames, splits[i]) for i in range(videos)]
    grid = encoder.grid
    store = FeatureStore.create(
        path,
        fingerprint="learn",
        videos=records,
        num_tokens=encoder.num_tokens,
        feature_dim=encoder.feature_dim,
        grid=grid,
        frame_size=size,
        feature_dtype="float16",
        has_masks=True,
        chunk_len=frames,
    )
    for i in range(videos):
        rng = syn.video_rng(seed, i)
        spec = syn.sample_scene(rng, frames, min_objects=3, max_objects=5)
        rgb, labels = zip(*[(r, m) for r, m, _, _ in syn.render_video(spec, frames, size)])
        rgb = np.stack(rgb).astype(np.uint8)
        with torch.no_grad():
            feats = encoder(torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0).numpy()
        arrays = store.encode_features(feats)
        arrays["frames"] = rgb
        arrays["masks"] = np.stack(labels).astype(np.uint8)
        store.write_chunk(i, arrays)
        print(f"\r  rendered {i + 1}/{videos} videos", end="", flush=True)
    print()
    store.mark_complete_if_done()
    return FeatureStore.open(path)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=150)
    ap.add_argument("--slots", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--work", type=Path, default=None, help="keep the store and run here (default: a temp dir)"
    )
    args = ap.parse_args()

    from egoslots.stages.evaluate import evaluate_model, summarize_scores
    from egoslots.stages.machinery.inference import load_trained
    from egoslots.stages.train_slots import train

    with tempfile.TemporaryDirectory() as d:
        work = args.work or Path(d)
        store_path = work / "stores" / "learn.zarr"
        t0 = time.perf_counter()
        if not store_path.exists():
            print(
                f"# rendering {args.videos} synthetic videos x {args.frames} frames at {args.size} px"
            )
            synthetic_store(store_path, args.videos, args.frames, args.size, args.patch, args.seed)
        print(f"  store ready ({time.perf_counter() - t0:.0f} s)")
        cfg = load_config(
            Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
            [
                f"work_dir={work}",
                "store=learn",
                "run_name=learn",
                f"seed={args.seed}",
                f"globals.NUM_SLOTS={args.slots}",
                "globals.USE_STEVE_DECODER=false",
                "globals.USE_DVAE=false",
                "dataset.num_workers=1",
                f"trainer.max_steps={args.steps}",
                f"trainer.ckpt_every={args.every}",
                f"trainer.val_every={args.every}",
                f"trainer.image_every={args.every}",
                "trainer.log_every=25",
                f"optimizer.warmup_steps={max(1, args.steps // 10)}",
            ],
        )
        t0 = time.perf_counter()
        run = train(cfg)
        train_s = time.perf_counter() - t0
        print(
            f"  trained {args.steps} steps in {train_s:.0f} s ({args.steps / train_s:.2f} steps/s)"
        )

        rows = []
        store = FeatureStore.open(store_path)
        baseline_names = ("grid", "kmeans_frame", "kmeans_video")
        summary = {}
        for step in range(args.every, args.steps + 1, args.every):
            model, rcfg, _, tokens = load_trained(run, step)
            scored = evaluate_model(model, rcfg, store, tokens, "test", seed=args.seed)
            summary = summarize_scores(scored["per_video"])
            rows.append((step, {k: v for k, v in summary.items() if k not in baseline_names}))
        methods = list(rows[0][1]) if rows else []
        print("\n| step | " + " | ".join(f"{m} FG-ARI | {m} mBO" for m in methods) + " |")
        print("|---|" + "---|---|" * len(methods))
        for step, s in rows:
            print(
                f"| {step} | "
                + " | ".join(
                    f"{100 * s[m]['video_fg_ari']['mean']:.1f} | {100 * s[m]['video_mbo']['mean']:.1f}"
                    for m in methods
                )
                + " |"
            )
        print("\n| baseline | video FG-ARI | video mBO |\n|---|---|---|")
        for name in baseline_names:
            if name in summary:
                s = summary[name]
                print(
                    f"| {name} | {100 * s['video_fg_ari']['mean']:.1f} | {100 * s['video_mbo']['mean']:.1f} |"
                )
        print(f"\n(test split: {len(store.videos_in('test'))} videos; TensorBoard: {run / 'tb'})")


if __name__ == "__main__":
    main()
