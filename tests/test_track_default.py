"""Slot identity by default (issue 25): ``--track match`` on every command that shows, exports
or scores slots, the tracker's token labels (a near-tie keeps the token's slot), and what
renaming does and does not change in evaluate's scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from egoslots.pipeline import label_free as lf
from egoslots.stages import evaluate as ev
from egoslots.stages import export_slots as export
from egoslots.stages.machinery.inference import infer_video, load_trained
from egoslots.stages.machinery.pictures import masks_overlay, slot_areas
from egoslots.stages.machinery.run_options import DEFAULT_TRACK
from egoslots.stages.machinery.tracking import SlotTracker
from tests.helpers.runs import slot_run


@pytest.fixture
def run(tmp_path_factory, tmp_path):
    return slot_run(tmp_path_factory, tmp_path / "work")


# ------------------------------------------------------------------------------- the tie rule
def test_tied_argmax_prefers_the_given_slot_only_within_the_tolerance():
    masks = torch.tensor([[[0.4995, 0.1, 0.1], [0.5, 0.7, 0.1], [0.0005, 0.2, 0.8]]])  # (1, 3, 3)
    # token 0: slots 0 and 1 tie; token 1: slot 1 wins clearly; token 2: slot 2 alone
    assert lf.tied_argmax(masks).tolist() == [[0, 1, 2]]
    assert lf.tied_argmax(masks, prefer=torch.tensor([[1, 0, 2]])).tolist() == [[1, 1, 2]]
    assert lf.tied_argmax(masks, prefer=torch.tensor([[0, 0, 0]])).tolist() == [[0, 1, 2]]
    assert lf.tied_argmax(masks, tol=0.0, prefer=torch.tensor([[0, 0, 2]])).tolist() == [[1, 1, 2]]


def test_sticky_labels_keep_a_tokens_slot_while_two_slots_tie():
    # slots 0 and 1 are one vector from frame 1 on (their masks equal): the token slot 1 owned
    # in frame 0 stays slot 1, instead of going to the lower index
    masks = torch.tensor(
        [
            [[0.9, 0.1], [0.1, 0.9], [0.0, 0.0]],
            [[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]],
            [[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]],
        ]
    )  # (T=3, K=3, N=2)
    assert lf.sticky_labels(masks).tolist() == [[0, 1], [0, 1], [0, 1]]
    assert lf.labels_of(masks, tol=lf.TIE_TOLERANCE).tolist() == [[0, 1], [0, 0], [0, 0]]
    out = lf.video_numbers(masks, labels=lf.sticky_labels(masks))
    assert out["token_stability"] == 1.0 and out["identity_best"] == 1.0


def _masks(labels: list[list[int]], k: int, ties: dict[int, list[int]] | None = None):
    """(T, N) labels -> (T, K, N) masks; ``ties``: frame -> slots that share every token of the
    frame's label-0 region equally (collapsed slots, one vector)."""
    hot = torch.nn.functional.one_hot(torch.tensor(labels), k).permute(0, 2, 1).float()
    masks = hot * 0.9 + 0.1 / k
    for t, slots in (ties or {}).items():
        region = torch.tensor(labels[t]) == slots[0]
        for s in slots:
            masks[t, s, region] = 0.9 / len(slots)
    return masks


def test_tracker_keeps_a_region_that_collapsed_slots_take_over():
    """bigbuckbunny's pair (docs/real-video.md): three slots hold parts of one region, then
    collapse onto one vector; the lower-index tie rule alone gave the whole region to slot 0,
    an identity switch for the largest part (slot 2's)."""
    before = [0, 1, 2, 2, 2, 3, 3, 3]  # slot 2 holds most of the region 0-4
    after = [0, 0, 0, 0, 0, 3, 3, 3]  # frame 1: slots 0, 1, 2 tie on all of it
    masks = _masks([before, after], 4, ties={1: [0, 1, 2]})
    order, labels = SlotTracker().track(masks)
    renamed = masks.gather(1, order[..., None].expand_as(masks))
    assert labels[1].tolist() == before  # every token keeps its slot: they all tie
    assert lf.sticky_labels(renamed).tolist() == labels.tolist()  # reproducible from exports
    bench_rule = lf.tied_argmax(renamed)  # the static rule on the same names
    assert bench_rule[1].tolist() != before
    numbers = lf.video_numbers(renamed, labels=labels)
    assert numbers["identity_best"] == 1.0 and numbers["token_stability"] == 1.0


def test_pictures_follow_the_labels_given():
    masks = torch.full((1, 2, 4), 0.5)  # two slots tie on every token of a 2x2 grid
    labels = torch.tensor([[1, 0, 1, 0]])
    np.testing.assert_allclose(slot_areas(masks, labels), [[0.5, 0.5]])
    np.testing.assert_allclose(slot_areas(masks), [[1.0, 0.0]])  # the static rule
    frames = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    picture = masks_overlay(frames, masks, (2, 2), alpha=1.0, ties=True, labels=labels)
    from egoslots.stages.machinery.pictures import PALETTE

    assert (picture[0, 0, 0] == PALETTE[1]).all() and (picture[0, 0, 3] == PALETTE[0]).all()


