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

# Refinement to pixels and the parts split, as evaluate runs them on a 16-frame 128 px video
# with 16x16 tokens: the slots (K = 12) and their parts (K' = 48).
from egoslots.pipeline.components import split_components  # noqa: E402
from egoslots.pipeline.refine import refine_masks  # noqa: E402

frames = torch.randint(0, 256, (16, 128, 128, 3), generator=g).to(torch.uint8)
for k in (12, 48):
    soft = (3 * torch.randn(16, k, 256, generator=g)).softmax(1)
    ms = t(lambda soft=soft: refine_masks(soft, frames, (16, 16)), 3)
    print(f"refine_masks 16x128px K={k} 16x16 tokens, 8 EM rounds: {ms:.0f} ms/video")
pixels = torch.nn.functional.interpolate(torch.randn(16, 12, 24, 24, generator=g), size=(128, 128))
hard = torch.nn.functional.one_hot(pixels.argmax(1), 12).permute(0, 3, 1, 2).flatten(2).float()
ms = t(lambda: split_components(hard, (128, 128), min_size=64), 2)
print(f"split_components 16x128px K=12 at pixels (colour k-means' split): {ms:.0f} ms/video")
