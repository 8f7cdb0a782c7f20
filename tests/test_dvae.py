"""The dVAE module (pipeline/dvae.py): shapes, temperature schedule, learning, GECO."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from egoslots.pipeline.dvae import (
    DVAE,
    Geco,
    code_usage,
    gumbel_tau,
    kl_to_uniform,
    reconstruction_loss,
)
from tests.helpers.stores import synthetic_frames


def as_input(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared, oversubscribed CPU two threads run these tiny convs ~5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
# STEVE's dvae.py (singhgautam/steve), C = 64: (kernel, stride, padding, in, out) of each conv,
# "shuffle" for PixelShuffle(2). V = the vocabulary.
V = 64
STEVE_ENCODER = [(4, 4, 0, 3, 64), *[(1, 1, 0, 64, 64)] * 6, (1, 1, 0, 64, V)]
STEVE_DECODER = [
    (1, 1, 0, V, 64),
    (3, 1, 1, 64, 64),
    (1, 1, 0, 64, 64),
    (1, 1, 0, 64, 64),
    (1, 1, 0, 64, 256),
    "shuffle",
    (3, 1, 1, 64, 64),
    (1, 1, 0, 64, 64),
    (1, 1, 0, 64, 64),
    (1, 1, 0, 64, 256),
    "shuffle",
    (1, 1, 0, 64, 3),
]


def layer_list(seq: torch.nn.Module) -> list:
    out = []
    for m in seq.modules():
        if isinstance(m, torch.nn.Conv2d):
            out.append((m.kernel_size[0], m.stride[0], m.padding[0], m.in_channels, m.out_channels))
        elif isinstance(m, torch.nn.PixelShuffle):
            out.append("shuffle" if m.upscale_factor == 2 else m.upscale_factor)
    return out


def test_default_dvae_has_steves_layers():
    model = DVAE(vocab_size=V)
    assert model.arch == "steve"
    assert layer_list(model.encoder) == STEVE_ENCODER
    assert layer_list(model.decoder) == STEVE_DECODER
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.bias is not None for c in convs)  # STEVE's conv2d(bias=True) everywhere
    norms = (torch.nn.GroupNorm, torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.InstanceNorm2d)
    assert not any(isinstance(m, norms) for m in model.modules())
    assert sorted(n for n, p in model.named_parameters() if n.endswith("bias")) == sorted(
        n.replace("weight", "bias") for n, p in model.named_parameters() if n.endswith("weight")
    )
    # each hidden block is conv -> ReLU, biases start at zero (STEVE's conv2d helper)
    block = model.encoder[1]
    assert float(block.conv.bias.detach().abs().sum()) == 0.0
    x = torch.randn(2, 64, 4, 4)
    assert torch.equal(block(x), F.relu(F.conv2d(x, block.conv.weight, block.conv.bias)))


def test_slate_arch_keeps_the_groupnorm_network():
    model = DVAE(vocab_size=V, arch="slate")
    assert layer_list(model.encoder) == STEVE_ENCODER and layer_list(model.decoder) == STEVE_DECODER
    hidden = [m for m in model.modules() if hasattr(m, "activate")]
    assert len(hidden) == 7 + 9  # every conv but the two output convs
    assert all(b.conv.bias is None and b.norm.num_groups == 1 for b in hidden)
    x = torch.randn(2, 64, 4, 4)
    block = model.encoder[1]
    assert torch.equal(block(x), F.relu(block.norm(F.conv2d(x, block.conv.weight))))
    # The same conv weights give other tokens than STEVE's network: the arch is part of the dVAE.
    steve = DVAE(vocab_size=V)
    steve.load_state_dict(
        {k: v for k, v in model.state_dict().items() if ".norm." not in k}, strict=False
    )
    frames = torch.rand(2, 3, 32, 32)
    assert not torch.equal(steve.encode_ids(frames), model.encode_ids(frames))
    with pytest.raises(ValueError, match="dvae.arch='vqvae' is not one of steve, slate"):
        DVAE(vocab_size=V, arch="vqvae")


@pytest.mark.parametrize("arch", ["steve", "slate"])
def test_load_dvae_reads_the_arch_and_old_runs_without_it(tmp_path, arch):
    import json

    from egoslots.pipeline.dvae import load_dvae

    model = DVAE(vocab_size=16, hidden=8, arch=arch)
    torch.save(model.state_dict(), tmp_path / "dvae.pt")
    info = {"hash": "x", "vocab_size": 16, "hidden": 8}  # a run from before dvae.arch: no "arch"
    (tmp_path / "dvae.json").write_text(json.dumps(info))
    assert load_dvae(tmp_path).arch == arch
    (tmp_path / "dvae.json").write_text(json.dumps({**info, "arch": arch}))
    loaded = load_dvae(tmp_path)
    frames = torch.rand(1, 3, 16, 16)
    assert loaded.arch == arch and torch.equal(loaded.encode_ids(frames), model.encode_ids(frames))


def test_shapes_and_token_grid():
    model = DVAE(vocab_size=48, hidden=16)
    x = torch.rand(3, 3, 32, 32)
    out = model(x, tau=1.0)
    assert out.recon.shape == (3, 3, 32, 32)
    assert out.log_probs.shape == (3, 48, 8, 8)
    assert torch.allclose(out.log_probs.exp().sum(1), torch.ones(3, 8, 8), atol=1e-5)
    assert out.ids.shape == (3, 8, 8) and out.ids.dtype == torch.int64 and not out.ids.requires_grad
    assert int(out.ids.max()) < 48
    ids = model.encode_ids(torch.rand(2, 3, 64, 64))
    assert ids.shape == (2, 16, 16)
    assert model.decode_ids(ids).shape == (2, 3, 64, 64)
    assert model.token_grid(128) == (32, 32)


@pytest.mark.parametrize("arch", ["steve", "slate"])
def test_decode_ids_equals_decoder_on_one_hot(arch):
    model = DVAE(vocab_size=32, hidden=16, arch=arch)
    for p in model.parameters():  # non-zero biases, so the lookup must add them
        torch.nn.init.normal_(p, std=0.1) if p.dim() == 1 else None
    ids = torch.randint(0, 32, (2, 8, 8))
    one_hot = F.one_hot(ids, 32).permute(0, 3, 1, 2).float()
    assert torch.allclose(model.decode_ids(ids), model.decoder(one_hot), atol=1e-5)


def test_encode_ids_is_argmax_and_deterministic():
    model = DVAE(vocab_size=32, hidden=16)
    x = torch.rand(2, 3, 32, 32)
    ids = model.encode_ids(x)
    assert torch.equal(ids, model.log_probs(x).argmax(1))
    assert torch.equal(ids, model.encode_ids(x))


def test_gradient_reaches_encoder_through_relaxed_sample():
    model = DVAE(vocab_size=32, hidden=16)
    x = torch.rand(2, 3, 32, 32)
    reconstruction_loss(model(x, 0.5).recon, x).backward()
    assert model.encoder[0].conv.weight.grad.abs().sum() > 0
    assert model.decoder[-1].weight.grad.abs().sum() > 0


def test_kaiming_init_of_hidden_convs():
    torch.manual_seed(0)
    model = DVAE(vocab_size=32, hidden=64)
    w = model.encoder[1].conv.weight.detach()  # 1x1, fan_in 64: kaiming-uniform bound sqrt(6 / 64)
    bound = math.sqrt(6 / 64)
    assert float(w.abs().max()) <= bound + 1e-6
    assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_reconstruction_loss_is_summed_per_frame():
    x = torch.zeros(4, 3, 8, 8)
    y = torch.full((4, 3, 8, 8), 0.5)
    assert float(reconstruction_loss(y, x)) == pytest.approx(3 * 8 * 8 * 0.25)


def test_temperature_schedule():
    assert gumbel_tau(0, 1.0, 0.1, 30000) == pytest.approx(1.0)
    assert gumbel_tau(15000, 1.0, 0.1, 30000) == pytest.approx(0.55)
    assert gumbel_tau(7500, 1.0, 0.1, 30000) == pytest.approx(0.45 * math.cos(math.pi / 4) + 0.55)
    assert gumbel_tau(30000, 1.0, 0.1, 30000) == pytest.approx(0.1)
    assert gumbel_tau(90000, 1.0, 0.1, 30000) == pytest.approx(0.1)
    taus = [gumbel_tau(s, 1.0, 0.1, 100) for s in range(0, 101, 10)]
    assert all(a > b for a, b in zip(taus, taus[1:]))


def test_kl_to_uniform():
    uniform = torch.full((2, 16, 4, 4), -math.log(16))
    assert float(kl_to_uniform(uniform)) == pytest.approx(0.0, abs=1e-5)
    peaked = torch.log_softmax(torch.randn(2, 16, 4, 4) * 20, dim=1)
    assert float(kl_to_uniform(peaked)) > 0.5 * 16 * math.log(16)  # near log V per token


def test_code_usage():
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    perplexity, used = code_usage(ids, 8)
    assert float(perplexity) == pytest.approx(4.0)
    assert float(used) == pytest.approx(0.5)
    perplexity, used = code_usage(torch.zeros(10, dtype=torch.long), 8)
    assert float(perplexity) == pytest.approx(1.0) and float(used) == pytest.approx(1 / 8)


@pytest.mark.parametrize("arch", ["steve", "slate"])
def test_training_learns_to_reconstruct(arch):
    """200 steps (lr 1e-3, as the demo) cut the error fourfold and well below the mean colour.

    STEVE's blocks start from a smaller error than SLATE's (no GroupNorm rescaling), so the
    bar is both relative to the start and absolute (the per-channel mean frame's error).
    """
    torch.manual_seed(0)
    data = as_input(synthetic_frames(128, 32, seed=1))
    model = DVAE(vocab_size=32, hidden=32, arch=arch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mean_frame = data[:64].mean(dim=(0, 2, 3), keepdim=True).expand_as(data[:64])
    mean_colour = float(reconstruction_loss(mean_frame, data[:64]))

    @torch.no_grad()
    def error() -> tuple[float, float]:
        soft = reconstruction_loss(model(data[:64], 1.0).recon, data[:64])
        hard = reconstruction_loss(model.decode_ids(model.encode_ids(data[:64])), data[:64])
        return float(soft), float(hard)

    soft0, hard0 = error()
    steps = 200
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = data[torch.randint(0, len(data), (8,), generator=gen)]
        loss = reconstruction_loss(model(x, gumbel_tau(step, 1.0, 0.1, steps)).recon, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    soft, hard = error()
    assert soft <= min(soft0 / 4, 0.6 * mean_colour), (soft0, soft, mean_colour)
    # the argmax tokens reconstruct too
    assert hard <= min(hard0 / 4, 0.6 * mean_colour), (hard0, hard, mean_colour)


@pytest.mark.parametrize("direction", ["above", "below"])
def test_geco_multiplier_moves_with_the_error(direction):
    values = 3 * 8 * 8
    error_per_value = 0.05
    target = error_per_value * 2 if direction == "above" else error_per_value / 2  # target vs error
    geco = Geco(target, values, eta=1e-3, ema=0.5, warmup_steps=2, beta_init=1.0, beta_min=0.55)
    recon = torch.tensor(error_per_value * values, requires_grad=True)
    betas = []
    for step in range(10):
        loss = geco(recon, torch.zeros(()), step)
        betas.append(float(geco.beta))
    assert betas[0] == betas[1] == 1.0  # warm-up: beta holds
    if direction == "above":  # error below target: beta falls, but not under beta_min
        assert betas[-1] < betas[2] < 1.0
        for _ in range(2000):
            geco(recon, torch.zeros(()), 100)
        assert float(geco.beta) == pytest.approx(0.55)
    else:  # error above target: beta rises
        assert betas[-1] > betas[2] > 1.0
    # the loss weights reconstruction by softplus(beta), and its value is KL - w * C_ema
    loss.backward()
    assert float(recon.grad) == pytest.approx(float(F.softplus(torch.tensor(betas[-1]))), rel=1e-5)
