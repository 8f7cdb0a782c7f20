"""Label-free quality numbers of slot masks on one video: what evaluate reports without masks.

Unlabelled video (SAYCam) has no ground truth to score FG-ARI or mBO against; these numbers
need only the masks (and the cached features for the reconstruction error), so they apply to
any store and to the model and the baselines alike. docs/label-free.md says what each means and
how well each predicted FG-ARI / mBO on the synthetic benchmark.

Shapes: masks ``(T, K, N)`` over T frames, K slots and N = h*w tokens (soft or one-hot; soft
masks sum to 1 over K); labels ``(T, N)`` int, the argmax slot of every token; features and
reconstructions ``(T, N, D)``. Every number is computed per video (the caller streams videos and
averages the per-video values). All functions are pure: tensors in, floats out, no I/O.

Definitions (hard labels = argmax over slots; with ``tol`` > 0 the tie rule of
:func:`tied_argmax`, as ``--track match`` labels tokens):

- ``token_stability``: share of (token position, consecutive frame pair) whose label is the same
  in both frames. 1.0 for a constant labelling.
- ``identity_best``: share of consecutive frame pairs (t, t+1) where keeping every slot's index is
  a best one-to-one matching of frame t's slots to frame t+1's: the Hungarian matching
  (``scipy.optimize.linear_sum_assignment``) maximising the overlap ``O[k, j]`` = number of token
  positions labelled k at t and j at t+1 reaches no higher total than the identity.
- ``run_length``: mean length in frames of a slot's runs on one object. The object a slot covers
  at frame t is followed to t+1 by that best matching (ties broken towards the identity); a run
  of slot k is a maximal stretch of consecutive frames in which k is active and is matched to
  itself from each frame to the next; it ends at a switch (k matched to another slot), when k
  falls inactive, or at the video's end. Mean over all runs of all slots; at most T.
- ``active_slots``: mean over frames of the number of slots winning at least ``min_share`` of the
  frame's tokens (default 2%, :data:`ACTIVE_SHARE`).
- ``mask_entropy``: mean over tokens of the entropy of the soft masks over slots, divided by
  log K: 0 for one-hot masks, 1 for uniform ones.
- ``feature_rec_mse`` / ``feature_rec_rel``: mean squared error of a reconstruction of the cached
  features (the training loss's quantity), and the same sum divided by the features' total squared
  deviation from the video's mean feature (0 perfect, 1 = no better than one mean feature for the
  video). For a partition (k-means, grid) the reconstruction is each token's cluster mean over the
  video (:func:`partition_reconstruction`).
- ``flip_agreement``: mean over frames of the ARI between a frame's labels and the mirrored-back
  labels of the same frame flipped horizontally (the method run on the store's flipped rows);
  slot indices need not agree, only each frame's grouping.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from egoslots.pipeline.metrics import ari_from_table, contingency

ACTIVE_SHARE = (
    0.02  # a slot is active in a frame when it wins at least this share of the frame's tokens
)

# the label-free numbers, in the order of evaluate's table
NUMBERS = (
    "token_stability",
    "identity_best",
    "run_length",
    "active_slots",
    "mask_entropy",
    "feature_rec_rel",
    "feature_rec_mse",
    "flip_agreement",
)


def _check_masks(masks: torch.Tensor) -> None:
    if masks.dim() != 3:
        raise ValueError(f"masks must be (T, K, N), got shape {tuple(masks.shape)}")


# Mask values closer than this count as equal when a token's slot is chosen (:func:`tied_argmax`).
TIE_TOLERANCE = 1e-3


def tied_argmax(
    masks: torch.Tensor, tol: float = TIE_TOLERANCE, prefer: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft masks (..., K, N) -> the slot of each token (..., N): among the slots within ``tol``
    of the token's largest mask value, the one ``prefer`` (..., N) names if it is one of them,
    else the lowest index.

    Slots that settle on (near-)identical vectors share their tokens almost equally, and a plain
    arg-max then hands each token to whichever is ahead by float noise, a different one each
    frame (docs/real-video.md: that is most of the "identity switches" on real footage). Within
    ``tol`` the choice is fixed instead: ``prefer`` is the token's slot in the frame before
    (``tracking.SlotTracker``), so a token changes slot only when another slot's mask is
    clearly larger; without it the lower index wins. float16 exports round to about ``tol``.
    """
    masks = masks.detach().float()
    top = masks.max(dim=-2, keepdim=True).values
    tied = masks >= top - tol  # (..., K, N)
    first = tied.to(torch.uint8).argmax(dim=-2)  # the first slot that ties
    if prefer is None:
        return first
    prefer = prefer.to(first.device).long()
    kept = tied.gather(-2, prefer.clamp(0, masks.shape[-2] - 1).unsqueeze(-2)).squeeze(-2)
    return torch.where(kept & (prefer >= 0), prefer, first)


