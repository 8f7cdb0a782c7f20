"""SlotModel: config wiring, output keys, ablation toggles, window carry-over, overfitting."""

import pytest
import torch

from egoslots.pipeline.config import load_config
from egoslots.pipeline.model import SlotModel

B, T, N, F, GRID, V = 2, 3, 16, 32, (8, 8), 16
TINY = [
    "globals.NUM_SLOTS=4",
    "globals.SLOT_DIM=32",
    "globals.VOCAB_SIZE=16",
    "decoder.hidden_dims=[64,64]",
    "steve_decoder.num_blocks=2",
    "steve_decoder.d_model=32",
]


def _model(*overrides, grid=GRID):
    cfg = load_config(None, [*TINY, *overrides])
    return SlotModel.from_config(cfg, feature_dim=F, num_tokens=N, token_grid=grid)


def _batch(b=B, t=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, N, F, generator=g), torch.randint(0, V, (b, t, *GRID), generator=g)


def test_outputs_have_the_user_facing_keys_and_shapes():
    model = _model()
    features, tokens = _batch()
    out = model(features, tokens)
    K, D = 4, 32
    assert out["encoder"]["backbone_features"] is features
    assert out["processor"]["state"].shape == (B, T, K, D)
    assert out["processor"]["state_predicted"].shape == (B, T, K, D)
    assert out["processor"]["corrector"]["masks"].shape == (B, T, K, N)
    assert out["decoder"]["reconstruction"].shape == (B, T, N, F)
    assert out["decoder"]["masks"].shape == (B, T, K, N)
    assert out["dvae"]["z_hard"] is tokens
    assert out["steve"]["logits"].shape == (B, T, GRID[0] * GRID[1], V)
    assert out["steve"]["masks"].shape == (B, T, K, GRID[0] * GRID[1])
    assert out["next_state"].shape == (B, K, D)
    torch.testing.assert_close(out["next_state"], out["processor"]["state_predicted"][:, -1])
    for masks in (
        out["processor"]["corrector"]["masks"],
        out["decoder"]["masks"],
        out["steve"]["masks"],
    ):
        torch.testing.assert_close(masks.sum(2), torch.ones_like(masks.sum(2)))


def test_losses_are_weighted_by_model_loss_weights():
    model = _model("model.loss_weights.loss_ss=0.25", "model.loss_weights.loss_steve_ce=2.0")
    out = model(*_batch())
    losses = model.losses(out)
    assert set(losses) == {"loss_featrec", "loss_ss", "loss_steve_ce", "loss"}
    expected = losses["loss_featrec"] + 0.25 * losses["loss_ss"] + 2.0 * losses["loss_steve_ce"]
    torch.testing.assert_close(losses["loss"], expected)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())


