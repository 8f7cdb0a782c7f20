"""What the fast reader's crc32c check costs (issue 26).

The same store, the same random batches of the train-slots path (``ClipBatches.read_batch``: 4
clips x 4 frames of float16 256 x 384 features), read with the check on and with it patched off,
interleaved, warm page cache, against ``dd bs=4M`` of the same shard files; medians of ROUNDS.

    python bench/read_checksums.py [ROUNDS]
"""

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import egoslots.cache.shards as shards
from egoslots.cache.reader import ClipBatches
from egoslots.cache.store import FeatureStore, VideoRecord

n, tokens, dim = 1024, 256, 384
rng = np.random.default_rng(0)
root = Path(tempfile.mkdtemp(prefix="egoslots-checksums-"))
videos = [VideoRecord(f"v{i}", i * 256, 256, "train") for i in range(n // 256)]
st = FeatureStore.create(
    root / "s.zarr",
    fingerprint="ab",
    videos=videos,
    num_tokens=tokens,
    feature_dim=dim,
    grid=(16, 16),
    frame_size=128,
    chunk_len=64,
    inner_chunk_len=1,
)
feats = rng.normal(size=(64, tokens, dim)).astype(np.float16)
frames = rng.integers(0, 256, (64, 128, 128, 3), dtype=np.uint8)
for c in range(n // 64):
    st.write_chunk(c, {"features": feats, "frames": frames}, durable=False)
st.mark_complete_if_done()
data = ClipBatches(
    root / "s.zarr", split="train", clip_length=4, fields=("features",), feature_dtype="stored"
)
order = rng.permutation(len(data))[:1200]
batches = [order[i : i + 4] for i in range(0, len(order), 4)]
files = sorted(f for f in (root / "s.zarr" / "features" / "c").rglob("*") if f.is_file())
real = shards.crc_ok


def run(check):
    shards.crc_ok = real if check else (lambda data, stored: True)
    t, c = time.perf_counter(), time.process_time()
    nbytes = sum(data.read_batch(b)["features"].numel() * 2 for b in batches)
    return nbytes / (time.perf_counter() - t) / 1e6, nbytes / (time.process_time() - c) / 1e6


def dd():
    total = sum(p.stat().st_size for p in files)
    t = time.perf_counter()
    for p in files:
        subprocess.run(["dd", f"if={p}", "of=/dev/null", "bs=4M"], check=True, capture_output=True)
    return total / (time.perf_counter() - t) / 1e6


run(True)  # warm the page cache, open the files
res = {"on": [], "off": [], "dd": []}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
    res["off"].append(run(False))
    res["on"].append(run(True))
    res["dd"].append(dd())
for k in ("off", "on"):
    wall = statistics.median(x[0] for x in res[k])
    cpu = statistics.median(x[1] for x in res[k])
    print(
        f"check {k:<3}: {wall:6.0f} MB/s wall, {cpu:6.0f} MB/s per CPU-second, ratio to dd {wall / statistics.median(res['dd']):.2f}"
    )
print(
    f"dd warm: {statistics.median(res['dd']):.0f} MB/s (median of {len(res['dd'])}); load avg {open('/proc/loadavg').read().split()[0]}"
)
shutil.rmtree(root, ignore_errors=True)
