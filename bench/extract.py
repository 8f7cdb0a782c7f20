"""Stage-1 benchmarks: extraction speed vs the bare backbone, bytes per frame, clip reading
speed vs `dd`, and peak memory as the dataset grows. Prints figures; records nothing.

    python bench/extract.py all                # everything (minutes on 2 CPU cores)
    python bench/extract.py extraction --frames 192 --size 224
    python bench/extract.py bytes
    python bench/extract.py read --frames 2048 --clips 300 --inner 1
    python bench/extract.py rss --videos 20

Figures go to docs/benchmarks.md ("## Stage 1: extraction") with the machine they ran on.
The ViT is timm's vit_small_patch14_dinov2 with random weights (no downloads): speed does
not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from egoslots.cache.location import size_bytes as directory_size  # noqa: E402
from egoslots.cache.reader import ClipDataset  # noqa: E402
from egoslots.cache.store import FeatureStore, VideoRecord  # noqa: E402
from egoslots.pipeline.backbones import FrozenEncoder  # noqa: E402
from egoslots.pipeline.config import load_config  # noqa: E402
from egoslots.pipeline.data.memory import InMemorySource  # noqa: E402


# ---------------------------------------------------------------------------- helpers
def TimmViT(
    name: str = "vit_small_patch14_dinov2", input_size: int = 224, **kwargs
) -> FrozenEncoder:
    """egoslots' ViT encoder around a randomly initialised timm ViT (no weights needed);
    ``kwargs`` go to timm (depth=..., embed_dim=... for a tiny one)."""
    import timm

    from egoslots.pipeline.backbones import ViTEncoder

    vit = timm.create_model(name, pretrained=False, img_size=input_size, num_classes=0, **kwargs)
    return ViTEncoder(vit, name).freeze()


def smooth_video(rng, frames: int, h: int, w: int) -> np.ndarray:
    """Camera-like frames: gradients, a few moving discs and mild noise (compress like real video)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 160 + 40
    discs = [
        (
            rng.uniform(0, w),
            rng.uniform(0, h),
            rng.uniform(h / 10, h / 4),
            rng.uniform(0, 255, 3),
            rng.normal(0, 2, 2),
        )
        for _ in range(4)
    ]
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        img = base.copy()
        for cx, cy, r, colour, v in discs:
            img[(xx - cx - v[0] * t) ** 2 + (yy - cy - v[1] * t) ** 2 < r * r] = colour
        out[t] = np.clip(img + rng.normal(0, 3, img.shape), 0, 255)
    return out


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} threads {torch.get_num_threads()}, "
        f"load avg {os.getloadavg()[0]:.1f}"
    )


def bench_cfg(work_dir: Path, *overrides: str):
    return load_config(REPO / "configs" / "demo.yaml", [f"work_dir={work_dir}", *overrides])


# ---------------------------------------------------------------------------- 1. extraction vs bare forward
def bench_extraction(args) -> tuple[float, float]:
    import egoslots.stages.extract_features as extract_stage
    from egoslots.pipeline.preprocess import preprocess_frame
    from egoslots.stages.extract_features import extract
    from egoslots.stages.machinery.runtime import extraction_compute, pick_device

    rng = np.random.default_rng(0)
    per_video = args.frames // args.videos
    videos = {
        f"v{i}": smooth_video(rng, per_video, args.height, args.width) for i in range(args.videos)
    }
    source = InMemorySource(videos)
    device = pick_device("auto")
    compute = extraction_compute("auto", device)
    vit = getattr(args, "vit", "vit_small_patch14_dinov2")
    encoder = TimmViT(vit, args.size, **getattr(args, "vit_kwargs", {})).to(device)
    extract_stage.build_backbone = lambda cfg: encoder  # extract() builds its backbone with this
    print(f"machine: {machine()}; device {device}, compute {compute}")
    print(
        f"{args.videos} videos x {per_video} frames of {args.height}x{args.width} -> {vit} at {args.size} px, "
        f"batch {args.batch}, chunk {args.chunk}, {args.workers} decode worker(s)"
    )

    # bare forward on already-preprocessed uint8 batches, same dtype handling as extraction
    images = torch.stack(
        [preprocess_frame(f, None, args.size, 128)[0] for v in videos.values() for f in v]
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute == "bf16")

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode(), autocast:
            for lo in range(0, len(images), args.batch):
                out = encoder(images[lo : lo + args.batch].to(device).float().div_(255.0))
                out.to(torch.float16).cpu()
        return len(images) / (time.perf_counter() - start)

    def full(i: int) -> float:
        work = Path(tempfile.mkdtemp(prefix="egoslots-bench-"))
        try:
            cfg = bench_cfg(
                work,
                f"globals.IMAGE_SIZE={args.size}",
                "globals.FRAME_SIZE=128",
                f"extract.batch_size={args.batch}",
                f"extract.frames_per_chunk={args.chunk}",
                f"extract.num_workers={args.workers}",
                f"run_name=bench{i}",
            )
            start = time.perf_counter()
            extract(cfg, source=source)
            return len(images) / (time.perf_counter() - start)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    bare()  # warm-up (allocator, kernels)
    rows = []
    for i in range(args.repeats):  # interleaved so drifting load hits both alike
        b, f = bare(), full(i)
        rows.append((b, f))
        print(
            f"  run {i}: bare forward {b:7.1f} frames/s   extract-features {f:7.1f} frames/s   ratio {f / b:.2f}"
        )
    b, f = np.median([r[0] for r in rows]), np.median([r[1] for r in rows])
    print(
        f"median: bare {b:.1f} frames/s, extraction {f:.1f} frames/s, ratio {f / b:.2f} (target >= 0.9)"
    )
    return float(b), float(f)


