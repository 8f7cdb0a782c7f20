"""`evaluate` on a tiny trained run: metrics files, windows carrying slots, baselines, probe, CLI."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from egoslots.pipeline import probe
from egoslots.stages import evaluate as ev
from egoslots.stages.machinery.inference import load_trained
from tests.helpers.runs import RUN_SLOT_DIM, RUN_SLOTS, RUN_STEPS, slot_run
from tests.helpers.stores import SQ_DIM, SQ_FRAMES, SQ_GRID, SQ_TOKEN_GRID, SQ_VOCAB

METHODS = {
    "model_decoder",
    "model_attention",
    "model_steve",
    "kmeans_frame",
    "kmeans_video",
    "colour_kmeans_video",
    "grid",
    "model_decoder_refined",
    "model_attention_refined",
    "model_steve_refined",
    "kmeans_video_refined",
    # each slot's connected parts as segments of their own (evaluate.split_parts), colour k-means too
    "model_decoder_parts",
    "model_attention_parts",
    "model_steve_parts",
    "model_decoder_parts_refined",
    "model_attention_parts_refined",
    "model_steve_parts_refined",
    "kmeans_video_parts",
    "kmeans_video_parts_refined",
    "colour_kmeans_video_parts",
}


@pytest.fixture
def run(tmp_path_factory, tmp_path):
    return slot_run(tmp_path_factory, tmp_path / "work")


def test_invariant_slots_carry_their_geometry_into_the_probe(tmp_path_factory, tmp_path):
    """With Invariant Slot Attention the probe reads each slot's vector with its position and
    scale, and the table also says what the vector alone carries."""
    run = slot_run(tmp_path_factory, tmp_path / "work", invariant=True)
    result = ev.evaluate_run(run, split="test")
    rows = result["probe"]["attributes"]
    assert rows and all("score_vector_only" in row for row in rows.values())
    # two probes on different inputs (this 3-step model's geometry means little yet)
    assert rows["image_position"]["score"] != rows["image_position"]["score_vector_only"]
    table = (run / "metrics.md").read_text()
    assert "| attribute | measure | probe | vector alone | chance |" in table
    samples = [([1.0, 2.0, 0.1, 0.2, 0.3, 0.4], {"size": 1.0})]
    assert probe.without_geometry([(np.array(x), a) for x, a in samples])[0][0].tolist() == [1, 2]


def test_evaluate_run_writes_metrics(run):
    result = ev.evaluate_run(run, split="test")
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["num_videos"] == 3 and saved["video_ids"] == ["video_03", "video_04", "video_05"]
    assert saved["primary"] == "model_decoder" and saved["checkpoint_step"] == RUN_STEPS
    assert set(saved["methods"]) == METHODS
    for method, values in saved["methods"].items():
        assert set(values) == set(ev.metrics.METRICS) | set(ev.metrics.PER_VIDEO_MEANS), method
        for key, stat in values.items():
            # frame metrics count frames (all of them for ARI), the others videos
            if key in ev.metrics.FRAME_METRICS:
                frames = sum(s[key][0] for s in saved["per_video"][method]["frame_stats"])
                assert stat["n"] == frames, key
            else:
                assert stat["n"] == 3, key
            assert -1 <= stat["mean"] <= 1 and stat["std"] >= 0  # ARI can be < 0
        assert values["frame_fg_ari"]["n"] > 3
    # per-video values are what the summary averages
    per = saved["per_video"]["grid"]["video_mbo"]
    assert saved["methods"]["grid"]["video_mbo"]["mean"] == pytest.approx(np.mean(per))
    # features say which object a patch shows, so k-means per video should beat the fixed grid
    assert (
        saved["methods"]["kmeans_video"]["video_fg_ari"]["mean"]
        > saved["methods"]["grid"]["video_fg_ari"]["mean"]
    )
    table = (run / "metrics.md").read_text()
    for label in ev.METHOD_LABELS.values():
        assert label in table
    assert table.count("**") >= 2 * 5  # one bold best per column
    assert "Property probe" in table
    assert result["methods"] == saved["methods"]
    # beside the masked metrics: the label-free numbers of the same methods, per video
    free = saved["label_free"]
    assert set(free["methods"]) == set(ev.LABEL_FREE_METHODS)
    assert all(len(v) == 3 for v in free["per_video"]["model_decoder"].values())
    assert "Label-free numbers" in table and "k-means per frame" in table.split("Label-free")[1]


def test_evaluate_returns_cached_result_and_recomputes_on_new_checkpoint(run, monkeypatch):
    first = ev.evaluate_run(run, split="test", probe=False)
    calls = []
    real = ev.evaluate_model
    monkeypatch.setattr(ev, "evaluate_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert ev.evaluate_run(run, split="test", probe=False)["methods"] == first["methods"]
    assert calls == []
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["global_step"] = RUN_STEPS + 1
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    assert ev.evaluate_run(run, split="test", probe=False)["checkpoint_step"] == RUN_STEPS + 1
    assert calls == [1]


def test_infer_video_carries_slots_across_windows(run):
    model = load_trained(run)[0]
    torch.manual_seed(0)
    feats = torch.randn(7, SQ_GRID * SQ_GRID, SQ_DIM)
    tokens = torch.randint(0, SQ_VOCAB, (7, SQ_TOKEN_GRID, SQ_TOKEN_GRID))
    whole = ev.infer_video(model, feats, tokens, window=7)
    windows = ev.infer_video(model, feats, tokens, window=3)  # 3 + 3 + 1 frames
    assert windows["slots"].shape == (7, RUN_SLOTS, RUN_SLOT_DIM)
    assert set(windows["masks"]) == {"model_decoder", "model_attention", "model_steve"}
    assert torch.allclose(whole["slots"], windows["slots"], atol=1e-4)
    for name in ("model_decoder", "model_attention"):
        assert windows["masks"][name].shape == (7, RUN_SLOTS, SQ_GRID * SQ_GRID)
        assert torch.allclose(whole["masks"][name], windows["masks"][name], atol=1e-4)
    assert windows["masks"]["model_steve"].shape == (7, RUN_SLOTS, SQ_TOKEN_GRID**2)
    # without init_state carried, later windows would restart from the initial slots
    restart = torch.cat(
        [ev.infer_video(model, feats[i : i + 3], tokens[i : i + 3], 3)["slots"] for i in (0, 3, 6)]
    )
    assert not torch.allclose(restart, whole["slots"], atol=1e-3)


def test_probe_reads_attributes_and_scores(run):
    result = ev.evaluate_run(run, split="test")
    attrs = result["probe"]["attributes"]
    assert {"mesh", "color", "size", "position"} <= set(attrs)
    assert attrs["mesh"]["measure"] == "accuracy" and 0 <= attrs["mesh"]["score"] <= 1
    assert attrs["position"]["measure"] == "R^2"
    assert attrs["mesh"]["n_test"] > 0 and attrs["mesh"]["n_train"] > 0


def test_probe_skipped_without_attributes(run, tmp_path):
    for meta in (tmp_path / "work" / "data").glob("*/meta.json"):
        meta.unlink()
    result = ev.evaluate_run(run, split="test")
    assert "attributes" in result["probe"]["skipped"]
    assert "Property probe skipped" in (run / "metrics.md").read_text()


def test_probe_fits_linear_attributes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5)).astype(np.float32)
    samples = [
        (
            x[i],
            {
                "mesh": "cube" if x[i, 0] > 0 else "sphere",
                "size": float(2 * x[i, 1] + 1),
                "position": [float(x[i, 2]), float(-x[i, 3]), 0.0],
            },
        )
        for i in range(200)
    ]
    out = probe.fit_and_score(samples[:150], samples[150:])["attributes"]
    assert out["mesh"]["score"] > 0.9 and out["mesh"]["chance"] < 0.8
    assert out["size"]["score"] > 0.99 and out["position"]["score"] > 0.99
    assert out["size"]["chance"] < 0.1


def test_store_without_masks_gets_the_label_free_table(tmp_path_factory, tmp_path):
    run_dir = slot_run(tmp_path_factory, tmp_path / "work", masks=False)
    # `egoslots run` on unlabelled data must not fail here
    result = ev.evaluate_run(run_dir, split="test")
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["methods"] == {} and saved["num_videos"] == 3 and "skipped" not in saved
    free = saved["label_free"]
    assert set(free["methods"]) == set(ev.LABEL_FREE_METHODS)
    for method, numbers in free["methods"].items():
        assert numbers["token_stability"]["n"] == 3, method
        assert 0 <= numbers["token_stability"]["mean"] <= 1
        assert 1 <= numbers["run_length"]["mean"] <= SQ_FRAMES
        assert 0 < numbers["active_slots"]["mean"] <= RUN_SLOTS
        assert numbers["flip_agreement"]["n"] == 0  # no flipped rows in this store
    # the grid never changes; hard partitions have no entropy; the decoder reconstructs
    assert free["methods"]["grid"]["token_stability"]["mean"] == 1.0
    assert free["methods"]["grid"]["run_length"]["mean"] == SQ_FRAMES
    assert free["methods"]["kmeans_video"]["mask_entropy"]["mean"] == 0.0
    assert free["methods"]["model_decoder"]["mask_entropy"]["mean"] > 0
    for method in ("model_decoder", "kmeans_video", "kmeans_frame", "grid"):
        assert free["methods"][method]["feature_rec_rel"]["n"] == 3, method
    assert free["methods"]["model_steve"]["feature_rec_rel"]["n"] == 0
    # k-means on the patch features explains them better than a fixed grid
    assert (
        free["methods"]["kmeans_video"]["feature_rec_rel"]["mean"]
        < free["methods"]["grid"]["feature_rec_rel"]["mean"]
    )
    assert len(free["per_video"]["grid"]["identity_best"]) == 3
    assert "n/a" in free["flip"] and result["probe"]["skipped"]
    table = (run_dir / "metrics.md").read_text()
    assert "no ground-truth masks" in table and "Label-free numbers" in table
    assert "| method | token stability |" in table and "| fixed grid | 1.000 ± 0.000 |" in table
    assert "video FG-ARI" not in table
    from egoslots import cli

    out = CliRunner().invoke(cli.main, ["evaluate", str(run_dir), "--split", "test"])
    assert out.exit_code == 0, out.output
    assert "Label-free numbers" in out.output and "nothing to score" not in out.output


def _add_flipped_rows(store_path):
    """Rewrite a store with a flipped row after every video: the features, frames and masks of
    its frames mirrored left-right (what an encoder that is flip-equivariant would cache)."""
    from egoslots.cache.store import FeatureStore
    from tests.helpers.stores import SQ_DVAE_HASH, add_tokens, records, write_store

    old = FeatureStore.open(store_path)
    h, w = old.grid
    rows, feats, frames, masks, toks = [], [], [], [], []
    ids = old.tokens(SQ_DVAE_HASH)
    for v in old.videos:
        f = old.read_features(v.first, v.stop)
        fr, m = old.group["frames"][v.first : v.stop], old.group["masks"][v.first : v.stop]
        tk = np.asarray(ids[v.first : v.stop])
        mirrored = f.reshape(len(f), h, w, -1)[:, :, ::-1].reshape(f.shape)
        for flip, arrays in (
            (False, (f, fr, m, tk)),
            (True, (mirrored, fr[:, :, ::-1], m[:, :, ::-1], tk[:, :, ::-1])),
        ):
            rows.append((v.id, v.length, v.split, flip))
            for out, a in zip((feats, frames, masks, toks), arrays):
                out.append(np.ascontiguousarray(a))
    import shutil

    shutil.rmtree(store_path)
    store = write_store(
        store_path,
        records(rows),
        features=np.concatenate(feats),
        frames=np.concatenate(frames),
        masks=np.concatenate(masks),
        grid=(h, w),
        fingerprint=old.fingerprint,
        feature_dtype="float32",
        chunk_len=len(np.concatenate(feats)),
    )
    add_tokens(store, SQ_DVAE_HASH, np.concatenate(toks), SQ_VOCAB)


def test_flip_agreement_from_the_stores_flipped_rows(run, tmp_path):
    _add_flipped_rows(tmp_path / "work" / "stores" / "tinyfp.zarr")
    result = ev.evaluate_run(run, split="test", probe=False)
    free = result["label_free"]
    assert "flipped rows" in free["flip"] and result["num_videos"] == 3  # flips not scored twice
    for method in ("model_decoder", "model_attention", "model_steve", "kmeans_video"):
        stat = free["methods"][method]["flip_agreement"]
        assert stat["n"] == 3 and -1 <= stat["mean"] <= 1, method
    # slot attention has no positional encoding: mirrored tokens give mirrored attention masks
    assert free["methods"]["model_attention"]["flip_agreement"]["mean"] == pytest.approx(1.0)
    assert free["methods"]["grid"]["flip_agreement"]["n"] == 0
    assert "flip agreement (ARI)" in (run / "metrics.md").read_text()


def test_cli_prints_table(run):
    from egoslots import cli

    result = CliRunner().invoke(cli.main, ["evaluate", str(run), "--split", "test", "--no-probe"])
    assert result.exit_code == 0, result.output
    assert "| method |" in result.output and "k-means per video" in result.output
    assert (run / "metrics.json").exists()
    help_text = CliRunner().invoke(cli.main, ["evaluate", "--help"]).output
    assert "Example" in help_text and "egoslots evaluate" in help_text


def test_probe_r2_matches_sklearn():
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(1)
    y, pred = rng.standard_normal((30, 3)), rng.standard_normal((30, 3))
    assert probe.r2_score(torch.from_numpy(y), torch.from_numpy(pred)) == pytest.approx(
        r2_score(y, pred)
    )


def test_probe_reads_synthetic_meta_layout():
    obj = {
        "id": 3,
        "mesh": {"name": "duck", "id": 12},
        "color": [0.1, 0.2, 0.3],
        "size": 0.4,
        "texture": None,
        "positions": [[0, 0, 0], [1, 1, 1]],
        "quaternions": [[0, 0, 0, 1], [0, 0, 1, 0]],
        "camera": {"fov": 1},
    }
    static, per_frame = probe.split_attributes(obj, 2)
    assert static == {"mesh": 12, "color": [0.1, 0.2, 0.3], "size": 0.4}
    assert set(per_frame) == {"position", "quaternion"}
    assert probe.is_categorical(static["mesh"]) and not probe.is_categorical(static["size"])


def test_empty_split_falls_back_with_a_note(run):
    result = ev.evaluate_run(run, split="val", probe=False)  # the tiny store has no val videos
    assert (
        result["split"] == "test"
        and result["requested_split"] == "val"
        and result["num_videos"] == 3
    )
    assert "no 'val' videos" in (run / "metrics.md").read_text()


def test_table_of_metrics_read_back_from_json_with_nan():
    result = {
        "run": "r",
        "split": "test",
        "num_videos": 1,
        "checkpoint_step": 1,
        "primary": "model_decoder",
        "methods": {
            "grid": {
                "video_mbo": {"mean": None, "std": None, "n": 0},
                "video_fg_ari": {"mean": 0.5, "std": 0.0, "n": 1},
            }
        },
        "probe": {
            "attributes": {
                "size": {"measure": "R^2", "score": None, "chance": 0.1, "n_train": 4, "n_test": 1}
            }
        },
    }
    table = ev.format_table(json.loads(json.dumps(result)))
    assert "n/a" in table and "**50.0 ± 0.0**" in table


def test_score_video_adds_refined_rows_only_when_asked():
    from tests.test_refine import GRID, scene, token_fractions

    frames, labels = scene()
    item = {"masks": labels, "frames": frames, "features": torch.randn(3, 16, 4)}
    result = {"masks": {"model_attention": token_fractions(labels, 2)}}
    plain = ev.score_video(item, result, 2, GRID, with_baselines=False)
    assert set(plain) == {"model_attention"}
    both = ev.score_video(item, result, 2, GRID, with_baselines=False, refine=True)
    assert set(both) == {"model_attention", "model_attention_refined"}
    assert both["model_attention"] == plain["model_attention"]  # the raw row is unchanged
    assert both["model_attention_refined"]["video_mbo"] == pytest.approx(1.0)
    assert plain["model_attention"]["video_mbo"] < 0.9


def test_score_video_splits_a_slot_holding_two_objects_apart_and_colour_kmeans_too():
    from tests.test_components import two_blob_video

    masks, labels = two_blob_video(size=8)
    frames = (torch.rand(4, 8, 8, 3) * 255).to(torch.uint8)
    item = {"masks": labels, "frames": frames, "features": torch.randn(4, 64, 4)}
    result = {"masks": {"model_attention": masks}}
    scores = ev.score_video(item, result, 2, (8, 8), refine=True, parts=True)
    assert {"model_attention_parts", "model_attention_parts_refined"} <= set(scores)
    assert {"kmeans_video_parts", "kmeans_video_parts_refined", "colour_kmeans_video_parts"} <= set(
        scores
    )
    assert scores["model_attention"]["video_fg_ari"] == pytest.approx(0.0)  # one slot, two objects
    assert scores["model_attention_parts"]["video_fg_ari"] == pytest.approx(1.0)
    assert "model_attention_parts" not in ev.score_video(item, result, 2, (8, 8), refine=True)


def test_identical_masks_are_scored_and_refined_once(monkeypatch):
    """Attention mixing makes the decoder's masks the attention masks: one refinement, same rows."""
    from tests.test_refine import GRID, scene, token_fractions

    frames, labels = scene()
    item = {"masks": labels, "frames": frames, "features": torch.randn(3, 16, 4)}
    masks = token_fractions(labels, 2)
    other = masks.roll(1, dims=1)  # different masks: scored separately
    calls = []
    real = ev.refine_masks
    monkeypatch.setattr(ev, "refine_masks", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = {"masks": {"model_decoder": masks, "model_attention": masks.clone(), "x": other}}
    scores = ev.score_video(item, result, 2, GRID, with_baselines=False, refine=True)
    assert len(calls) == 2
    assert scores["model_decoder"] == scores["model_attention"]
    assert scores["model_decoder_refined"] == scores["model_attention_refined"]
    assert set(scores) == {
        f"{n}{r}" for n in ("model_decoder", "model_attention", "x") for r in ("", "_refined")
    }


def test_a_gaussian_initializer_gives_the_same_scores_twice(run):
    model = load_trained(run)[0]
    feats = torch.randn(5, SQ_GRID * SQ_GRID, SQ_DIM, generator=torch.Generator().manual_seed(1))
    from egoslots.pipeline.slots import GaussianInit

    model.initializer = GaussianInit(RUN_SLOTS, RUN_SLOT_DIM)
    with torch.no_grad():
        torch.nn.init.constant_(model.initializer.log_std, 0.0)  # unit noise: draws differ
    state = torch.random.get_rng_state()
    first = ev.infer_video(model, feats, None, window=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's stream is untouched
    again = ev.infer_video(model, feats, None, window=3)
    assert torch.equal(first["slots"], again["slots"])
    other = ev.infer_video(model, feats, None, window=3, seed=1)
    assert not torch.equal(first["slots"], other["slots"])


def test_restarts_choose_the_first_slots_and_key_the_metrics(run, monkeypatch):
    """evaluate --restarts R: each video's first slots are the best of R draws on its first
    window (SlotModel.best_first_slots), later windows carry them; R is part of the metrics key."""
    model = load_trained(run)[0]
    from egoslots.pipeline.slots import GaussianInit

    model.initializer = GaussianInit(RUN_SLOTS, RUN_SLOT_DIM)
    with torch.no_grad():
        torch.nn.init.constant_(model.initializer.log_std, 0.0)  # unit noise: draws differ
    feats = torch.randn(7, SQ_GRID * SQ_GRID, SQ_DIM, generator=torch.Generator().manual_seed(2))
    plain = ev.infer_video(model, feats, None, window=3)  # the run's config: 1 restart
    model.config.restarts = 1  # what load_trained(restarts=1) sets
    one = ev.infer_video(model, feats, None, window=3)
    assert torch.equal(one["slots"], plain["slots"])
    model.config.restarts = 8
    best = ev.infer_video(model, feats, None, window=3)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)  # infer_video's seed
        first = model.best_first_slots(feats[None, :3], 8)
        expected = model(feats[None, :3], first_slots=first)["processor"]["state"][0]
    torch.testing.assert_close(best["slots"][:3], expected)
    assert not torch.equal(best["slots"], one["slots"])  # another draw won on these features

    seen = []
    real = ev.infer_video
    monkeypatch.setattr(
        ev, "infer_video", lambda *a, **k: seen.append(a[0].config.restarts) or real(*a, **k)
    )
    first_result = ev.evaluate_run(run, split="test", probe=False)
    assert first_result["key"]["restarts"] == 1 and set(seen) == {1}
    seen.clear()
    again = ev.evaluate_run(run, split="test", probe=False, restarts=4)
    assert again["key"]["restarts"] == 4 and set(seen) == {4}  # recomputed, not the cached file
    assert "first slots the best of 4 draws per video" in ev.format_table(again)
    assert "draws per video" not in ev.format_table(first_result)


def test_probe_adds_where_and_how_big_each_object_appears():
    # object 1: a 2x4 block at the top left of an 8x8 frame, then the bottom right in frame 1
    true = torch.zeros(2, 8, 8, dtype=torch.long)
    true[0, 0:2, 0:4] = 1
    true[1, 6:8, 4:8] = 1
    pred = true.clone()  # slot 1 holds it
    slots = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # (T, K, D)
    samples = probe.video_samples(slots, pred, true, [{"id": 1, "size": 0.2}], num_slots=3)
    assert len(samples) == 2
    (v0, a0), (v1, a1) = samples
    assert a0["image_position"] == pytest.approx([1 / 8, 2 / 8])
    assert a1["image_position"] == pytest.approx([7 / 8, 6 / 8])
    assert a0["image_area"] == pytest.approx((8 / 64) ** 0.5) == a1["image_area"]
    assert a0["size"] == 0.2 and torch.equal(torch.from_numpy(v1), slots[1, 1])
