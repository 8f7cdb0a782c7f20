"""Stage-3 building blocks: shapes, mask normalisation, equivalences, causality."""

import math

import pytest
import torch

from egoslots.pipeline.decoders import MLPBroadcastDecoder
from egoslots.pipeline.predictor import SlotPredictor, SlotScan
from egoslots.pipeline.slots import (
    FeatureMLP,
    FixedInit,
    GaussianInit,
    SlotAttention,
    SoftPositionEmbedding,
    build_initializer,
)
from egoslots.pipeline.steve import SteveDecoder

B, T, N, F, K, D = 2, 3, 16, 24, 4, 32


def test_feature_mlp_maps_features_to_slot_dim():
    mlp = FeatureMLP(F, D)
    assert mlp(torch.randn(B, T, N, F)).shape == (B, T, N, D)
    assert mlp.net[1].out_features == 2 * F  # hidden width 2F as in SlotContrast


def test_soft_position_embedding_is_slot_attentions():
    """Locatello et al.'s grid: (y, x, 1 - y, 1 - x) in [0, 1], rows first, through one
    linear map, added to each token."""
    embed = SoftPositionEmbedding(F, (2, 3))
    expected_coords = torch.tensor(
        [[y, x, 1 - y, 1 - x] for y in (0.0, 1.0) for x in (0.0, 0.5, 1.0)]
    )  # (6, 4), row-major like the tokens
    torch.testing.assert_close(embed.coords, expected_coords)
    tokens = torch.randn(B, T, 6, F)
    expected = tokens + expected_coords @ embed.proj.weight.T + embed.proj.bias
    torch.testing.assert_close(embed(tokens), expected)
    assert "coords" not in embed.state_dict()  # rebuilt from the grid, never stored


def test_feature_mlp_with_positions_tells_identical_features_apart():
    same = torch.randn(F).expand(B, T, N, F)  # every token the same feature
    plain = FeatureMLP(F, D)(same)
    assert torch.allclose(plain, plain[:, :, :1].expand_as(plain))
    placed = FeatureMLP(F, D, position_grid=(4, 4))
    inputs = placed(same)  # (B, T, N, D)
    distances = torch.cdist(inputs[0, 0], inputs[0, 0])  # (N, N)
    assert distances[~torch.eye(N, dtype=torch.bool)].min() > 1e-4  # every token its own place
    assert set(placed.state_dict()) - set(FeatureMLP(F, D).state_dict()) == {
        "position.proj.weight",
        "position.proj.bias",
    }


def test_initializers():
    fixed = FixedInit(K, D)
    a, b = fixed(B), fixed(B)
    assert a.shape == (B, K, D) and torch.equal(a, b) and torch.equal(a[0], a[1])
    gauss = GaussianInit(K, D)
    a, b = gauss(B), gauss(B)
    assert a.shape == (B, K, D) and not torch.allclose(a, b)  # sampled every call
    assert not torch.allclose(a[:, 0], a[:, 1])  # and per slot
    assert isinstance(build_initializer("gaussian", K, D), GaussianInit)
    with pytest.raises(ValueError, match="model.initializer.name"):
        build_initializer("random", K, D)


def test_slot_attention_shapes_and_masks_sum_to_one_over_slots():
    sa = SlotAttention(D)
    slots, masks = sa(torch.randn(B, K, D), torch.randn(B, N, D), n_iters=3)
    assert slots.shape == (B, K, D) and masks.shape == (B, K, N)
    torch.testing.assert_close(masks.sum(1), torch.ones(B, N))
    assert (masks >= 0).all()


def test_slot_attention_iterations_matter():
    sa = SlotAttention(D)
    init, inputs = torch.randn(B, K, D), torch.randn(B, N, D)
    one, _ = sa(init, inputs, n_iters=1)
    two, _ = sa(init, inputs, n_iters=2)
    step_twice, _ = sa(one, inputs, n_iters=1)
    assert not torch.allclose(one, two)
    torch.testing.assert_close(two, step_twice)


