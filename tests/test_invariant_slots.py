"""Invariant Slot Attention (grouper.invariant): slot positions and scales that follow the masks,
keys and decoder inputs that move with the slot, and the geometry carried to inference."""

import pytest
import torch

from egoslots.pipeline.config import load_config
from egoslots.pipeline.decoders import MLPBroadcastDecoder
from egoslots.pipeline.model import SlotModel
from egoslots.pipeline.slots import InvariantSlotAttention, coordinate_grid
from egoslots.stages.machinery.inference import infer_video

B, K, D, SIDE = 2, 3, 16, 8
N = SIDE * SIDE
STEP = 2 / (SIDE - 1)  # one token in the grid's [-1, 1] units


def test_coordinate_grid_is_row_major_y_then_x_in_minus_one_to_one():
    grid = coordinate_grid(3, 4)
    assert grid.shape == (12, 2)
    torch.testing.assert_close(grid[0], torch.tensor([-1.0, -1.0]))
    torch.testing.assert_close(grid[3], torch.tensor([-1.0, 1.0]))  # end of the first row
    torch.testing.assert_close(grid[4], torch.tensor([0.0, -1.0]))  # next row: y moves
    torch.testing.assert_close(grid[-1], torch.tensor([1.0, 1.0]))


def test_geometry_is_the_centre_and_spread_of_the_returned_masks():
    torch.manual_seed(0)
    sa = InvariantSlotAttention(D, (SIDE, SIDE))
    slots, masks, geometry = sa(torch.randn(B, K, D), torch.randn(B, N, D), n_iters=2)
    assert slots.shape == (B, K, D) and masks.shape == (B, K, N) and geometry.shape == (B, K, 4)
    torch.testing.assert_close(masks.sum(1), torch.ones(B, N))  # softmax over slots
    weights = masks / masks.sum(-1, keepdim=True)
    centre = torch.einsum("bkn,nc->bkc", weights, sa.grid)
    spread = torch.einsum("bkn,bknc->bkc", weights, (sa.grid - centre[:, :, None]) ** 2).sqrt()
    # the last round only measures: position and scale belong to the masks it returns
    torch.testing.assert_close(geometry[..., :2], centre, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(geometry[..., 2:], spread, atol=1e-5, rtol=1e-4)


def test_attention_moves_with_the_slot_position():
    """Over a uniform frame, a slot moved by one token attends to the same pattern, moved by
    one token: what it sees depends only on where tokens are relative to it."""
    torch.manual_seed(0)
    sa = InvariantSlotAttention(D, (SIDE, SIDE))
    slots = torch.randn(1, K, D)
    token = torch.randn(1, 1, D).expand(1, N, D)  # every token alike
    keys, values = sa.project_inputs(token)
    positions = torch.tensor([[[-0.4, -0.2], [0.1, 0.3], [0.3, -0.5]]])
    scales = torch.full((1, K, 2), 0.2)
    moved = positions + torch.tensor([STEP, 0.0])  # one token down
    _, attn, _, _ = sa.step(slots, keys, values, positions, scales, update=False)
    _, attn_moved, _, _ = sa.step(slots, keys, values, moved, scales, update=False)
    grid = attn.view(1, K, SIDE, SIDE)
    grid_moved = attn_moved.view(1, K, SIDE, SIDE)
    torch.testing.assert_close(grid_moved[:, :, 1:], grid[:, :, :-1], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(grid_moved, grid, atol=1e-3)


def test_relative_decoder_draws_a_slot_where_its_geometry_puts_it():
    torch.manual_seed(0)
    dec = MLPBroadcastDecoder(D, 8, N, hidden_dims=[32], relative_grid=(SIDE, SIDE))
    slots = torch.randn(1, 1, K, D)
    geometry = torch.tensor(
        [[[[-0.3, 0.2, 0.2, 0.3], [0.0, 0.0, 0.5, 0.5], [0.4, -0.4, 0.1, 0.2]]]]
    )
    moved = geometry + torch.tensor([0.0, STEP, 0.0, 0.0])  # one token right
    pos = dec.positions(geometry).view(1, 1, K, SIDE, SIDE, D)
    pos_moved = dec.positions(moved).view(1, 1, K, SIDE, SIDE, D)
    torch.testing.assert_close(pos_moved[..., 1:, :], pos[..., :-1, :], atol=1e-6, rtol=1e-5)
    recon, _ = dec(slots, None, geometry)
    naive, _ = dec.forward_naive(slots, None, geometry)
    torch.testing.assert_close(recon, naive, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="geometry"):
        dec(slots)


def _model(*overrides, tokens=N):
    cfg = load_config(
        None,
        [
            "globals.NUM_SLOTS=3",
            "globals.SLOT_DIM=16",
            "decoder.hidden_dims=[32]",
            "decoder.mixing=attention",
            "grouper.invariant=true",
            "steve_decoder.enabled=false",
            *overrides,
        ],
    )
    return SlotModel.from_config(cfg, feature_dim=12, num_tokens=tokens)


def test_model_outputs_geometry_and_inference_appends_it_to_each_slot():
    torch.manual_seed(0)
    model = _model().eval()
    features = torch.randn(5, N, 12)
    out = model(features[None, :2])
    assert out["processor"]["geometry"].shape == (1, 2, 3, 4)
    assert model.losses(out)["loss"].isfinite()
    result = infer_video(model, features, None, window=2)
    assert result["slots"].shape == (5, 3, 16 + 4)
    # the last four numbers of a slot are its position (in [-1, 1]) and a positive scale
    assert result["slots"][..., 16:18].abs().max() <= 1
    assert (result["slots"][..., 18:] > 0).all()
    # the same first window as a plain forward from the same draw
    torch.manual_seed(0)
    first = model.best_first_slots(features[None, :2])
    again = model(features[None, :2], first_slots=first)
    expected = torch.cat([again["processor"]["state"], again["processor"]["geometry"]], -1)[0]
    torch.testing.assert_close(result["slots"][:2], expected)


def test_invariant_needs_a_square_token_grid():
    with pytest.raises(ValueError, match="grouper.invariant needs a square token grid"):
        _model(tokens=6 * 4)


def test_the_position_embedding_is_read_from_the_config_and_needs_a_square_grid():
    model = _model("grouper.invariant=false", "grouper.position_embedding=true")
    assert model.config.position_embedding and model.feature_mlp.position is not None
    assert model.feature_mlp.position.coords.shape == (N, 4)
    assert _model("grouper.invariant=false").feature_mlp.position is None  # off by default
    with pytest.raises(ValueError, match="grouper.position_embedding needs a square token grid"):
        _model("grouper.invariant=false", "grouper.position_embedding=true", tokens=6 * 4)


def test_train_slots_on_a_non_square_token_grid_is_one_error_naming_the_option(tmp_path):
    """A store of 2 x 6 tokens: the option that needs a square grid is named, with how to go on,
    in one line and no traceback (before: a ValueError traceback from the model; grouper.invariant
    takes the same path, its message checked in test_invariant_needs_a_square_token_grid)."""
    option = "grouper.position_embedding"
    import subprocess
    import sys

    import numpy as np

    from tests.helpers.errors import one_error_line
    from tests.helpers.runs import REPO, slot_cfg_args
    from tests.helpers.stores import SLOT_FEATURES, SLOT_FRAME, SLOT_VIDEOS, records, write_store

    rows = records(SLOT_VIDEOS)
    total = sum(v.length for v in rows)
    write_store(
        tmp_path / "stores" / "fp0.zarr",
        rows,
        features=np.random.default_rng(0).standard_normal((total, 12, SLOT_FEATURES)),
        frames=np.zeros((total, SLOT_FRAME, SLOT_FRAME, 3), np.uint8),
        grid=(2, 6),
        fingerprint="fp0",
    )
    args = [*slot_cfg_args(tmp_path), "globals.USE_DVAE=false", "globals.USE_STEVE_DECODER=false",
            "trainer.max_steps=2"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "cli.py", "train-slots", "configs/demo.yaml", *args, f"{option}=true"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    one_error_line(proc, f"{option} needs a square token grid", "2 x 6", f"{option}=false")
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # stopped before training
