"""Colour-guided mask refinement (pipeline/refine.py): pixels back from token masks, and only
near where a slot already is."""

import numpy as np
import pytest
import torch

from egoslots.pipeline import metrics
from egoslots.pipeline.refine import refine_masks

SIZE, PATCH = 32, 8  # 4x4 token grid
GRID = (SIZE // PATCH, SIZE // PATCH)


def scene(frames: int = 3):
    """Grey textured floor with a red 6x6 square sliding right: frames (T, S, S, 3), labels."""
    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal(120, 6, (frames, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    labels = np.zeros((frames, SIZE, SIZE), np.int64)
    for t in range(frames):
        y, x = 5, 5 + 3 * t  # never aligned with the 8 px tokens
        rgb[t, y : y + 6, x : x + 6] = (220, 30, 30)
        labels[t, y : y + 6, x : x + 6] = 1
    return torch.from_numpy(rgb), torch.from_numpy(labels)


def token_fractions(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Perfect token masks: each label's share of each token, (T, K, N)."""
    onehot = torch.nn.functional.one_hot(labels, num_labels).permute(0, 3, 1, 2).float()
    return torch.nn.functional.avg_pool2d(onehot, PATCH).flatten(2)


def test_refinement_recovers_pixel_boundaries_that_tokens_lose():
    frames, labels = scene()
    masks = token_fractions(labels, 2)
    raw = metrics.masks_to_labels(masks, (SIZE, SIZE), GRID)
    fine = refine_masks(masks, frames, GRID)
    assert fine.shape == (3, 2, SIZE * SIZE)
    assert torch.allclose(fine.sum(1), torch.ones(3, SIZE * SIZE), atol=1e-5)
    refined = fine.argmax(1).reshape(3, SIZE, SIZE)
    raw_errors = int((raw != labels).sum())
    assert raw_errors > 20  # bilinear upsampling of 8 px tokens blurs a 6 px square
    assert int((refined != labels).sum()) == 0


def test_a_slot_never_claims_same_coloured_pixels_far_from_it():
    frames, labels = scene(frames=1)
    frames = frames.clone()
    frames[0, 24:30, 24:30] = torch.tensor([220, 30, 30], dtype=torch.uint8)  # a red twin far away
    masks = token_fractions(labels, 2)  # the slot holds only the first square
    refined = refine_masks(masks, frames, GRID).argmax(1).reshape(1, SIZE, SIZE)
    assert bool((refined[0, 24:30, 24:30] == 0).all())  # the twin stays with the floor's slot
    assert bool((refined[0][labels[0] == 1] == 1).all())


def test_frames_in_chunks_give_the_same_masks():
    frames, labels = scene(frames=5)
    masks = token_fractions(labels, 2) * 0.8 + 0.1  # soft, every slot everywhere
    whole = refine_masks(masks, frames, GRID, chunk=16)
    pieces = refine_masks(masks, frames, GRID, chunk=2)
    assert torch.allclose(whole, pieces, atol=1e-5)


def test_no_iterations_is_the_bilinear_upsampled_prior():
    frames, labels = scene()
    masks = token_fractions(labels, 2)
    prior = refine_masks(masks, frames, GRID, iterations=0).argmax(1).reshape(3, SIZE, SIZE)
    assert torch.equal(prior, metrics.masks_to_labels(masks, (SIZE, SIZE), GRID))


@pytest.mark.parametrize(
    "masks, frames, match",
    [
        (torch.rand(2, 3, 15), torch.zeros(2, 32, 32, 3, dtype=torch.uint8), "grid 4x4"),
        (torch.rand(2, 3, 16), torch.zeros(3, 32, 32, 3, dtype=torch.uint8), "do not match"),
    ],
)
def test_mismatched_inputs_are_named(masks, frames, match):
    with pytest.raises(ValueError, match=match):
        refine_masks(masks, frames, GRID)


def test_where_no_slot_holds_the_floor_the_upsampled_masks_still_decide():
    frames, _ = scene()
    share = 0.3 + 0.4 * torch.rand(
        3, 1, GRID[0] * GRID[1], generator=torch.Generator().manual_seed(0)
    )
    masks = torch.cat([share, 1 - share], 1)  # every slot between 0.3 and 0.7 everywhere
    prior = refine_masks(masks, frames, GRID, iterations=0, floor=0.9).argmax(1)
    assert torch.equal(
        prior.reshape(3, SIZE, SIZE), metrics.masks_to_labels(masks, (SIZE, SIZE), GRID)
    )
    assert bool((prior == 1).any())  # not everything in slot 0, as a flat prior would give


def plain_em(masks, frames, iterations: int = 8, reach: int = 1, floor: float = 0.05):
    """The refinement written out directly in float64 (the Gaussian not expanded, no chunks):
    what ``refine_masks`` must compute."""
    t, k, _ = masks.shape
    size = tuple(frames.shape[1:3])
    m = masks.double().reshape(t, k, *GRID)
    m = m / m.sum(1, keepdim=True).clamp_min(1e-6)
    near = torch.nn.functional.max_pool2d(m, 2 * reach + 1, stride=1, padding=reach) >= floor
    near |= ~near.any(1, keepdim=True)
    near = torch.nn.functional.interpolate(near.double(), size=size, mode="nearest") > 0
    up = torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)
    prior = torch.log(up.clamp_min(1e-4)).masked_fill(~near, -1e4)  # (T, K, H, W)
    c = frames.double().div(255).permute(0, 3, 1, 2)  # (T, 3, H, W)
    post = prior.softmax(1)
    for _ in range(iterations):
        weight = post.sum((0, 2, 3))
        mean = torch.einsum("tkhw,tchw->kc", post, c) / weight[:, None]
        var = (torch.einsum("tkhw,tchw->kc", post, c * c) / weight[:, None] - mean**2).clamp_min(
            1e-3
        )
        diff = c[:, None] - mean[None, :, :, None, None]  # (T, K, 3, H, W)
        ll = -0.5 * (diff**2 / var[None, :, :, None, None]).sum(2)
        post = (prior - 0.5 * torch.log(var).sum(1)[None, :, None, None] + ll).softmax(1)
    return post.flatten(2)


@pytest.mark.parametrize("cache_bytes", [0, 2**30])
def test_refinement_computes_the_plain_em(monkeypatch, cache_bytes):
    from egoslots.pipeline import refine

    monkeypatch.setattr(refine, "PRIOR_CACHE_BYTES", cache_bytes)  # priors recomputed or kept
    g = torch.Generator().manual_seed(1)
    frames, _ = scene(frames=4)
    frames = (frames.float() + 25 * torch.randn(frames.shape, generator=g)).clamp(0, 255)
    frames = frames.to(torch.uint8)
    masks = (3 * torch.randn(4, 3, GRID[0] * GRID[1], generator=g)).softmax(1)
    fine = refine_masks(masks, frames, GRID, chunk=3)
    assert torch.allclose(fine.double(), plain_em(masks, frames), atol=1e-4)
