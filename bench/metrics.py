"""Speed of the evaluation metrics and baselines on one 24-frame 128 px video (prints figures)."""

import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from egoslots.pipeline import baselines, metrics  # noqa: E402

torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
true = torch.randint(0, 11, (24, 128, 128), generator=g).to(torch.uint8)
masks = torch.rand(24, 11, 256, generator=g)
feats = torch.randn(24, 256, 384, generator=g)


def t(f, n=5):
    f()
    s = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - s) / n * 1000


print(
    f"evaluate_masks 24x128px K=11 N=256: {t(lambda: metrics.evaluate_masks(masks, true)):.1f} ms/video"
)
print(f"  of which masks_to_labels: {t(lambda: metrics.masks_to_labels(masks, (128, 128))):.1f} ms")
print(
    f"kmeans per frame (24x256x384, K=11): {t(lambda: baselines.kmeans_masks(feats, 11, 'frame'), 3):.1f} ms/video"
)
print(
    f"kmeans per video (6144x384, K=11): {t(lambda: baselines.kmeans_masks(feats, 11, 'video'), 3):.1f} ms/video"
)