def labels_of(masks: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """Masks (T, K, N) -> hard labels (T, N) int64: the argmax slot of every token, or with
    ``tol`` > 0 the lowest slot within ``tol`` of it (:func:`tied_argmax`)."""
    _check_masks(masks)
    return tied_argmax(masks, tol).long() if tol > 0 else masks.argmax(dim=1)


def sticky_labels(
    masks: torch.Tensor, tol: float = TIE_TOLERANCE, previous: torch.Tensor | None = None
) -> torch.Tensor:
    """Masks (T, K, N) -> labels (T, N) int64 frame by frame with :func:`tied_argmax`, each
    frame preferring the labels of the frame before (``previous`` (N,) before the first)."""
    _check_masks(masks)
    out = []
    for frame in masks:
        previous = tied_argmax(frame, tol, previous).long()
        out.append(previous)
    return torch.stack(out) if out else torch.zeros(0, masks.shape[-1], dtype=torch.long)


def token_stability(labels: torch.Tensor) -> float:
    """Share of tokens keeping their label between consecutive frames; NaN with one frame."""
    if labels.shape[0] < 2:
        return float("nan")
    return float((labels[1:] == labels[:-1]).double().mean())


def overlaps(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Slot overlaps of consecutive frames: (T-1, K, K), ``O[t, a, b]`` = token positions labelled
    a at frame t and b at frame t+1."""
    t = labels.shape[0]
    if t < 2:
        return torch.zeros(0, k, k, dtype=torch.float64)
    pair = labels[:-1].long() * k + labels[1:].long()  # (T-1, N)
    index = pair + torch.arange(t - 1)[:, None] * (k * k)
    return (
        torch.bincount(index.reshape(-1), minlength=(t - 1) * k * k).reshape(t - 1, k, k).double()
    )


def best_matchings(labels: torch.Tensor, k: int) -> np.ndarray:
    """For each consecutive frame pair, where each slot of frame t goes in frame t+1: (T-1, K).

    The one-to-one matching of largest total overlap (Hungarian); among equally good matchings the
    one keeping most slots in place (a bonus below one token shared over the diagonal)."""
    table = overlaps(labels, k).numpy()
    bonus = np.eye(k) / (k + 1)  # total < 1 token: breaks ties only, overlaps are integer counts
    out = np.empty((table.shape[0], k), dtype=np.int64)
    for t, o in enumerate(table):
        rows, cols = linear_sum_assignment(o + bonus, maximize=True)
        out[t, rows] = cols
    return out


def identity_best(labels: torch.Tensor, k: int, matchings: np.ndarray | None = None) -> float:
    """Share of consecutive frame pairs whose best slot matching is the identity; NaN with one
    frame. ``matchings``: :func:`best_matchings` of these labels when already computed."""
    if labels.shape[0] < 2:
        return float("nan")
    match = best_matchings(labels, k) if matchings is None else matchings
    return float((match == np.arange(k)).all(axis=1).mean())


def active(labels: torch.Tensor, k: int, min_share: float = ACTIVE_SHARE) -> torch.Tensor:
    """Which slots are active in each frame: (T, K) bool, winning >= ``min_share`` of its tokens."""
    counts = torch.nn.functional.one_hot(labels.long(), k).sum(dim=1)  # (T, K)
    return counts >= max(min_share * labels.shape[1], 1e-9)


def active_slots(labels: torch.Tensor, k: int, min_share: float = ACTIVE_SHARE) -> float:
    """Mean over frames of the number of active slots (:func:`active`)."""
    return float(active(labels, k, min_share).sum(dim=1).double().mean())


def run_lengths(
    labels: torch.Tensor,
    k: int,
    min_share: float = ACTIVE_SHARE,
    matchings: np.ndarray | None = None,
) -> list[int]:
    """Lengths in frames of every run of every slot on one object (module docstring)."""
    on = active(labels, k, min_share).numpy()  # (T, K)
    match = best_matchings(labels, k) if matchings is None else matchings
    keeps = match == np.arange(k)  # (T-1, K): slot k matched to itself
    runs = []
    for slot in range(k):
        length = 0
        for t in range(on.shape[0]):
            if not on[t, slot]:
                if length:
                    runs.append(length)
                length = 0
                continue
            if length and not keeps[t - 1, slot]:  # a switch between t-1 and t
                runs.append(length)
                length = 0
            length += 1
        if length:
            runs.append(length)
    return runs


def run_length(
    labels: torch.Tensor,
    k: int,
    min_share: float = ACTIVE_SHARE,
    matchings: np.ndarray | None = None,
) -> float:
    """Mean of :func:`run_lengths`; NaN when no slot is ever active."""
    runs = run_lengths(labels, k, min_share, matchings)
    return float(np.mean(runs)) if runs else float("nan")


def mask_entropy(masks: torch.Tensor) -> float:
    """Mean per-token entropy of soft masks over slots, divided by log K (0 one-hot, 1 uniform)."""
    _check_masks(masks)
    k = masks.shape[1]
    if k < 2:
        return 0.0
    p = masks.double().clamp_min(0)
    p = p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)
    ent = -(p * p.clamp_min(1e-12).log()).sum(dim=1)  # (T, N)
    return float(ent.mean() / math.log(k))


def reconstruction_error(reconstruction: torch.Tensor, features: torch.Tensor) -> dict:
    """{feature_rec_mse, feature_rec_rel} of a reconstruction (T, N, D) of features (T, N, D)."""
    if reconstruction.shape != features.shape:
        raise ValueError(
            f"reconstruction {tuple(reconstruction.shape)} and features {tuple(features.shape)} "
            "differ in shape"
        )
    x = features.float()  # float32 arithmetic, float64 sums: large videos stay fast
    err = (reconstruction.float() - x).pow(2).sum(dtype=torch.float64)
    spread = (x - x.reshape(-1, x.shape[-1]).mean(dim=0, dtype=torch.float64).float()).pow(2)
    spread = spread.sum(dtype=torch.float64)
    return {
        "feature_rec_mse": float(err / x.numel()),
        "feature_rec_rel": float(err / spread) if spread > 0 else float("nan"),
    }


def partition_reconstruction(features: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """A partition's reconstruction of features (T, N, D): each token replaced by the mean feature
    of its cluster over the whole video (k-means' centroids, in the cached features' own space)."""
    x = features.reshape(-1, features.shape[-1])
    ids = labels.reshape(-1).long()
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, ids, x.double())
    counts = torch.bincount(ids, minlength=k).clamp_min(1).double()
    return (sums / counts[:, None]).to(features.dtype)[ids].reshape(features.shape)


def unflip_labels(labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Labels (T, N) of horizontally flipped frames -> the same labels at the unflipped positions."""
    h, w = grid
    if h * w != labels.shape[1]:
        raise ValueError(f"grid {h}x{w} does not hold {labels.shape[1]} tokens")
    return labels.reshape(-1, h, w).flip(-1).reshape(labels.shape)


def flip_agreement(labels: torch.Tensor, flipped: torch.Tensor, grid: tuple[int, int]) -> float:
    """Mean over frames of the ARI between labels (T, N) of a frame and labels (T, N) of its
    horizontal flip, mirrored back (:func:`unflip_labels`): 1 = the same grouping whatever the
    slot indices (per frame, so ids that change over time, as k-means per frame's, do not count)."""
    back = unflip_labels(flipped, grid).long()
    t = labels.shape[0]
    _, back = torch.unique(back.reshape(-1), return_inverse=True)
    frame = torch.arange(t)[:, None].expand(t, labels.shape[1])
    table, _ = contingency(labels, back, int(back.max()) + 1, frame, t)
    return float(ari_from_table(table).mean())


def video_numbers(
    masks: torch.Tensor,
    features: torch.Tensor | None = None,
    reconstruction: torch.Tensor | None = None,
    flipped_masks: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    min_share: float = ACTIVE_SHARE,
    tol: float = 0.0,
    labels: torch.Tensor | None = None,
    flipped_labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Every label-free number of one method on one video.

    masks (T, K, N); with ``features`` (T, N, D) the reconstruction error of ``reconstruction``
    (T, N, D), or of the masks' hard partition when None; with ``flipped_masks`` (T, K, N) (the
    method on the flipped frames) and ``grid`` (h, w), the flip agreement. Hard labels:
    ``labels`` (T, N) where the caller has them (``--track match``: the tracker's, which
    :func:`sticky_labels` reproduces), else :func:`labels_of` with ``tol`` (likewise
    ``flipped_labels``). Numbers that cannot be computed are left out (the table shows n/a)."""
    _check_masks(masks)
    k = masks.shape[1]
    labels = labels_of(masks, tol) if labels is None else labels.long()
    match = best_matchings(labels, k)  # (T-1, K), shared by the two numbers below
    out = {
        "token_stability": token_stability(labels),
        "identity_best": identity_best(labels, k, match),
        "run_length": run_length(labels, k, min_share, match),
        "active_slots": active_slots(labels, k, min_share),
        "mask_entropy": mask_entropy(masks),
    }
    if features is not None:
        if reconstruction is None:
            reconstruction = partition_reconstruction(features, labels, k)
        out.update(reconstruction_error(reconstruction, features))
    if flipped_masks is not None and grid is not None:
        if flipped_labels is None:
            flipped_labels = labels_of(flipped_masks, tol)
        out["flip_agreement"] = flip_agreement(labels, flipped_labels.long(), grid)
    return out
