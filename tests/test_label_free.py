"""Label-free numbers (pipeline/label_free.py) on hand-made masks whose answers are known."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from egoslots.pipeline import label_free as lf
from egoslots.pipeline.metrics import adjusted_rand_index


def one_hot(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Labels (T, N) -> one-hot masks (T, K, N)."""
    return F.one_hot(labels.long(), k).permute(0, 2, 1).float()


def halves(t: int, swap_at: int | None = None) -> torch.Tensor:
    """Two slots over 4 tokens: slot 0 on tokens 0-1, slot 1 on 2-3; swapped from ``swap_at``."""
    labels = torch.tensor([0, 0, 1, 1]).repeat(t, 1)
    if swap_at is not None:
        labels[swap_at:] = 1 - labels[swap_at:]
    return labels


def test_constant_labelling_is_perfectly_stable():
    labels = torch.tensor([0, 0, 2, 2, 2, 3]).repeat(5, 1)  # slot 1 never used
    out = lf.video_numbers(one_hot(labels, 4))
    assert out["token_stability"] == 1.0 and out["identity_best"] == 1.0
    assert out["run_length"] == 5.0  # slots 0, 2, 3: one run of all 5 frames each
    assert out["active_slots"] == 3.0
    assert out["mask_entropy"] == 0.0


def test_slots_swapping_at_frame_3():
    t = 6
    labels = halves(t, swap_at=3)
    assert lf.token_stability(labels) == pytest.approx((t - 2) / (t - 1))
    assert lf.identity_best(labels, 2) == pytest.approx((t - 2) / (t - 1))
    # each slot: frames 0-2 on one object, then 3-5 on the other
    assert sorted(lf.run_lengths(labels, 2)) == [3, 3, 3, 3]
    assert lf.run_length(labels, 2) == 3.0
    assert lf.best_matchings(labels, 2)[2].tolist() == [1, 0]


def test_a_moving_object_followed_by_its_slot_is_no_switch():
    """Tokens change label as the object moves, but the slot keeps the object: identity best."""
    t, n = 5, 12
    labels = torch.zeros(t, n, dtype=torch.long)
    for f in range(t):
        labels[f, 2 * f : 2 * f + 3] = 1  # a 3-token object moving 2 tokens a frame
    assert lf.token_stability(labels) < 1.0
    assert lf.identity_best(labels, 3) == 1.0
    assert lf.run_length(labels, 3) == t  # slots 0 and 1, one run each; slot 2 never active


def test_inactive_slots_and_the_share_threshold():
    labels = torch.zeros(4, 100, dtype=torch.long)
    labels[:, :30] = 1
    labels[:, 30] = 2  # 1% of the tokens: below the 2% threshold
    assert lf.active_slots(labels, 3) == 2.0
    assert lf.active_slots(labels, 3, min_share=0.01) == 3.0
    # a slot that goes inactive for a frame ends its run
    labels[2, :30] = 0
    runs = lf.run_lengths(labels, 3)
    assert sorted(runs) == [1, 2, 4]  # slot 0 for all 4 frames; slot 1 frames 0-1 and 3


def test_identity_ties_are_not_switches():
    """A slot with no tokens in either frame can be matched anywhere: the identity is kept."""
    labels = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    assert lf.identity_best(labels, 4) == 1.0
    assert (lf.best_matchings(labels, 4) == np.arange(4)).all()


def test_mask_entropy_is_normalised():
    k = 5
    uniform = torch.full((3, k, 7), 1.0 / k)
    assert lf.mask_entropy(uniform) == pytest.approx(1.0)
    two = torch.zeros(3, k, 7)
    two[:, :2] = 0.5
    assert lf.mask_entropy(two) == pytest.approx(math.log(2) / math.log(k))


def test_reconstruction_error_and_the_partition_reconstruction():
    torch.manual_seed(0)
    feats = torch.randn(4, 6, 3)
    assert lf.reconstruction_error(feats, feats) == {"feature_rec_mse": 0.0, "feature_rec_rel": 0.0}
    mean = feats.reshape(-1, 3).mean(0).expand_as(feats)
    assert lf.reconstruction_error(mean, feats)["feature_rec_rel"] == pytest.approx(1.0)
    # one cluster: the partition reconstruction is the video's mean feature
    one = lf.partition_reconstruction(feats, torch.zeros(4, 6, dtype=torch.long), 3)
    assert torch.allclose(one, mean, atol=1e-6)
    # two exact clusters: perfect reconstruction, and never worse than one mean
    centres = torch.tensor([[1.0, 0, 0], [0, 2.0, 0]])
    labels = torch.randint(0, 2, (4, 6))
    exact = centres[labels]
    assert lf.video_numbers(one_hot(labels, 2), exact)["feature_rec_rel"] == pytest.approx(0.0)
    noisy = lf.video_numbers(one_hot(labels, 2), exact + 0.1 * feats)["feature_rec_rel"]
    assert 0 < noisy < 0.1
    with pytest.raises(ValueError, match="differ in shape"):
        lf.reconstruction_error(feats[:2], feats)


def test_flip_agreement_ignores_slot_indices():
    grid = (2, 3)
    labels = torch.tensor([[0, 0, 1, 2, 2, 1], [0, 1, 1, 2, 2, 2]])
    mirrored = labels.reshape(2, 2, 3).flip(-1).reshape(2, 6)
    relabelled = (mirrored + 1) % 3  # the flipped run numbered its slots differently
    assert lf.flip_agreement(labels, relabelled, grid) == pytest.approx(1.0)
    assert lf.flip_agreement(labels, labels, grid) < 1.0  # not mirrored back: disagrees
    # per frame: slot ids that change from frame to frame (k-means per frame) still agree
    per_frame = relabelled.clone()
    per_frame[1] = (per_frame[1] + 1) % 3
    assert lf.flip_agreement(labels, per_frame, grid) == pytest.approx(1.0)
    # one frame grouped differently: the mean of 1 and that frame's ARI
    other = relabelled.clone()
    other[1] = torch.tensor([0, 0, 0, 1, 1, 1])
    half = lf.flip_agreement(labels, other, grid)
    assert half == pytest.approx(
        (1 + adjusted_rand_index(labels[1], lf.unflip_labels(other, grid)[1])) / 2
    )
    out = lf.video_numbers(one_hot(labels, 3), flipped_masks=one_hot(relabelled, 3), grid=grid)
    assert out["flip_agreement"] == pytest.approx(1.0)
    assert "feature_rec_rel" not in out  # no features given: left out


def test_one_frame_and_bad_shapes():
    out = lf.video_numbers(one_hot(torch.tensor([[0, 1, 1]]), 2))
    assert math.isnan(out["token_stability"]) and math.isnan(out["identity_best"])
    assert out["run_length"] == 1.0
    with pytest.raises(ValueError, match=r"\(T, K, N\)"):
        lf.video_numbers(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="grid"):
        lf.unflip_labels(torch.zeros(2, 6, dtype=torch.long), (2, 2))