def test_predictor_is_permutation_equivariant_over_slots():
    pred = SlotPredictor(D, num_heads=4)
    slots = torch.randn(B, K, D)
    perm = torch.randperm(K)
    out = pred(slots)
    assert out.shape == (B, K, D)
    torch.testing.assert_close(pred(slots[:, perm]), out[:, perm])


def test_predictor_attention_scale_options_differ():
    torch.manual_seed(0)
    pub = SlotPredictor(D, attn_scale="published")
    std = SlotPredictor(D, attn_scale="standard")
    std.load_state_dict(pub.state_dict())
    slots = torch.randn(B, K, D)
    assert not torch.allclose(pub(slots), std(slots))
    with pytest.raises(ValueError):
        SlotPredictor(D, attn_scale="other")


def test_scan_shapes_and_disabled_predictor_passes_state_through():
    scan = SlotScan(SlotAttention(D), None)
    state, predicted, masks, geometry = scan(torch.randn(B, K, D), torch.randn(B, T, N, D))
    assert geometry is None  # only Invariant Slot Attention has slot positions
    assert state.shape == predicted.shape == (B, T, K, D)
    assert masks.shape == (B, T, K, N)
    torch.testing.assert_close(predicted, state)
    scan = SlotScan(SlotAttention(D), SlotPredictor(D))
    state, predicted, _, _ = scan(torch.randn(B, K, D), torch.randn(B, T, N, D))
    torch.testing.assert_close(predicted[:, 0], scan.predictor(state[:, 0]))


def test_scan_runs_n_iters_first_only_on_an_uncarried_first_frame():
    calls = []
    sa = SlotAttention(D)
    original = sa.iterate

    def spy(slots, keys, values, n_iters):
        calls.append(n_iters)
        return original(slots, keys, values, n_iters)

    sa.iterate = spy
    scan = SlotScan(sa, None, n_iters=2, n_iters_first=3)
    scan(torch.randn(B, K, D), torch.randn(B, T, N, D))
    assert calls == [3, 2, 2]
    calls.clear()
    scan(torch.randn(B, K, D), torch.randn(B, T, N, D), carried=True)
    assert calls == [2, 2, 2]


def test_decoder_shapes_masks_and_mixing():
    dec = MLPBroadcastDecoder(D, F, N, hidden_dims=[64, 64])
    slots = torch.randn(B, T, K, D)
    recon, masks = dec(slots)
    assert recon.shape == (B, T, N, F) and masks.shape == (B, T, K, N)
    torch.testing.assert_close(masks.sum(2), torch.ones(B, T, N))


