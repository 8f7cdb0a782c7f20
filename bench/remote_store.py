"""Object-storage costs that egoslots' code controls, on moto's S3 server over loopback (prints figures).

Loopback has no network latency, so absolute times say little about a real bucket; what they
show is the request count: which chunk-flag read and which clip read cost one request each.

    python bench/remote_store.py [--chunks 3000] [--clips 200]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def start_server() -> str:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    import fsspec.config

    fsspec.config.conf["s3"] = {"endpoint_url": f"http://{host}:{port}"}
    return f"http://{host}:{port}"


def timed(fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=3000, help="chunks in the flag benchmark")
    parser.add_argument(
        "--clips", type=int, default=200, help="4-frame clips read in the clip benchmark"
    )
    args = parser.parse_args()
    start_server()
    import zarr

    from egoslots.cache.location import filesystem
    from egoslots.cache.reader import ClipDataset
    from egoslots.cache.store import FeatureStore, VideoRecord

    fs, _ = filesystem("s3://bench")
    fs.mkdir("bench")

    # 1) which chunks are done: one GET per flag (zarr) vs listing the flag folder (egoslots)
    group = zarr.open_group("s3://bench/flags.zarr", mode="w", zarr_format=3)
    flags = group.create_array(
        "done",
        shape=(args.chunks,),
        dtype="uint8",
        chunks=(1,),
        config={"write_empty_chunks": True},
    )
    flags[:] = 1
    store = FeatureStore("s3://bench/flags.zarr", group)
    by_get = timed(
        lambda: np.asarray(zarr.open_group("s3://bench/flags.zarr", mode="r")["done"][:])
    )
    by_list = timed(lambda: store.done_chunks())
    print(
        f"done flags of {args.chunks} chunks: zarr GET per flag {by_get:.2f} s, listing {by_list:.2f} s "
        f"({by_get / by_list:.0f}x)"
    )

    # 2) clip reads: the same store on local disk and on S3 (ViT-S/14 shapes, float16)
    videos = [VideoRecord(f"v{i}", i * 64, 64, "train") for i in range(8)]
    kwargs = dict(
        videos=videos,
        num_tokens=256,
        feature_dim=384,
        grid=(16, 16),
        frame_size=64,
        chunk_len=64,
        inner_chunk_len=1,
    )
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for where in (Path(tmp) / "local.zarr", "s3://bench/clips.zarr"):
            st = FeatureStore.create(where, fingerprint="bench", **kwargs)
            for chunk in range(8):
                feats = rng.standard_normal((64, 256, 384), dtype=np.float32)
                frames = rng.integers(0, 255, (64, 64, 64, 3), dtype=np.uint8)
                st.write_chunk(
                    chunk, {**st.encode_features(feats), "frames": frames}, durable=False
                )
            st.mark_complete_if_done()
        for name, where in (
            ("local", Path(tmp) / "local.zarr"),
            ("s3 (loopback)", "s3://bench/clips.zarr"),
        ):
            clips = ClipDataset(where, clip_length=4, feature_dtype="stored")
            order = np.random.default_rng(1).permutation(len(clips))[: args.clips]
            seconds = timed(
                lambda clips=clips, order=order: [clips[int(i)] for i in order], repeat=1
            )
            mb = args.clips * 4 * 256 * 384 * 2 / 1e6
            print(
                f"{args.clips} random 4-frame clips, {name}: {seconds / args.clips * 1000:.1f} ms/clip, "
                f"{mb / seconds:.0f} MB/s"
            )


if __name__ == "__main__":
    main()
