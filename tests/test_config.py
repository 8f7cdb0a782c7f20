"""Config loading: composition, interpolation, overrides, and errors that name the key."""

from pathlib import Path

import pytest
import yaml

from egoslots.pipeline.config import ConfigError, load_config
from egoslots.stages.machinery.rundirs import write_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_base_defaults_follow_users_docs():
    cfg = load_config(REPO / "configs" / "base.yaml")
    assert (cfg.model.num_slots, cfg.model.slot_dim) == (7, 128)
    assert cfg.dvae.vocab_size == 4096
    assert cfg.globals.USE_DVAE and cfg.steve_decoder.enabled
    assert dict(cfg.model.loss_weights) == {
        "loss_featrec": 1.0,
        "loss_ss": 0.5,
        "loss_steve_ce": 1.0,
    }
    assert cfg.backbone.name == "dino_say_vitb14"


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.num_slots >= 1, path


def test_composition_and_interpolation(tmp_path):
    write(
        tmp_path, "parent.yaml", {"globals": {"NUM_SLOTS": 9, "SLOT_DIM": 32}, "run_name": "parent"}
    )
    child = write(
        tmp_path, "child.yaml", {"defaults": ["parent.yaml"], "globals": {"SLOT_DIM": 48}}
    )
    cfg = load_config(child)
    assert cfg.model.num_slots == 9  # from the parent, through ${globals.NUM_SLOTS}
    assert cfg.model.slot_dim == 48  # the child wins
    assert cfg.run_name == "parent"


def test_command_line_overrides_win_and_propagate():
    cfg = load_config(
        REPO / "configs" / "base.yaml",
        ["globals.NUM_SLOTS=10", "model.loss_weights.loss_ss=1.0", "globals.USE_SILICON_VIT=false"],
    )
    assert cfg.model.num_slots == 10
    assert cfg.model.loss_weights.loss_ss == 1.0
    assert cfg.backbone.name == "vit_base_patch14_dinov2"


@pytest.mark.parametrize(
    "override, named, suggestion",
    [
        ("globals.NUM_SLOT=3", "'globals.NUM_SLOT'", "'globals.NUM_SLOTS'"),
        ("grouper.n_iter=3", "'grouper.n_iter'", "'grouper.n_iters'"),
        ("trainer.max_step=3", "'trainer.max_step'", "'trainer.max_steps'"),
        ("optimiser.lr=0.1", "'optimiser'", "'optimizer'"),
    ],
)
def test_typo_names_key_and_suggests(override, named, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "base.yaml", [override])
    msg = str(err.value)
    assert named in msg and suggestion in msg


def test_typo_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "bad.yaml", {"globals": {"NUM_SLOTS": 4, "SLOTDIM": 8}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert (
        str(path) in str(err.value)
        and "globals.SLOTDIM" in str(err.value)
        and "SLOT_DIM" in str(err.value)
    )


def test_stage2_loss_weight_explained():
    with pytest.raises(ConfigError, match="stage-2 loss"):
        load_config(REPO / "configs" / "base.yaml", ["model.loss_weights.loss_dvae_recon=0.5"])


def test_num_gpus_of_the_users_docs_points_to_the_devices_keys():
    with pytest.raises(ConfigError, match="trainer.devices .*dvae.devices"):
        load_config(REPO / "configs" / "base.yaml", ["globals.NUM_GPUS=4"])


def test_wrong_type_and_inconsistent_toggles():
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        load_config(REPO / "configs" / "base.yaml", ["trainer.max_steps=many"])
    with pytest.raises(ConfigError, match="USE_DVAE"):
        load_config(REPO / "configs" / "base.yaml", ["globals.USE_DVAE=false"])
    with pytest.raises(ConfigError, match="65536"):
        load_config(REPO / "configs" / "base.yaml", ["globals.VOCAB_SIZE=70000"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(REPO / "configs" / "base.yaml", ["globals.NUM_SLOTS"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    circular = write(tmp_path, "loop.yaml", {"defaults": ["loop.yaml"]})
    with pytest.raises(ConfigError, match="circular"):
        load_config(circular)


def test_saved_config_is_fully_resolved_and_reloads(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml", ["globals.NUM_SLOTS=5"])
    out = tmp_path / "config.yaml"
    write_config(cfg, out)
    text = out.read_text()
    assert "${" not in text
    again = load_config(out)
    assert again.model.num_slots == 5 and again.backbone.name == cfg.backbone.name


def test_every_command_help_has_an_example():
    from click.testing import CliRunner

    from egoslots import cli

    runner = CliRunner()
    for name in cli.COMMANDS:
        result = runner.invoke(cli.main, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Example" in result.output or "example" in result.output, name


def test_decoder_mixing_is_checked_and_reaches_the_model_config():
    from egoslots.pipeline.model import SlotModelConfig

    cfg = load_config(REPO / "configs" / "base.yaml", ["decoder.mixing=attention"])
    assert SlotModelConfig.from_config(cfg, 8, 4).decoder_mixing == "attention"
    assert load_config(REPO / "configs" / "base.yaml").decoder.mixing == "alpha"  # SlotContrast
    with pytest.raises(
        ConfigError,
        match="decoder.mixing='softmax' is not allowed: must be one of alpha, attention",
    ):
        load_config(REPO / "configs" / "base.yaml", ["decoder.mixing=softmax"])