# ------------------------------------------------------------------------------- the commands
def test_match_is_the_default_of_every_command():
    from egoslots import cli

    assert DEFAULT_TRACK == "match"
    for command in ("visualize", "infer", "export-slots", "evaluate"):
        result = CliRunner().invoke(cli.main, [command, "--help"])
        assert result.exit_code == 0 and "--track [off|match]" in result.output, command
        assert "default: match" in " ".join(result.output.split()), command


def test_export_defaults_to_renamed_slots_and_writes_the_labels(run, tmp_path):
    tracked = np.load(export.export_slots_run(run, "test", tmp_path / "a.npz"))
    raw = np.load(export.export_slots_run(run, "test", tmp_path / "b.npz", track="off"))
    assert json.loads(str(tracked["meta"]))["track"] == "match"
    assert json.loads(str(raw["meta"]))["track"] == "off"
    assert tracked["labels"].shape == tracked["masks"].shape[::2] and tracked["labels"].dtype == (
        np.uint8
    )
    stored = raw["masks"].astype(np.float32)  # raw labels: the float32 arg-max, which float16
    chosen = np.take_along_axis(stored, raw["labels"][:, None].astype(np.int64), 1)[:, 0]
    assert (chosen >= stored.max(1) - 1e-3).all()  # rounding may only have made it a tie
    for t in range(len(raw["slots"])):  # the same slots per frame, names aside
        a, b = raw["slots"][t], tracked["slots"][t]
        order = [int(np.abs(a - row).sum(1).argmin()) for row in b]
        assert sorted(order) == list(range(a.shape[0]))
        np.testing.assert_allclose(a[order], b, atol=1e-6)
    # the labels are the tracker's, per video (the tracker starts again at each video)
    ids = [str(v) for v in tracked["video_ids"]]
    for v in range(len(ids)):
        first, n = int(tracked["video_first"][v]), int(tracked["video_length"][v])
        masks = torch.from_numpy(tracked["masks"][first : first + n].astype(np.float32))
        again = lf.sticky_labels(masks)
        agree = (again.numpy() == tracked["labels"][first : first + n]).mean()
        assert agree > 0.95  # float16 rounding of the stored masks may flip a near-tie


def test_a_previous_raw_export_is_not_taken_for_a_tracked_one(run, tmp_path):
    out = export.export_slots_run(run, "test", tmp_path / "s.npz", track="off")
    with pytest.raises(Exception, match="different export"):
        export.export_slots_run(run, "test", out)


def test_evaluate_scores_the_renamed_masks_and_says_so(run):
    matched = ev.evaluate_run(run, probe=False)
    assert matched["track"] == "match" and matched["key"]["track"] == "match"
    table = ev.format_table(matched)
    assert "--track match" in table
    raw = ev.evaluate_run(run, probe=False, track="off")  # another key: recomputed
    assert raw["key"]["track"] == "off" and "--track off" in ev.format_table(raw)
    for method in ("model_decoder", "kmeans_video", "grid"):
        for metric in ("frame_fg_ari", "frame_mbo"):  # per frame: names do not matter
            a = matched["methods"][method][metric]["mean"]
            b = raw["methods"][method][metric]["mean"]
            assert a == pytest.approx(b, abs=1e-9), (method, metric)
    for metric in ("video_fg_ari", "video_mbo"):  # baselines are never renamed
        assert matched["methods"]["kmeans_video"][metric] == raw["methods"]["kmeans_video"][metric]
    free_m, free_r = matched["label_free"]["methods"], raw["label_free"]["methods"]
    for number in ("mask_entropy", "feature_rec_rel"):  # soft masks, decoder: names aside
        assert free_m["model_decoder"][number]["mean"] == pytest.approx(
            free_r["model_decoder"][number]["mean"], rel=1e-5
        ), number
    assert ev._finite(free_m["kmeans_video"]) == ev._finite(free_r["kmeans_video"])  # NaN


def test_evaluate_cli_takes_track(run):
    from egoslots import cli

    result = CliRunner().invoke(cli.main, ["evaluate", str(run), "--no-probe", "--track", "off"])
    assert result.exit_code == 0, result.output
    assert "--track off" in result.output
    bad = CliRunner().invoke(cli.main, ["evaluate", str(run), "--track", "hungarian"])
    assert bad.exit_code != 0 and "--track" in bad.output


def test_infer_video_labels_are_the_tracker_ones(run):
    model, cfg, store, _ = load_trained(run)
    video = store.videos_in("test", hflip=False)[0]
    feats = torch.from_numpy(store.read_features(video.first, video.stop))
    tracked = infer_video(model, feats, None, 2, track="match")
    shown = tracked["masks"].get("model_decoder", tracked["masks"].get("model_attention"))
    assert tracked["labels"].tolist() == lf.sticky_labels(shown).tolist()  # across windows too
    raw = infer_video(model, feats, None, 2)
    raw_shown = raw["masks"].get("model_decoder", raw["masks"].get("model_attention"))
    assert raw["labels"].tolist() == raw_shown.argmax(1).tolist()