def test_decoder_factored_first_layer_equals_naive_broadcast():
    torch.manual_seed(0)
    dec = MLPBroadcastDecoder(D, F, N, hidden_dims=[64, 48, 64])
    with torch.no_grad():  # non-zero biases so the bias handling is checked too
        for layer in dec.layers:
            layer.bias.normal_()
    slots = torch.randn(B, T, K, D, requires_grad=True)
    recon, masks = dec(slots)
    recon_naive, masks_naive = dec.forward_naive(slots)
    torch.testing.assert_close(recon, recon_naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masks, masks_naive, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(recon.square().sum(), [slots, dec.pos_emb, dec.layers[0].weight])
    g2 = torch.autograd.grad(recon_naive.square().sum(), [slots, dec.pos_emb, dec.layers[0].weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_attention_mixing_uses_the_slot_attention_masks_and_trains_the_grouping():
    """decoder.mixing=attention: masks are the given slot-attention masks, the reconstruction is
    their mix of the per-slot outputs (no alpha channel), and its error reaches the masks."""
    torch.manual_seed(0)
    dec = MLPBroadcastDecoder(D, F, N, hidden_dims=[64, 64], mixing="attention")
    assert dec.layers[-1].out_features == F  # no alpha channel
    slots = torch.randn(B, T, K, D)
    logits = torch.randn(B, T, K, N, requires_grad=True)
    attn = logits.softmax(dim=2)  # (B, T, K, N)
    recon, masks = dec(slots, attn)
    assert masks is attn or torch.equal(masks, attn)
    per_slot = dec.layers[0](slots).unsqueeze(-2) + torch.nn.functional.linear(
        dec.pos_emb[0, 0], dec.layers[0].weight
    )
    for layer in dec.layers[1:]:
        per_slot = layer(torch.relu(per_slot))  # (B, T, K, N, F)
    torch.testing.assert_close(recon, (attn.unsqueeze(-1) * per_slot).sum(2))
    torch.testing.assert_close(dec.forward_naive(slots, attn)[0], recon, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(recon.square().sum(), logits)
    assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs the slot-attention masks"):
        dec(slots)
    with pytest.raises(ValueError, match="decoder.mixing='bogus' is not one of alpha, attention"):
        MLPBroadcastDecoder(D, F, N, hidden_dims=[64], mixing="bogus")


def test_a_decoder_without_positions_mixes_one_vector_per_slot():
    """decoder.positions=none: no positional parameter; each slot decodes to one vector, so a
    token held wholly by one slot is reconstructed as that slot's vector wherever it lies, and
    the fast form equals the broadcast reference (values and gradients)."""
    torch.manual_seed(0)
    dec = MLPBroadcastDecoder(D, F, N, hidden_dims=[64, 48], mixing="attention", positions="none")
    assert not any("pos" in name for name, _ in dec.named_parameters())
    with torch.no_grad():
        for layer in dec.layers:
            layer.bias.normal_()
    slots = torch.randn(B, T, K, D, requires_grad=True)
    owner = torch.randint(K, (B, T, N))
    one_hot = torch.nn.functional.one_hot(owner, K).permute(0, 1, 3, 2).float()  # (B, T, K, N)
    recon, masks = dec(slots, one_hot)
    vectors = dec.layers[0](slots)
    for layer in dec.layers[1:]:
        vectors = layer(torch.relu(vectors))  # (B, T, K, F) at the end
    expected = torch.gather(vectors, 2, owner.unsqueeze(-1).expand(B, T, N, F))  # (B, T, N, F)
    torch.testing.assert_close(recon, expected)
    assert torch.equal(masks, one_hot)
    attn = torch.randn(B, T, K, N).softmax(dim=2)
    fast, naive = dec(slots, attn)[0], dec.forward_naive(slots, attn)[0]
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(fast.square().sum(), [slots, dec.layers[0].weight])
    g2 = torch.autograd.grad(naive.square().sum(), [slots, dec.layers[0].weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs decoder.mixing=attention"):
        MLPBroadcastDecoder(D, F, N, hidden_dims=[64], positions="none")  # alpha mixing
    with pytest.raises(ValueError, match="decoder.positions='grid' is not one of learned, none"):
        MLPBroadcastDecoder(D, F, N, hidden_dims=[64], mixing="attention", positions="grid")


def test_decoder_positions_none_is_read_from_the_config_and_refused_where_it_cannot_work():
    from egoslots.pipeline.config import ConfigError, load_config
    from egoslots.pipeline.model import SlotModel, SlotModelConfig

    base = ["globals.NUM_SLOTS=3", "globals.SLOT_DIM=16", "decoder.hidden_dims=[32]",
            "steve_decoder.enabled=false"]  # fmt: skip
    cfg = load_config(None, [*base, "decoder.mixing=attention", "decoder.positions=none"])
    model = SlotModel(SlotModelConfig.from_config(cfg, F, N))
    assert model.decoder.positionless and not hasattr(model.decoder, "pos_emb")
    out = model(torch.randn(B, T, N, F))
    model.losses(out)["loss"].backward()
    assert model.feature_mlp.net[0].weight.grad.abs().sum() > 0
    assert not SlotModel(
        SlotModelConfig.from_config(load_config(None, base), F, N)
    ).decoder.positionless
    with pytest.raises(ConfigError, match="decoder.positions=none needs decoder.mixing=attention"):
        load_config(None, [*base, "decoder.positions=none"])
    with pytest.raises(ConfigError, match="leaves the slots' positions and scales"):
        load_config(None, [*base, "decoder.mixing=attention", "decoder.positions=none",
                           "grouper.invariant=true"])  # fmt: skip
    with pytest.raises(ConfigError, match="decoder.positions"):
        load_config(None, [*base, "decoder.positions=nowhere"])


def test_slot_model_with_attention_mixing_reports_the_attention_masks_as_decoder_masks():
    from egoslots.pipeline.model import SlotModel, SlotModelConfig

    cfg = SlotModelConfig(
        feature_dim=F, num_tokens=N, num_slots=K, slot_dim=D, decoder_hidden_dims=(32,),
        decoder_mixing="attention",
    )  # fmt: skip
    out = SlotModel(cfg)(torch.randn(B, T, N, F))
    torch.testing.assert_close(out["decoder"]["masks"], out["processor"]["corrector"]["masks"])


def _steve(vocab=16, grid=(4, 4)):
    return SteveDecoder(
        D, vocab, grid[0] * grid[1], num_blocks=2, num_heads=4, d_model=32, dropout=0.1
    )


def test_steve_shapes_and_masks_sum_to_one_over_slots():
    steve = _steve().eval()
    tokens = torch.randint(0, 16, (B, 4, 4))
    logits, masks = steve(torch.randn(B, K, D), tokens)
    assert logits.shape == (B, 16, 16) and masks.shape == (B, K, 16)
    torch.testing.assert_close(masks.sum(1), torch.ones(B, 16))


def test_steve_decoder_is_causal():
    torch.manual_seed(0)
    steve = _steve().eval()
    slots = torch.randn(B, K, D)
    tokens = torch.randint(0, 16, (B, 4, 4))
    logits = steve(slots, tokens)[0]
    for t in (0, 5, 14):
        changed = tokens.clone().view(B, -1)
        changed[:, t] = (changed[:, t] + 1) % 16
        logits2 = steve(slots, changed.view(B, 4, 4))[0]
        # position i predicts token i from tokens < i: logits up to t do not see token t ...
        torch.testing.assert_close(logits2[:, : t + 1], logits[:, : t + 1])
        # ... and the next position does
        assert not torch.allclose(logits2[:, t + 1], logits[:, t + 1])


def test_steve_depends_on_slots_and_checks_grid():
    steve = _steve().eval()
    tokens = torch.randint(0, 16, (B, 4, 4))
    a = steve(torch.randn(B, K, D), tokens)[0]
    b = steve(torch.randn(B, K, D), tokens)[0]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="16 tokens"):
        steve(torch.randn(B, K, D), torch.randint(0, 16, (B, 8, 8)))


def test_steve_dropout_only_in_training():
    torch.manual_seed(0)
    steve = _steve()
    slots, tokens = torch.randn(B, K, D), torch.randint(0, 16, (B, 4, 4))
    steve.train()
    assert not torch.allclose(steve(slots, tokens)[0], steve(slots, tokens)[0])
    steve.eval()
    torch.testing.assert_close(steve(slots, tokens)[0], steve(slots, tokens)[0])


def test_steve_decoder_initialisation_follows_steves_code():
    """STEVE's steve.py: token embeddings nn.Embedding's N(0, 1); BOS xavier_uniform_ on a
    (1, 1, d) tensor, U(+-sqrt(3/d)); positions trunc_normal_ with std 1 in [-2, 2]."""
    torch.manual_seed(0)
    vocab, d, tokens = 64, 64, 256
    dec = SteveDecoder(slot_dim=16, vocab_size=vocab, num_tokens=tokens, num_blocks=1, d_model=d)
    table = dec.embed.weight.detach()
    assert float(table[:vocab].std()) == pytest.approx(1.0, rel=0.05)
    assert float(table[:vocab].mean()) == pytest.approx(0.0, abs=0.05)
    bos = table[vocab]
    assert float(bos.abs().max()) <= math.sqrt(3 / d) + 1e-6
    assert float(bos.std()) == pytest.approx(math.sqrt(3 / d) / math.sqrt(3), rel=0.3)
    pos = dec.pos_emb.detach()
    assert pos.shape == (1, 1 + tokens, d) and float(pos.abs().max()) <= 2.0
    # std of N(0, 1) truncated to [-2, 2] is 0.880
    assert float(pos.std()) == pytest.approx(0.880, rel=0.03)
