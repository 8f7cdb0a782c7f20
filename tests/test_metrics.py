"""Metrics against scikit-learn and hand-computed cases; baselines' shapes and sanity."""

import time

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from egoslots.pipeline import baselines, metrics


def onehot_masks(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Label maps (T, h, w) -> one-hot masks (T, K, h*w)."""
    t = labels.shape[0]
    return torch.nn.functional.one_hot(labels.reshape(t, -1).long(), k).permute(0, 2, 1).float()


@pytest.mark.parametrize("seed", range(8))
def test_ari_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 500))
    true = rng.integers(0, int(rng.integers(1, 8)), n)
    pred = rng.integers(0, int(rng.integers(1, 8)), n)
    if seed % 2:  # correlated labelings, not only chance-level ones
        pred = np.where(rng.random(n) < 0.7, true * 3 % 5, pred)
    assert metrics.adjusted_rand_index(true, pred) == pytest.approx(
        adjusted_rand_score(true, pred), abs=1e-6
    )


@pytest.mark.parametrize("seed", range(4))
def test_fg_ari_is_sklearn_on_foreground(seed):
    rng = np.random.default_rng(100 + seed)
    true = torch.from_numpy(rng.integers(0, 5, (3, 16, 16)))
    pred = torch.from_numpy(rng.integers(0, 6, (3, 16, 16)))
    pred = torch.where(
        torch.rand(true.shape, generator=torch.Generator().manual_seed(seed)) < 0.6, true, pred
    )
    fg = true.numpy() > 0
    expected = adjusted_rand_score(true.numpy()[fg], pred.numpy()[fg])
    assert metrics.fg_ari(true, pred, 6) == pytest.approx(expected, abs=1e-6)
    # per-frame FG-ARI is the mean of sklearn on each frame's foreground
    out = metrics.video_metrics(pred, true, 6)
    per_frame = [
        adjusted_rand_score(true[i].numpy()[fg[i]], pred[i].numpy()[fg[i]]) for i in range(3)
    ]
    assert out["frame_fg_ari"] == pytest.approx(np.mean(per_frame), abs=1e-6)
    assert out["video_fg_ari"] == pytest.approx(expected, abs=1e-6)
    assert out["video_ari"] == pytest.approx(
        adjusted_rand_score(true.flatten(), pred.flatten()), abs=1e-6
    )
    frame_full = [adjusted_rand_score(true[i].flatten(), pred[i].flatten()) for i in range(3)]
    assert out["frame_ari"] == pytest.approx(np.mean(frame_full), abs=1e-6)


def test_perfect_prediction_and_slot_permutation():
    gen = torch.Generator().manual_seed(0)
    true = torch.randint(0, 4, (4, 8, 8), generator=gen)
    masks = onehot_masks(true, 6)
    out = metrics.evaluate_masks(masks, true)
    assert out["video_fg_ari"] == pytest.approx(1.0)
    # background 0 is a "slot" too here, so every object is matched exactly
    assert out["video_mbo"] == pytest.approx(1.0) and out["video_miou"] == pytest.approx(1.0)
    assert out["frame_mbo"] == pytest.approx(1.0)
    perm = torch.tensor([5, 3, 0, 1, 4, 2])
    shuffled = metrics.evaluate_masks(masks[:, perm], true)
    for key in metrics.METRICS:
        assert shuffled[key] == pytest.approx(out[key])
    # soft masks with the same argmax give the same result
    soft = torch.softmax(masks * 5 + 0.1 * torch.randn(masks.shape, generator=gen), dim=1)
    assert metrics.evaluate_masks(soft, true)["video_fg_ari"] == pytest.approx(1.0)


def test_foreground_split_lowers_ari_but_background_errors_do_not():
    true = torch.zeros(1, 4, 4, dtype=torch.long)
    true[0, :2] = 1
    pred = torch.zeros_like(true)
    pred[0, 2:] = 1  # background differs: FG-ARI ignores it
    assert metrics.fg_ari(true, pred, 2) == 1.0
    pred[0, 0, :2] = 1  # now the object is split over two slots
    assert metrics.fg_ari(true, pred, 2) < 0.5


def test_single_object_and_empty_ground_truth():
    true = torch.zeros(2, 4, 4, dtype=torch.long)
    true[:, 1:3, 1:3] = 7  # one object, label 7
    pred = torch.zeros_like(true)
    pred[:, 1:3, 1:3] = 2
    out = metrics.video_metrics(pred, true, 3)
    assert out["num_objects"] == 1 and out["video_fg_ari"] == 1.0
    assert out["video_mbo"] == pytest.approx(1.0)
    # one object split over two slots: one true cluster, two predicted ones (sklearn agrees)
    pred[:, 1, 1:3] = 1
    fg = true > 0
    assert metrics.fg_ari(true, pred, 3) == pytest.approx(
        adjusted_rand_score(true[fg], pred[fg]), abs=1e-9
    )
    # all background: FG-ARI is 1 by the denominator rule, mBO / mIoU are NaN (no objects)
    empty = metrics.video_metrics(pred, torch.zeros_like(true), 3)
    assert empty["video_fg_ari"] == 1.0 and empty["empty_frames"] == 2 and empty["num_objects"] == 0
    assert (
        np.isnan(empty["video_mbo"])
        and np.isnan(empty["video_miou"])
        and np.isnan(empty["frame_mbo"])
    )


def test_mbo_and_miou_hand_computed():
    # 1 frame of 4x4: object 1 = left half (8 px), object 2 = top-right quadrant (4 px)
    true = torch.zeros(1, 4, 4, dtype=torch.long)
    true[0, :, :2] = 1
    true[0, :2, 2:] = 2
    # slot 0: left half + top-right quadrant (12 px); slot 1: bottom-right quadrant (4 px)
    pred = torch.zeros_like(true)
    pred[0, 2:, 2:] = 1
    out = metrics.video_metrics(pred, true, 2)
    # IoU(obj1, s0) = 8/12, IoU(obj2, s0) = 4/12, both with s1 = 0
    assert out["video_mbo"] == pytest.approx((8 / 12 + 4 / 12) / 2)
    # Hungarian: only one slot overlaps; obj1 gets s0, obj2 gets s1 (IoU 0)
    assert out["video_miou"] == pytest.approx((8 / 12 + 0) / 2)


def test_video_mbo_uses_volume_and_frame_mbo_per_frame():
    # object 1 sits in slot 0 on frame 0 and slot 1 on frame 1: each frame is perfect, the video is not
    true = torch.zeros(2, 2, 2, dtype=torch.long)
    true[:, 0] = 1
    pred = torch.zeros_like(true)
    pred[0, 1] = 1  # frame 0: object -> slot 0, background -> slot 1
    pred[1, 0] = 1  # frame 1: object -> slot 1, background -> slot 0
    out = metrics.video_metrics(pred, true, 2)
    assert out["frame_mbo"] == pytest.approx(1.0) and out["frame_fg_ari"] == pytest.approx(1.0)
    assert out["video_mbo"] == pytest.approx(2 / 6)  # intersection 2, union 4 + 4 - 2
    assert out["video_fg_ari"] < 0.01


def test_masks_are_resized_bilinearly_to_ground_truth():
    # a 2x2 grid of slots resized to 8x8: every 4x4 quadrant takes its slot
    masks = torch.eye(4).reshape(1, 4, 4)  # (T=1, K=4, N=4), slot k = token k
    labels = metrics.masks_to_labels(masks, (8, 8))
    assert labels.shape == (1, 8, 8)
    assert (
        labels[0, 0, 0] == 0
        and labels[0, 0, 7] == 1
        and labels[0, 7, 0] == 2
        and labels[0, 7, 7] == 3
    )
    assert (labels[0, :4, :4] == 0).all()
    with pytest.raises(ValueError, match="grid"):
        metrics.masks_to_labels(torch.rand(1, 3, 6), (8, 8))


def test_speed_24_frames_128px():
    gen = torch.Generator().manual_seed(0)
    true = torch.randint(0, 11, (24, 128, 128), generator=gen).to(torch.uint8)
    masks = torch.rand(24, 11, 64, generator=gen)
    start = time.perf_counter()
    out = metrics.evaluate_masks(masks, true)
    assert time.perf_counter() - start < 2.0
    assert 0 <= out["video_mbo"] <= 1


def test_summarize_ignores_nan():
    s = metrics.summarize([0.5, float("nan"), 1.0])
    assert s == {"mean": 0.75, "std": 0.25, "n": 2}


def test_frame_metrics_average_over_all_frames_as_slotcontrast():
    """Two videos of 1 and 3 frames: the data-set frame FG-ARI is the mean over the 4 frames
    (SlotContrast's ImageARI); the mean of the two per-video means has its own name."""
    rng = np.random.default_rng(7)
    videos = []
    for t in (1, 3):
        true = torch.from_numpy(rng.integers(0, 4, (t, 12, 12)))
        pred = torch.from_numpy(rng.integers(0, 5, (t, 12, 12)))
        pred = torch.where(torch.from_numpy(rng.random((t, 12, 12)) < 0.5), true, pred)
        videos.append((true, pred))
    true_last = videos[1][0].clone()
    true_last[1] = 0  # one frame without any object: counts in FG-ARI (= 1), not in mBO
    videos[1] = (true_last, videos[1][1])
    per_video: dict[str, list] = {}
    for true, pred in videos:
        for key, value in metrics.video_metrics(pred, true, 5).items():
            per_video.setdefault(key, []).append(value)
    summary = metrics.summarize_videos(per_video)

    def fg_ari(true, pred):
        fg = true.numpy() > 0
        if not fg.any():
            return 1.0
        return adjusted_rand_score(true.numpy()[fg], pred.numpy()[fg])

    def mbo(true, pred):
        ious = []
        for c in np.unique(true.numpy()):
            if c == 0:
                continue
            t = true.numpy() == c
            ious.append(
                max(
                    ((t & (pred.numpy() == k)).sum() / (t | (pred.numpy() == k)).sum())
                    for k in range(5)
                )
            )
        return np.mean(ious) if ious else None

    frames = [(true[i], pred[i]) for true, pred in videos for i in range(true.shape[0])]
    per_frame_ari = [fg_ari(t, p) for t, p in frames]
    per_frame_mbo = [m for m in (mbo(t, p) for t, p in frames) if m is not None]
    assert len(per_frame_ari) == 4 and len(per_frame_mbo) == 3
    assert summary["frame_fg_ari"]["mean"] == pytest.approx(np.mean(per_frame_ari), abs=1e-9)
    assert summary["frame_fg_ari"]["std"] == pytest.approx(np.std(per_frame_ari), abs=1e-9)
    assert summary["frame_fg_ari"]["n"] == 4
    assert summary["frame_mbo"]["mean"] == pytest.approx(np.mean(per_frame_mbo), abs=1e-9)
    assert summary["frame_mbo"]["n"] == 3
    video_means = [np.mean(per_frame_ari[:1]), np.mean(per_frame_ari[1:])]
    assert summary["frame_fg_ari_per_video"]["mean"] == pytest.approx(np.mean(video_means))
    assert summary["frame_fg_ari_per_video"]["n"] == 2
    assert abs(summary["frame_fg_ari"]["mean"] - np.mean(video_means)) > 1e-3  # they differ here
    # video metrics stay one value per video
    assert summary["video_fg_ari"]["n"] == 2
    assert summary["video_fg_ari"]["mean"] == pytest.approx(
        np.mean([fg_ari(t, p) for t, p in videos])
    )


# ---------------------------------------------------------------------------------- baselines
def test_kmeans_separates_clusters_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=gen) * 10
    ids = torch.arange(60) % 3
    x = centres[ids] + 0.1 * torch.randn(60, 8, generator=gen)
    out = baselines.kmeans(x[None], 3, seed=1)[0]
    assert adjusted_rand_score(ids.numpy(), out.numpy()) == pytest.approx(1.0)
    assert torch.equal(out, baselines.kmeans(x[None], 3, seed=1)[0])


def test_kmeans_restarts_keep_the_lowest_inertia_run():
    """n_init: several seeded runs, the lowest inertia kept per row; run 0 is the n_init=1 result."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200, 2, generator=g)  # no clear clusters: runs disagree
    runs = [baselines.kmeans(x, 5, seed=s) for s in range(6)]
    inertia = torch.stack([baselines._inertia(x, r, 5) for r in runs])  # (runs, B)
    best = baselines.kmeans(x, 5, seed=0, n_init=6)
    for b in range(3):
        assert torch.equal(best[b], runs[int(inertia[:, b].argmin())][b])
    assert torch.equal(baselines.kmeans(x, 5, seed=0, n_init=1), runs[0])
    assert (inertia.min(0).values < inertia[0]).any()  # restarts found a better clustering


def test_kmeans_masks_shapes_and_video_consistency():
    gen = torch.Generator().manual_seed(0)
    # token n of every frame belongs to one of 2 fixed patterns: per-video clustering keeps ids
    pattern = torch.randn(2, 16, generator=gen)
    which = (torch.arange(16) >= 8).long()
    feats = pattern[which][None].repeat(5, 1, 1) + 0.01 * torch.randn(5, 16, 16, generator=gen)
    for per in ("frame", "video"):
        m = baselines.kmeans_masks(feats, 4, per=per)
        assert m.shape == (5, 4, 16)
        assert torch.equal(m.sum(1), torch.ones(5, 16))
    video = baselines.kmeans_masks(feats, 2, per="video").argmax(1)  # (T, N)
    assert (video == video[0]).all()
    true = which.reshape(1, 4, 4).repeat(5, 1, 1) + 1  # both halves are objects
    assert metrics.evaluate_masks(baselines.kmeans_masks(feats, 2, per="video"), true)[
        "video_fg_ari"
    ] == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 4, 7, 11])
def test_grid_masks_use_every_cell(k):
    m = baselines.grid_masks(3, k, (8, 8))
    assert m.shape == (3, k, 64)
    assert torch.equal(m.sum(1), torch.ones(3, 64))
    sizes = m[0].sum(1)
    assert (sizes > 0).all() and sizes.max() <= 2.5 * sizes.min()