def test_every_parameter_gets_a_gradient():
    model = _model()
    model.losses(model(*_batch()))["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_ablation_no_steve_removes_its_outputs_and_loss():
    model = _model("globals.USE_STEVE_DECODER=false", "globals.USE_DVAE=false", grid=None)
    assert model.steve is None
    features, _ = _batch()
    out = model(features)
    assert "steve" not in out and "dvae" not in out
    assert set(model.losses(out)) == {"loss_featrec", "loss_ss", "loss"}


@pytest.mark.parametrize("detach", [False, True])
def test_steve_detach_slots_keeps_its_loss_out_of_the_slots(detach):
    """steve_decoder.detach_slots: STEVE's cross-entropy trains its own decoder; the slot
    encoder's gradient then comes from the other losses only (STEVE's own: it reaches them)."""
    model = _model(f"steve_decoder.detach_slots={str(detach).lower()}")
    out = model(*_batch())
    model.losses(out)["loss_steve_ce"].backward()
    slot_side = [p.grad for n, p in model.named_parameters() if not n.startswith("steve.")]
    decoder_side = [p.grad for n, p in model.named_parameters() if n.startswith("steve.")]
    assert all(g is not None and g.any() for g in decoder_side)
    reached = any(g is not None and g.any() for g in slot_side)
    assert reached is not detach


def test_ablation_no_contrast_skips_the_loss():
    model = _model("model.loss_weights.loss_ss=0.0")
    losses = model.losses(model(*_batch()))
    assert "loss_ss" not in losses
    torch.testing.assert_close(losses["loss"], losses["loss_featrec"] + losses["loss_steve_ce"])


def test_ablation_no_predictor_carries_slots_unchanged():
    model = _model("predictor.enabled=false")
    assert model.processor.predictor is None
    out = model(*_batch())
    torch.testing.assert_close(out["processor"]["state_predicted"], out["processor"]["state"])
    torch.testing.assert_close(out["next_state"], out["processor"]["state"][:, -1])


def test_steve_needs_tokens_and_a_grid():
    with pytest.raises(ValueError, match="token grid"):
        _model(grid=None)
    features, _ = _batch()
    model = _model()
    out = model(features)  # slots only, e.g. for evaluation
    assert "steve" not in out and out["processor"]["state"].shape[:2] == (B, T)
    with pytest.raises(ValueError, match="no tokens"):
        model.losses(out)


def test_gaussian_initializer_from_config():
    model = _model("model.initializer.name=gaussian")
    features, tokens = _batch()
    a = model(features, tokens)["processor"]["state"]
    b = model(features, tokens)["processor"]["state"]
    assert not torch.allclose(a, b)


def test_init_state_carries_slots_across_windows():
    torch.manual_seed(0)
    model = _model().eval()  # dropout off; fixed init
    features, tokens = _batch(t=6)
    with torch.no_grad():
        full = model(features, tokens)
        first = model(features[:, :3], tokens[:, :3])
        second = model(features[:, 3:], tokens[:, 3:], init_state=first["next_state"])
    for key in ("state", "state_predicted"):
        joined = torch.cat([first["processor"][key], second["processor"][key]], 1)
        torch.testing.assert_close(joined, full["processor"][key], rtol=1e-5, atol=1e-5)
    joined = torch.cat([first["decoder"]["masks"], second["decoder"]["masks"]], 1)
    torch.testing.assert_close(joined, full["decoder"]["masks"], rtol=1e-5, atol=1e-5)
    joined = torch.cat([first["steve"]["logits"], second["steve"]["logits"]], 1)
    torch.testing.assert_close(joined, full["steve"]["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second["next_state"], full["next_state"], rtol=1e-5, atol=1e-5)


def test_bf16_autocast_forward_gives_float32_losses():
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.losses(model(*_batch()))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()


def test_overfits_a_tiny_cached_set():
    torch.manual_seed(0)
    model = _model()
    features, tokens = _batch(b=4, t=3, seed=1)  # 4 clips x 3 frames, 16 tokens x 32 dims
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with torch.no_grad():
        start = model.losses(model(features, tokens))
    for _ in range(200):
        loss = model.losses(model(features, tokens))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = model.losses(model.eval()(features, tokens))
    summary = ({k: float(v) for k, v in start.items()}, {k: float(v) for k, v in end.items()})
    assert float(end["loss"]) < 0.5 * float(start["loss"]), summary
    for name in ("loss_featrec", "loss_ss", "loss_steve_ce"):
        assert float(end[name]) < float(start[name]), summary


def _reconstruction_error(model, features, first):
    out = model(features, first_slots=first)
    return (out["decoder"]["reconstruction"] - features).pow(2).mean((1, 2, 3))  # (B,)


def test_best_first_slots_keeps_the_draw_that_reconstructs_best():
    torch.manual_seed(0)
    model = _model("model.initializer.name=gaussian", "steve_decoder.enabled=false").eval()
    with torch.no_grad():
        torch.nn.init.constant_(model.initializer.log_std, 0.0)  # unit noise: draws differ
    features, _ = _batch()
    restarts = 6
    with torch.random.fork_rng():
        torch.manual_seed(3)
        best = model.best_first_slots(features, restarts)  # (B, K, D)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(3)
        draws = model.initializer(restarts * B).unflatten(0, (restarts, B))  # (r, B, K, D)
        errors = torch.stack([_reconstruction_error(model, features, d) for d in draws])  # (r, B)
    assert best.shape == (B, 4, 32)
    for b in range(B):
        chosen = errors[:, b].argmin()
        torch.testing.assert_close(best[b], draws[chosen, b])
    # the one-draw slots are among the candidates, so the kept draw is never worse than them
    with torch.no_grad():
        kept = _reconstruction_error(model, features, best)
    assert (kept <= errors[0] + 1e-6).all() and (kept < errors[0]).any()


def test_one_restart_is_the_plain_forward():
    model = _model("model.initializer.name=gaussian", "steve_decoder.enabled=false").eval()
    features, _ = _batch()
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(5)
        plain = model(features)["processor"]["state"]
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(5)
        first = model.best_first_slots(features, 1)
        again = model(features, first_slots=first)["processor"]["state"]
    assert torch.equal(plain, again)


def test_a_fixed_initializer_has_nothing_to_restart():
    model = _model().eval()
    features, _ = _batch()
    torch.testing.assert_close(model.best_first_slots(features, 8), model.initializer(B))


def test_restarts_need_a_gaussian_initializer():
    from egoslots.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="model.initializer.restarts=4 needs"):
        load_config(None, ["model.initializer.restarts=4"])
    cfg = load_config(None, ["model.initializer.name=gaussian", "model.initializer.restarts=4"])
    model = SlotModel.from_config(cfg, feature_dim=F, num_tokens=N, token_grid=GRID)
    assert model.config.restarts == 4


def _clustered_features(b=B, t=T, k=4, seed=0):
    """Features (b, t, N, F) whose first frame holds k tight clusters of N/k tokens around
    orthogonal directions; returns them and each first-frame token's cluster (b, N)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(F)[:k] * 5  # (k, F), far apart
    ids = torch.stack([torch.randperm(N, generator=g) % k for _ in range(b)])  # (b, N)
    first = centres[ids] + 0.01 * torch.randn(b, N, F, generator=g)  # (b, N, F)
    rest = torch.randn(b, t - 1, N, F, generator=g)
    return torch.cat([first[:, None], rest], dim=1), ids


def test_kmeans_initializer_starts_each_slot_at_the_mean_input_of_one_cluster():
    model = _model("model.initializer.name=kmeans", "steve_decoder.enabled=false").eval()
    features, ids = _clustered_features()
    with torch.no_grad():
        first = model.draw_first_slots(features)  # (B, K, D)
        inputs = model.feature_mlp(features[:, 0])  # (B, N, D)
    assert first.shape == (B, 4, 32)
    for b in range(B):
        means = torch.stack([inputs[b, ids[b] == c].mean(0) for c in range(4)])  # (4, D)
        # every cluster's mean input is one slot, each slot one cluster's (order is arbitrary)
        distance = torch.cdist(means, first[b])  # (cluster, slot)
        assert sorted(distance.argmin(1).tolist()) == [0, 1, 2, 3]
        assert distance.min(1).values.max() < 1e-4
    # a plain forward starts from the same clustering (it draws the same k-means++ seed)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(1)
        plain = model(features)["processor"]["state"]
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(1)
        again = model(features, first_slots=model.best_first_slots(features, 1))
    assert torch.equal(plain, again["processor"]["state"])


def test_kmeans_initializer_passes_gradients_to_the_feature_mlp_through_the_first_slots():
    model = _model("model.initializer.name=kmeans", "steve_decoder.enabled=false")
    features, _ = _clustered_features()
    model.draw_first_slots(features).sum().backward()
    assert model.feature_mlp.net[-1].weight.grad.abs().sum() > 0


def test_kmeans_restarts_keep_the_clustering_that_reconstructs_best():
    model = _model(
        "model.initializer.name=kmeans", "inference.restarts=5", "steve_decoder.enabled=false"
    ).eval()
    features, _ = _batch()  # no clear clusters: k-means++ seeds give different clusterings
    with torch.random.fork_rng():
        torch.manual_seed(2)
        best = model.best_first_slots(features)  # config.restarts = 5
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(2)
        draws = [model.draw_first_slots(features) for _ in range(5)]
        errors = torch.stack([_reconstruction_error(model, features, d) for d in draws])
    assert len({tuple(d[0, 0].tolist()) for d in draws}) > 1  # the draws differ
    for b in range(B):
        torch.testing.assert_close(best[b], draws[errors[:, b].argmin()][b])
