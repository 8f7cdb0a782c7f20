"""Training-free baselines that give masks in the model's (T, K, N) form.

- k-means on the cached patch features with K = number of slots, per frame (each frame its
  own clustering, so cluster ids do not persist over time) and per video (one clustering of
  all T*N tokens, so ids persist). Features are L2-normalised first (ViT patch features are
  compared by cosine). A small batched torch k-means with k-means++ init, seeded.
- k-means on pixel colours (RGB in [0, 1]), per video, K = number of slots: every pixel of the
  video's frames in one clustering, at the frames' own resolution. The bar a slot model must clear
  on colourful synthetic scenes, whatever its encoder (``kmeans_video`` changes with the encoder).
- a fixed grid partition of the token grid into K cells (no data at all).

The same metrics then apply as to the model's masks (``egoslots.pipeline.metrics.evaluate_masks``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kmeans(
    x: torch.Tensor, k: int, iters: int = 30, seed: int = 0, n_init: int = 1
) -> torch.Tensor:
    """Batched k-means: points (B, P, D) -> cluster ids (B, P) int64, k-means++ init, seeded.

    ``n_init`` > 1: that many runs (seeds ``seed``, ``seed + 1``, ...), keeping per batch row
    the one with the lowest inertia (sum of squared distances to its centres), as sklearn's
    ``n_init``; the first run is the ``n_init=1`` result."""
    if n_init <= 1:
        return _kmeans_once(x, k, iters, seed)
    best, best_inertia = None, None
    for run in range(n_init):
        assign = _kmeans_once(x, k, iters, seed + run)
        inertia = _inertia(x.float(), assign, k)  # (B,)
        if best is None:
            best, best_inertia = assign, inertia
            continue
        better = inertia < best_inertia
        best = torch.where(better[:, None], assign, best)
        best_inertia = torch.minimum(inertia, best_inertia)
    return best


def _inertia(x: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over points of the squared distance to their cluster's mean: (B,)."""
    onehot = F.one_hot(assign, k).float()  # (B, P, K)
    centres = (onehot.transpose(1, 2) @ x) / onehot.sum(1).clamp_min(1)[..., None]  # (B, K, D)
    return ((x - torch.gather(centres, 1, assign[..., None].expand_as(x))) ** 2).sum((1, 2))


def _kmeans_once(x: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    b, p, _ = x.shape
    x = x.float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batch = torch.arange(b)
    # k-means++: first centre uniform, each next one with probability ∝ squared distance.
    first = torch.randint(p, (b,), generator=gen)
    centres = [x[batch, first]]  # list of (B, D)
    dist = ((x - centres[0][:, None]) ** 2).sum(-1)  # (B, P)
    for _ in range(1, k):
        weights = dist.clamp_min(0) + 1e-12
        pick = torch.multinomial(weights.cpu(), 1, generator=gen).squeeze(1)
        centres.append(x[batch, pick])
        dist = torch.minimum(dist, ((x - centres[-1][:, None]) ** 2).sum(-1))
    c = torch.stack(centres, dim=1)  # (B, K, D)
    assign = torch.cdist(x, c).argmin(-1)
    for _ in range(iters):
        onehot = F.one_hot(assign, k).float()  # (B, P, K)
        counts = onehot.sum(1)  # (B, K)
        sums = onehot.transpose(1, 2) @ x  # (B, K, D)
        c = torch.where(
            counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], c
        )  # empty: keep
        new = torch.cdist(x, c).argmin(-1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def kmeans_masks(
    features: torch.Tensor, k: int, per: str = "frame", iters: int = 30, seed: int = 0
) -> torch.Tensor:
    """k-means masks of one video's features (T, N, D) -> one-hot (T, K, N); per = frame | video."""
    t, n, _ = features.shape
    x = F.normalize(features.float(), dim=-1)
    if per == "frame":
        ids = kmeans(x, k, iters, seed)  # (T, N)
    elif per == "video":
        ids = kmeans(x.reshape(1, t * n, -1), k, iters, seed).reshape(t, n)
    else:
        raise ValueError(f"per must be 'frame' or 'video', got {per!r}")
    return F.one_hot(ids, k).permute(0, 2, 1).float()


def colour_kmeans_masks(
    frames: torch.Tensor, k: int, iters: int = 30, seed: int = 0, n_init: int = 1
) -> torch.Tensor:
    """k-means of one video's pixel colours: frames (T, H, W, 3) uint8 -> one-hot (T, K, H*W)."""
    t = frames.shape[0]
    x = frames.reshape(1, -1, 3).float() / 255.0  # (1, T*H*W, 3)
    ids = kmeans(x, k, iters, seed, n_init).reshape(t, -1)  # (T, H*W)
    return F.one_hot(ids, k).permute(0, 2, 1).float()


def grid_cells(k: int, grid: tuple[int, int]) -> torch.Tensor:
    """Cell index (h*w,) of each token for a near-square layout of k cells on an (h, w) grid.

    rows = floor(sqrt(k)); the last ``k % rows`` rows get one more column than the others.
    """
    h, w = grid
    rows = max(1, math.isqrt(k))
    cols = [k // rows + (1 if r >= rows - k % rows else 0) for r in range(rows)]
    ys = torch.arange(h)[:, None].expand(h, w)
    xs = torch.arange(w)[None, :].expand(h, w)
    row = torch.div(ys * rows, h, rounding_mode="floor")
    cells_before = torch.tensor([sum(cols[:r]) for r in range(rows)])
    ncols = torch.tensor(cols)[row]
    col = torch.div(xs * ncols, w, rounding_mode="floor")
    return (cells_before[row] + col).reshape(-1)


def grid_masks(num_frames: int, k: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed grid partition into k cells, the same in every frame: one-hot (T, K, N)."""
    cells = grid_cells(k, grid)
    masks = F.one_hot(cells, k).T.float()  # (K, N)
    return masks[None].expand(num_frames, -1, -1).contiguous()
