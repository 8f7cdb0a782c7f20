"""Split each slot's mask into its connected parts, and follow each part through the video.

Why: a slot that holds two objects standing apart (two small objects of one colour, an object
and a floor patch that look alike to the encoder) scores as one segment, and refinement to
pixels cannot split it: on the discovery bench most objects with a poor best overlap are held
by a slot that mostly holds *other* objects (docs/discovery.md). Where those parts do not touch,
the slot's own mask already says they are two things. Splitting is label-free and costs no
training: every connected part of a slot's hard mask in a frame becomes a segment of its own,
and a part is linked to the part of the same slot it continues in the previous frame, so the
segments keep their identity over time as the slots do.

How, per video, on any grid (the token grid, or pixels):
- each position goes to its most likely slot; a slot's positions in a frame form connected
  parts (8-connectivity); parts under ``min_size`` positions join the nearest larger part of
  their slot (they are speckle, not objects);
- within each slot, parts are linked frame to frame to the slot's tracks by an assignment on
  centre distance, a part that overlaps a track's last part counting as distance 0; parts beyond
  the slot's track count start new tracks. A slot with one part therefore keeps one track
  however far it moves, and a slot is split only where it holds parts apart in one frame;
- the output has one channel per track: the slot's soft mass at every position of the frame,
  given to the track whose part is nearest there, so refinement (``pipeline/refine.py``) still
  sees soft masks and fits one colour model per track.

This is a post-processing of the slots' masks, as refinement is; nothing published computes
exactly this. ``evaluate`` reports split masks beside unsplit ones, and applies the same split
to the baselines so the comparison stays fair.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def frame_parts(hard: np.ndarray, k: int, min_size: int) -> list[list[np.ndarray]]:
    """Connected parts of each slot in one frame: hard (h, w) slot ids -> per slot, a list of
    boolean (h, w) part masks, largest first; parts under ``min_size`` join the nearest larger
    part of their slot (or, where the slot has none, the largest of its small ones)."""
    parts: list[list[np.ndarray]] = []
    for slot in range(k):
        labels, count = ndimage.label(hard == slot, structure=EIGHT_CONNECTED)
        if count == 0:
            parts.append([])
            continue
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        order = np.argsort(-sizes, kind="stable")
        big = [i + 1 for i in order if sizes[i] >= min_size] or [order[0] + 1]
        small = [i + 1 for i in order if i + 1 not in big]
        if small:  # each small part joins the big part whose nearest position is closest
            # distance to each big part, then the index of the closest one at every position
            dist = np.stack([ndimage.distance_transform_edt(labels != b) for b in big])
            nearest = np.asarray(big)[dist.argmin(0)]
            for s in small:
                labels[labels == s] = nearest[labels == s]
        parts.append([labels == b for b in big])
    return parts


def centre(mask: np.ndarray) -> np.ndarray:
    """Mean (y, x) of a boolean mask's positions."""
    return np.argwhere(mask).mean(0)


def split_components(
    masks: torch.Tensor, grid: tuple[int, int], min_size: int = 1, with_slots: bool = False
) -> torch.Tensor | tuple[torch.Tensor, list[int]]:
    """Soft masks of one video (T, K, N) on ``grid`` -> soft masks (T, K', N), one channel per
    tracked connected part, K' >= K: channel k is slot k's first track (so a slot that is never
    split keeps its index and its mass), and the parts split off follow after channel K - 1.
    ``with_slots``: also return each channel's slot (a list of K' slot indices)."""
    t, k, n = masks.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"grid {h}x{w} does not hold {n} positions")
    soft = masks.detach().float().cpu().clamp_min(0)  # scipy labels parts on the CPU
    soft = soft / soft.sum(1, keepdim=True).clamp_min(1e-6)
    hard = soft.argmax(1).reshape(t, h, w).numpy()
    parts_of = [frame_parts(hard[f], k, min_size) for f in range(t)]  # [frame][slot] -> parts
    # (slot, (T, N) share of that slot's mass); the first K are the slots' first tracks
    channels = [(slot, np.zeros((t, n), np.float32)) for slot in range(k)]
    for slot in range(k):
        tracks: list[dict] = []  # each: {"mask": its last part (h, w), "centre", "channel"}
        first_channel = slot
        for f in range(t):
            parts = parts_of[f][slot]
            if not parts:  # the slot holds no position here: its mass stays on its first channel
                channels[first_channel][1][f] = 1.0
                continue
            ids = []
            for part, track in zip(parts, assign_parts(parts, tracks)):
                if track is None:  # a new track; the slot's first one takes its first channel
                    idx = first_channel if not tracks else len(channels)
                    if idx != first_channel:
                        channels.append((slot, np.zeros((t, n), np.float32)))
                    tracks.append({"channel": idx})
                    track = len(tracks) - 1
                tracks[track].update(mask=part, centre=centre(part))
                ids.append(tracks[track]["channel"])
            # every position of the frame goes to this slot's nearest part
            dist = np.stack([ndimage.distance_transform_edt(~p) for p in parts])  # (parts, h, w)
            nearest = dist.argmin(0).ravel()
            for j, idx in enumerate(ids):
                channels[idx][1][f] = nearest == j
    out = torch.zeros(t, len(channels), n)
    for c, (slot, weight) in enumerate(channels):
        out[:, c] = soft[:, slot] * torch.from_numpy(weight)
    if with_slots:
        return out.to(masks.device), [slot for slot, _ in channels]
    return out.to(masks.device)


def segment_ids(parts: torch.Tensor, slots: list[int], num_slots: int) -> torch.Tensor:
    """Each position's segment from split masks (T, K', N) and their channels' slots: the
    winning channel as ``slot + num_slots * part``, ``part`` counting that slot's tracks from 0,
    so ``id % num_slots`` is the slot and ids below ``num_slots`` are the slots' first parts
    (the ids a slot that is never split keeps). -> (T, N) int64."""
    seen = [0] * num_slots
    code = []
    for slot in slots:  # the channel's code, in channel order (a slot's first track first)
        code.append(slot + num_slots * seen[slot])
        seen[slot] += 1
    return torch.tensor(code, dtype=torch.int64)[parts.argmax(1).cpu()]


def assign_parts(parts: list[np.ndarray], tracks: list[dict]) -> list[int | None]:
    """Track index for each part of a slot (None: a new track), by an assignment minimising the
    distance between a part's centre and a track's last part's centre (0 where they overlap;
    each track carries its last part's ``mask`` and ``centre``).
    Parts beyond the slot's track count start new tracks."""
    if not tracks:
        return [None] * len(parts)
    cost = np.zeros((len(parts), len(tracks)))
    for i, part in enumerate(parts):
        part_centre = centre(part)
        for j, track in enumerate(tracks):
            if not (part & track["mask"]).any():
                cost[i, j] = np.linalg.norm(part_centre - track["centre"])
    owner: list[int | None] = [None] * len(parts)
    for i, j in zip(*linear_sum_assignment(cost)):
        owner[i] = int(j)
    return owner
