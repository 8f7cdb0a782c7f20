"""Object-discovery metrics, computed as SlotContrast / VideoSAUR compute them.

Predicted masks ``(T, K, N)`` (soft or hard, N = h*w tokens) become a label map the size of
the ground truth: reshape N to the (h, w) grid -> bilinear resize -> argmax over slots.
Ground truth is a uint8 label map ``(T, H, W)``, 0 = background, 1..255 = objects.

Everything is derived from one contingency table ``n[c, k]`` = number of pixels with true
label c and predicted slot k (a ``bincount``), per video or per frame:

- ARI: adjusted Rand index over all pixels; FG-ARI: over foreground pixels only (true
  background dropped), the one SlotContrast reports.
  ARI = 1 where its denominator is 0 (as SlotContrast: both partitions a single cluster, or
  every cluster a single point). A video (or frame) with no foreground pixel at all gets
  ARI = 1 by that same rule; :func:`video_metrics` reports it as such and counts such items
  in ``empty_frames`` so callers can tell.
- mBO: for each ground-truth object, the best IoU over slots; mean over the objects present
  (background excluded). Video mBO takes IoU over the whole video volume (T, H, W). With no
  object present mBO is undefined: NaN (aggregate with ``nanmean``).
- mIoU: Hungarian one-to-one matching of objects to slots maximising total IoU (scipy's
  ``linear_sum_assignment``); mean IoU over present objects, an unmatched object counts 0.

Video metrics put all t, h, w pixels of a video into one table, one value per video; their
dataset mean is over videos. "Frame" metrics score each frame on its own; their dataset mean is
over **all frames** of all videos (frames without an object left out of frame mBO), as
SlotContrast's ``ImageARI`` / ``ImageIoU(video_input=True)`` accumulate them, so a long video
weighs more than a short one. The mean of per-video frame means, what egoslots reported before,
is kept as ``<metric>_per_video`` (:func:`summarize_videos`); the two differ only when videos
have different lengths (or different numbers of frames with objects). All functions are pure
(no I/O).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

METRICS = (
    "video_fg_ari",
    "video_mbo",
    "video_miou",
    "frame_fg_ari",
    "frame_mbo",
    "video_ari",
    "frame_ari",
)
FRAME_METRICS = ("frame_fg_ari", "frame_mbo", "frame_ari")  # dataset mean over all frames
# The mean over videos of each video's frame mean, under its own name.
PER_VIDEO_MEANS = {f"{name}_per_video": name for name in FRAME_METRICS}


# ---------------------------------------------------------------------------------- masks
def infer_grid(num_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (h, w) token grid: given, or square when N is a square number."""
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        if h * w != num_tokens:
            raise ValueError(f"grid {h}x{w} does not hold {num_tokens} tokens")
        return h, w
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens are not a square grid; pass grid=(h, w)")
    return side, side


def masks_to_labels(
    masks: torch.Tensor, size: tuple[int, int], grid: tuple[int, int] | None = None, chunk: int = 64
) -> torch.Tensor:
    """Soft masks (..., K, N) -> slot label maps (..., H, W) int64, as SlotContrast does.

    Reshape N to the grid, bilinear resize to ``size`` (align_corners=False), argmax over K.
    Frames are resized ``chunk`` at a time to bound memory.
    """
    *lead, k, n = masks.shape
    h, w = infer_grid(n, grid)
    flat = masks.reshape(-1, k, h, w).float()
    out = []
    for i in range(0, flat.shape[0], chunk):
        part = flat[i : i + chunk]
        if (h, w) != tuple(size):
            part = F.interpolate(part, size=tuple(size), mode="bilinear", align_corners=False)
        out.append(part.argmax(dim=1))
    return torch.cat(out).reshape(*lead, *size)


