"""Splitting slots into tracked connected parts (pipeline/components.py)."""

import pytest
import torch

from egoslots.pipeline.components import split_components
from egoslots.pipeline.metrics import evaluate_masks


def two_blob_video(frames: int = 4, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot 0 holds two 2x2 blobs far apart (one moving right, one moving left), slot 1 the
    rest; the true labels give each blob its own object. -> masks (T, 2, N), labels (T, H, W)."""
    masks = torch.zeros(frames, 2, size * size)
    labels = torch.zeros(frames, size, size, dtype=torch.long)
    for f in range(frames):
        labels[f, 1:3, f : f + 2] = 1
        labels[f, 5:7, 5 - f : 7 - f] = 2
        blobs = (labels[f] > 0).float().flatten()
        masks[f, 0], masks[f, 1] = 0.9 * blobs + 0.05, 0.95 - 0.9 * blobs
    return masks, labels


def test_parts_of_one_slot_become_segments_that_keep_their_identity():
    masks, labels = two_blob_video()
    parts = split_components(masks, (8, 8))
    assert parts.shape == (4, 3, 64)  # the background slot, and one channel per blob
    assert torch.allclose(parts[:, 1], masks[:, 1])  # an unsplit slot keeps its index and mass
    assert torch.allclose(parts[:, 0] + parts[:, 2], masks[:, 0])  # the split one's parts after
    ids = parts.argmax(1).reshape(4, 8, 8)
    for f in range(4):  # each blob one segment, the same one in every frame
        assert ids[f][labels[f] == 1].unique().tolist() == ids[0][labels[0] == 1].unique().tolist()
        assert ids[f][labels[f] == 2].unique().tolist() == ids[0][labels[0] == 2].unique().tolist()
    assert ids[0][labels[0] == 1].unique() != ids[0][labels[0] == 2].unique()
    # the unsplit slot merges the two objects; the split separates them
    assert evaluate_masks(masks, labels, (8, 8))["video_fg_ari"] == pytest.approx(0.0)
    assert evaluate_masks(parts, labels, (8, 8))["video_fg_ari"] == pytest.approx(1.0)


def test_split_keeps_each_slots_mass_and_leaves_whole_slots_alone():
    masks, _ = two_blob_video()
    parts = split_components(masks, (8, 8))
    assert torch.allclose(parts.sum(1), torch.ones(4, 64))  # soft masks still sum to one
    whole = torch.zeros(3, 2, 16)
    whole[:, 0, :8], whole[:, 1, 8:] = 1, 1  # two slots, each one connected half
    assert torch.equal(split_components(whole, (4, 4)), whole)


def test_a_slot_with_one_part_keeps_one_track_however_far_it_jumps():
    masks = torch.zeros(2, 2, 64)
    masks[:, 1] = 1
    masks[0, :, 0] = torch.tensor([1.0, 0.0])  # top-left corner in frame 0
    masks[1, :, 63] = torch.tensor([1.0, 0.0])  # bottom-right corner in frame 1
    assert split_components(masks, (8, 8)).shape[1] == 2


def test_speckle_under_min_size_joins_its_slots_larger_part():
    masks = torch.zeros(1, 2, 64)
    masks[0, 1] = 1
    block = torch.zeros(8, 8)
    block[0:3, 0:3] = 1
    block[6, 6] = 1  # one stray position of slot 0
    masks[0, 0], masks[0, 1] = block.flatten(), 1 - block.flatten()
    assert split_components(masks, (8, 8)).shape[1] == 3
    kept = split_components(masks, (8, 8), min_size=2)
    assert kept.shape[1] == 2
    assert kept.argmax(1)[0, 6 * 8 + 6] == kept.argmax(1)[0, 0]  # the speckle stays with slot 0


def test_a_grid_that_does_not_hold_the_masks_is_refused():
    with pytest.raises(ValueError, match="does not hold"):
        split_components(torch.ones(1, 2, 10), (3, 3))