# ---------------------------------------------------------------------------- 2. bytes per frame
def bench_bytes(args) -> None:
    from egoslots.stages.machinery.extract_chunks import to_storage

    rng = np.random.default_rng(0)
    frames_n = args.frames
    encoder = TimmViT(input_size=224)
    video = smooth_video(rng, frames_n, 224, 224)
    with torch.inference_mode():
        feats = torch.cat(
            [
                encoder(torch.from_numpy(video[i : i + 16]).permute(0, 3, 1, 2).float() / 255)
                for i in range(0, frames_n, 16)
            ]
        )
    small = (
        torch.nn.functional.interpolate(
            torch.from_numpy(video).permute(0, 3, 1, 2).float(),
            size=128,
            mode="bilinear",
            antialias=True,
        )
        .round()
        .clamp(0, 255)
        .byte()
    )
    small = small.permute(0, 2, 3, 1).numpy()
    masks = (small[..., 0] > 128).astype(np.uint8) * 3
    print(f"machine: {machine()}")
    print(
        f"{frames_n} frames; ViT-S/14 (random init) features 256 x 384 at 224 px; frames 128x128x3; masks 128x128"
    )
    print(
        f"{'dtype':<9} {'compressor':<10} {'features B/frame':>17} {'frames B/frame':>15} {'masks B/frame':>14} "
        f"{'write MB/s':>11} {'read MB/s':>10}"
    )
    for dtype in ("float32", "float16", "bfloat16", "int8"):
        for comp in ("none", "zstd", "blosc"):
            root = Path(tempfile.mkdtemp(prefix="egoslots-bytes-"))
            try:
                store = FeatureStore.create(
                    root / "s.zarr",
                    fingerprint="bench",
                    videos=[VideoRecord("v", 0, frames_n, "train")],
                    num_tokens=256,
                    feature_dim=384,
                    grid=(16, 16),
                    frame_size=128,
                    feature_dtype=dtype,
                    has_masks=True,
                    chunk_len=64,
                    compressor=comp,
                    inner_chunk_len=1,
                )
                start, raw = time.perf_counter(), 0
                for c in range(-(-frames_n // 64)):
                    lo, hi = c * 64, min(c * 64 + 64, frames_n)
                    arrays = to_storage(feats[lo:hi], dtype, store)
                    arrays.update(frames=small[lo:hi], masks=masks[lo:hi])
                    raw += sum(a.nbytes for a in arrays.values())
                    store.write_chunk(c, arrays, durable=False)
                write = raw / (time.perf_counter() - start) / 1e6
                store.mark_complete_if_done()
                store = FeatureStore.open(root / "s.zarr")
                start = time.perf_counter()
                for name in ("features", "frames", "masks"):
                    for lo in range(0, frames_n, 4):  # as training reads: 4-frame clips
                        store.read_rows(name, lo, lo + 4)
                read = raw / (time.perf_counter() - start) / 1e6
                sizes = {
                    n: directory_size(root / "s.zarr" / n) / frames_n
                    for n in ("features", "frames", "masks")
                }
                if dtype == "int8":
                    sizes["features"] += (
                        directory_size(root / "s.zarr" / "features_scale") / frames_n
                    )
                print(
                    f"{dtype:<9} {comp:<10} {sizes['features']:17.0f} {sizes['frames']:15.0f} "
                    f"{sizes['masks']:14.0f} {write:11.0f} {read:10.0f}"
                )
            finally:
                shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- 3. clip reads vs dd
def drop_cache(paths: list[Path]) -> str:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            os.sync()
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED)"


def dd_read(paths: list[Path]) -> float:
    """MB/s of `dd` reading every file sequentially (bs=4M)."""
    total = sum(p.stat().st_size for p in paths)
    start = time.perf_counter()
    for p in paths:
        subprocess.run(["dd", f"if={p}", "of=/dev/null", "bs=4M"], check=True, capture_output=True)
    return total / (time.perf_counter() - start) / 1e6


def read_paths(root: Path, T: int, clips: int, rng) -> dict:
    """The ways a store is read, each a function of no arguments that reads and returns the
    number of stored bytes it read: single clip items (float32 = widened in the reader, stored
    = float16 tensors), and the training DataLoaders exactly as train-slots (``ClipData``: batch
    4 clips, 2 workers) and pretrain-dvae (``FrameData``: batch 32 frames, 2 workers) build them."""
    from egoslots.stages.machinery.datamodules import ClipData, FrameData

    path = root / "s.zarr"
    store = FeatureStore.open(path)
    per_frame = int(np.prod(store.group["features"].shape[1:])) * 2  # float16
    frame_bytes = int(np.prod(store.group["frames"].shape[1:]))
    cfg = load_config(
        None,
        [
            "globals.BATCH_SIZE_PER_GPU=4",
            f"globals.NUM_FRAMES={T}",
            "dataset.num_workers=2",
            f"trainer.max_steps={max(1, clips // 4)}",
            "dvae.batch_size=32",
            "dvae.num_workers=2",
            f"dvae.max_steps={max(1, clips * T // 32)}",
            f"seed={int(rng.integers(1 << 30))}",
        ],
    )

    def items(dtype):
        ds = ClipDataset(path, split="train", clip_length=T, feature_dtype=dtype)
        order = rng.permutation(len(ds))[:clips]
        return lambda: sum(ds[int(i)]["features"].shape[0] for i in order) * per_frame

    clip_batches = ClipData(store, cfg, None).train_dataloader()
    frame_batches = FrameData(store, cfg).train_dataloader()
    return {
        "clip items, float32": ("features", items("float32")),
        "clip items, stored": ("features", items("stored")),
        "train-slots loader": (
            "features",
            lambda: sum(b["features"].shape[:2].numel() for b in clip_batches) * per_frame,
        ),
        "pretrain-dvae loader": (
            "frames",
            lambda: sum(len(b) for b in frame_batches) * frame_bytes,
        ),
    }


def bench_read(args) -> None:
    rng = np.random.default_rng(0)
    n, tokens, dim, T = args.frames, 256, 384, args.clip
    print(f"machine: {machine()}")
    print(
        f"store: {n} frames of float16 features 256 x 384 ({tokens * dim * 2 / 1e3:.0f} kB/frame) "
        f"and {args.frame_size} px uint8 frames, 64-frame chunks; {args.clips} random clips of "
        f"T={T} frames per measurement (dVAE: {args.clips * T} random frames); MB/s counts "
        "stored bytes; `dd` reads the same array's shard files in sequence"
    )
    feats = rng.normal(size=(64, tokens, dim)).astype(np.float16)
    frames = rng.integers(0, 256, (64, args.frame_size, args.frame_size, 3), dtype=np.uint8)
    print(
        f"{'inner':>5} {'path':<22} {'cache':<5} {'MB/s':>7} {'dd MB/s':>8} {'ratio':>6}  cold via"
    )
    for inner in args.inner:
        root = Path(tempfile.mkdtemp(prefix="egoslots-read-", dir=args.dir))
        try:
            per_video = 256
            videos = [
                VideoRecord(f"v{i}", i * per_video, per_video, "train")
                for i in range(n // per_video)
            ]
            store = FeatureStore.create(
                root / "s.zarr",
                fingerprint="bench",
                videos=videos,
                num_tokens=tokens,
                feature_dim=dim,
                grid=(16, 16),
                frame_size=args.frame_size,
                chunk_len=64,
                inner_chunk_len=inner,
            )
            for c in range(n // 64):
                store.write_chunk(c, {"features": feats, "frames": frames}, durable=False)
            store.mark_complete_if_done()
            for name, (array, read) in read_paths(root, T, args.clips, rng).items():
                files = sorted(f for f in (root / "s.zarr" / array / "c").rglob("*") if f.is_file())
                read()  # start the workers, open the files
                for cache in ("cold", "warm"):
                    how = drop_cache(files) if cache == "cold" else ""
                    start = time.perf_counter()
                    mb = read() / (time.perf_counter() - start) / 1e6
                    if cache == "cold":
                        drop_cache(files)
                    dd = dd_read(files)
                    print(
                        f"{inner:5d} {name:<22} {cache:<5} {mb:7.0f} {dd:8.0f} {mb / dd:6.2f}  {how}"
                    )
        finally:
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- 4. peak RSS vs dataset size
RSS_CHILD = r"""
import resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from egoslots.pipeline.config import load_config
from egoslots.pipeline.data.base import VideoInfo, FileIdentity, Frame
from egoslots.stages.extract_features import extract

class Generated:
    '''Videos made on the fly (nothing held in memory), like a file source.'''
    root = "gen"
    has_masks = True
    def __init__(self, n, frames): self.n, self.frames = n, frames
    def videos(self):
        return [VideoInfo(f"v{i:06d}", self.frames, "train", (FileIdentity(f"v{i:06d}.mp4", 1000 + i, i),))
                for i in range(self.n)]
    def read_frames(self, vid, start=0, stop=None):
        seed = int(vid[1:])
        for t in range(start, self.frames if stop is None else stop):
            rgb = np.full((72, 96, 3), (seed * 7 + t) % 256, np.uint8)
            yield Frame(vid, t, rgb, (rgb[..., 0] > 100).astype(np.uint8))

n, frames, work = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = load_config(sys.argv[1] + "/configs/demo.yaml", [f"work_dir={work}", "extract.num_workers=1",
                  "extract.frames_per_chunk=32", "extract.compute=fp32"])
extract(cfg, source=Generated(n, frames))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def bench_rss(args) -> None:
    print(f"machine: {machine()}")
    print("patch-pixels at 64 px, 64 px frames + masks, 16 frames per video, 1 decode worker")
    for videos in (args.videos, args.videos * 10):
        work = tempfile.mkdtemp(prefix="egoslots-rss-")
        try:
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", RSS_CHILD, str(REPO), str(videos), "16", work],
                check=True,
                capture_output=True,
                text=True,
            )
            main_kb, worker_kb = map(int, out.stdout.split()[-2:])
            print(
                f"{videos:6d} videos ({videos * 16:7d} frames): peak RSS main {main_kb / 1024:6.0f} MiB, "
                f"worker {worker_kb / 1024:6.0f} MiB, {time.perf_counter() - start:5.1f} s"
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["extraction", "bytes", "read", "rss", "all"])
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--videos", type=int, default=None)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clip", type=int, default=4)
    parser.add_argument("--clips", type=int, default=300)
    parser.add_argument("--frame-size", type=int, default=128, help="read: cached frame size")
    parser.add_argument("--inner", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument(
        "--dir", default=None, help="where the read benchmark writes its store (default: tmp)"
    )
    args = parser.parse_args()
    runs = ["extraction", "bytes", "read", "rss"] if args.what == "all" else [args.what]
    for what in runs:
        print(f"\n=== {what}")
        a = argparse.Namespace(**vars(args))
        if what == "extraction":
            a.frames, a.videos = args.frames or 192, args.videos or 3
            bench_extraction(a)
        elif what == "bytes":
            a.frames = args.frames or 128
            bench_bytes(a)
        elif what == "read":
            a.frames = args.frames or 4096
            bench_read(a)
        else:
            a.videos = args.videos or 100
            bench_rss(a)


if __name__ == "__main__":
    main()