# ---------------------------------------------------------------------------------- tables
def contingency(
    true: torch.Tensor,
    pred: torch.Tensor,
    num_pred: int,
    groups: torch.Tensor | None = None,
    num_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contingency tables n[g, c, k] of compacted true labels c vs predicted labels k.

    ``true`` and ``pred`` are integer tensors of the same shape; ``groups`` (same shape) splits
    the pixels into ``num_groups`` tables (e.g. the frame index). True labels are compacted to
    0..C-1 with background (0) always at index 0. Returns (table (G, C, K) float64, ids (C,)).
    """
    true = true.reshape(-1).long()
    pred = pred.reshape(-1).long()
    ids, inverse = torch.unique(torch.cat([true.new_zeros(1), true]), return_inverse=True)
    inverse = inverse[1:]
    c = ids.numel()
    index = inverse * num_pred + pred
    if groups is not None:
        index = groups.reshape(-1).long() * (c * num_pred) + index
    table = torch.bincount(index, minlength=num_groups * c * num_pred)
    return table.reshape(num_groups, c, num_pred).double(), ids


def ari_from_table(table: torch.Tensor) -> torch.Tensor:
    """Adjusted Rand index of each contingency table (G, C, K) -> (G,); 1 where undefined."""
    n = table.sum(dim=(1, 2))
    a = table.sum(dim=2)  # true cluster sizes (G, C)
    b = table.sum(dim=1)  # predicted cluster sizes (G, K)
    index = (table * (table - 1)).sum(dim=(1, 2))
    a_index = (a * (a - 1)).sum(dim=1)
    b_index = (b * (b - 1)).sum(dim=1)
    pairs = n * (n - 1)
    expected = torch.where(
        pairs > 0, a_index * b_index / pairs.clamp_min(1), torch.zeros_like(pairs)
    )
    max_index = (a_index + b_index) / 2
    denominator = max_index - expected
    ari = (index - expected) / torch.where(
        denominator > 0, denominator, torch.ones_like(denominator)
    )
    return torch.where(denominator > 0, ari, torch.ones_like(ari))


def iou_from_table(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU of every object (true labels 1..C-1) with every slot: (G, C-1, K), and object areas (G, C-1)."""
    inter = table[:, 1:, :]
    true_area = table.sum(dim=2)[:, 1:]
    pred_area = table.sum(dim=1)
    union = true_area[:, :, None] + pred_area[:, None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    return iou, true_area


def mbo_from_table(table: torch.Tensor) -> torch.Tensor:
    """Mean best overlap per table (G,): NaN where no object is present."""
    iou, area = iou_from_table(table)
    present = area > 0
    best = iou.max(dim=2).values if iou.shape[2] else torch.zeros_like(area)
    count = present.sum(dim=1)
    total = (best * present).sum(dim=1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def hungarian_miou_from_table(table: torch.Tensor) -> torch.Tensor:
    """Mean IoU of Hungarian-matched (object, slot) pairs per table (G,): NaN with no objects."""
    iou, area = iou_from_table(table)
    out = []
    for g in range(table.shape[0]):
        present = area[g] > 0
        scores = iou[g][present].cpu().numpy()
        if scores.shape[0] == 0:
            out.append(float("nan"))
            continue
        rows, cols = linear_sum_assignment(scores, maximize=True)
        out.append(float(scores[rows, cols].sum() / scores.shape[0]))
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------- labels API
def adjusted_rand_index(true: torch.Tensor | np.ndarray, pred: torch.Tensor | np.ndarray) -> float:
    """ARI of two labelings of the same points (all points; equals sklearn's adjusted_rand_score)."""
    true, pred = torch.as_tensor(np.asarray(true)).long(), torch.as_tensor(np.asarray(pred)).long()
    _, pred = torch.unique(pred.reshape(-1), return_inverse=True)
    table, _ = contingency(true, pred, int(pred.max()) + 1 if pred.numel() else 1)
    return float(ari_from_table(table)[0])


def fg_ari(true: torch.Tensor, pred: torch.Tensor, num_slots: int) -> float:
    """Foreground ARI of two label maps of any shape (true 0 = background, dropped)."""
    table, _ = contingency(true, pred, num_slots)
    return float(ari_from_table(table[:, 1:, :])[0])


def video_metrics(pred_labels: torch.Tensor, true_labels: torch.Tensor, num_slots: int) -> dict:
    """Every metric of one video from slot label maps and true label maps, both (T, H, W).

    Returns floats: video_fg_ari, video_mbo, video_miou, frame_fg_ari, frame_mbo (mean over
    frames; frame_mbo over frames with an object), video_ari and frame_ari (background
    included), plus ``num_objects``, ``empty_frames``, and ``frame_stats``: for each frame
    metric ``[frames scored, sum, sum of squares]``, from which :func:`summarize_videos` takes
    the mean and std over all frames of a data set.
    """
    if pred_labels.shape != true_labels.shape:
        raise ValueError(
            f"predicted labels {tuple(pred_labels.shape)} vs ground truth {tuple(true_labels.shape)}"
        )
    t = true_labels.shape[0]
    frame_index = torch.arange(t).view(t, *([1] * (true_labels.dim() - 1))).expand_as(true_labels)
    per_frame, _ = contingency(
        true_labels, pred_labels, num_slots, groups=frame_index, num_groups=t
    )
    video = per_frame.sum(dim=0, keepdim=True)  # (1, C, K)
    frame_ari = ari_from_table(per_frame[:, 1:, :])
    frame_mbo = mbo_from_table(per_frame)
    frame_ari_bg = ari_from_table(per_frame)
    empty = per_frame[:, 1:, :].sum(dim=(1, 2)) == 0
    return {
        "video_fg_ari": float(ari_from_table(video[:, 1:, :])[0]),
        "video_mbo": float(mbo_from_table(video)[0]),
        "video_miou": float(hungarian_miou_from_table(video)[0]),
        "frame_fg_ari": float(frame_ari.mean()),
        "video_ari": float(ari_from_table(video)[0]),  # background included
        "frame_ari": float(frame_ari_bg.mean()),
        "frame_mbo": float(np.nanmean(frame_mbo.numpy()))
        if (~torch.isnan(frame_mbo)).any()
        else float("nan"),
        "num_objects": int((video.sum(dim=2)[0, 1:] > 0).sum()),
        "empty_frames": int(empty.sum()),
        "frame_stats": {
            "frame_fg_ari": frame_sums(frame_ari),
            "frame_mbo": frame_sums(frame_mbo),
            "frame_ari": frame_sums(frame_ari_bg),
        },
    }


def frame_sums(values: torch.Tensor) -> list[float]:
    """[count, sum, sum of squares] of the finite per-frame values (NaN: frame not scored)."""
    v = values[torch.isfinite(values)].double()
    return [float(v.numel()), float(v.sum()), float((v * v).sum())]


def evaluate_masks(
    masks: torch.Tensor, true_labels: torch.Tensor, grid: tuple[int, int] | None = None
) -> dict:
    """:func:`video_metrics` of soft masks (T, K, N) against true label maps (T, H, W)."""
    true_labels = torch.as_tensor(true_labels)
    pred = masks_to_labels(torch.as_tensor(masks), tuple(true_labels.shape[-2:]), grid)
    return video_metrics(pred, true_labels.long(), masks.shape[-2])


def summarize(values: list[float]) -> dict:
    """mean, std (population) and count of the finite values."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def summarize_frames(stats: list) -> dict:
    """mean, std (population) and count over all frames, from per-video ``frame_sums``."""
    count, total, squares = (
        np.asarray([s for s in stats if s is not None], dtype=np.float64).reshape(-1, 3).sum(axis=0)
    )
    if count == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    mean = total / count
    return {
        "mean": mean,
        "std": math.sqrt(max(squares / count - mean * mean, 0.0)),
        "n": int(count),
    }


def summarize_videos(values: dict[str, list]) -> dict[str, dict]:
    """Data-set summaries of one method from its per-video :func:`video_metrics` lists.

    Video metrics: over videos. Frame metrics: over all frames (SlotContrast), from
    ``frame_stats``; ``<metric>_per_video``: the mean of the per-video frame means. Lists from
    before ``frame_stats`` existed fall back to the per-video mean for frame metrics.
    """
    out = {}
    stats = values.get("frame_stats")
    for key in METRICS:
        if key not in values:
            continue
        if key in FRAME_METRICS and stats:
            out[key] = summarize_frames([s.get(key) if s else None for s in stats])
        else:
            out[key] = summarize(values[key])
    for name, key in PER_VIDEO_MEANS.items():
        if key in values:
            out[name] = summarize(values[key])
    return out
