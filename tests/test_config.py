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


# ------------------------------------------------------------------------- the alias table
def test_every_fed_field_has_one_alias_row_and_every_row_names_real_keys():
    """ALIASES is the one list of keys that stand for others: each field the schema leaves
    FED gets its default from exactly one "feeds" row, and every row names keys that exist
    (renamed and foreign keys: keys that do not)."""
    from omegaconf import OmegaConf

    from egoslots.pipeline.config import _schema_keys
    from egoslots.pipeline.config_schema import ALIASES, FED, Config, aliases, schema_fields

    bare = OmegaConf.structured(Config)  # before the table's defaults are installed

    def missing(key: str) -> bool:
        parent, _, leaf = key.rpartition(".")
        return OmegaConf.is_missing(OmegaConf.select(bare, parent) if parent else bare, leaf)

    fed = {k for k in schema_fields() if not k.startswith("optimizer.param_groups") and missing(k)}
    targets = [a.target for a in aliases("feeds")]
    assert sorted(targets) == sorted(fed) and len(set(targets)) == len(targets)
    assert FED == "???"
    keys = set(_schema_keys(bare))
    for alias in ALIASES:
        assert alias.kind in ("feeds", "renamed", "foreign"), alias
        if alias.kind == "feeds":
            assert all(k.strip() in keys for k in alias.key.split(",")), alias
        else:
            assert alias.key not in keys and alias.note, alias
            assert alias.target is None or alias.target in keys, alias


def test_four_keys_name_the_backbone_in_one_order():
    assert load_config(None).backbone.name == "dino_say_vitb14"
    assert (
        load_config(None, ["globals.SILICON_MODEL=dino_s_vitb14"]).backbone.name == "dino_s_vitb14"
    )
    off = load_config(None, ["globals.USE_SILICON_VIT=false", "globals.SILICON_MODEL=x"])
    assert off.backbone.name == "vit_base_patch14_dinov2"
    assert load_config(None, ["globals.BACKBONE=vit_small_patch14_dinov2"]).backbone.name == (
        "vit_small_patch14_dinov2"
    )
    both = load_config(None, ["globals.BACKBONE=a", "backbone.name=patch-pixels"])
    assert both.backbone.name == "patch-pixels" and both.globals.BACKBONE == "a"


def test_globals_feed_their_keys_unless_the_key_is_written():
    cfg = load_config(None, ["globals.NUM_SLOTS=5", "globals.IMAGE_SIZE=112"])
    assert cfg.model.num_slots == 5
    assert cfg.backbone.input_size == cfg.pretrain_encoder.image_size == 112
    cfg = load_config(None, ["globals.NUM_SLOTS=5", "model.num_slots=9"])
    assert cfg.model.num_slots == 9


# ------------------------------------------------------------- inference.restarts (renamed)
def test_restarts_moved_to_the_inference_section_and_the_old_name_still_loads(tmp_path, caplog):
    from egoslots.pipeline.config import inference_restarts

    gaussian = "model.initializer.name=gaussian"
    new = load_config(None, [gaussian, "inference.restarts=3"])
    old = load_config(None, [gaussian, "model.initializer.restarts=3"])
    assert new.inference.restarts == old.inference.restarts == 3
    assert "restarts" not in old.model.initializer
    assert "model.initializer.restarts is deprecated; write inference.restarts" in caplog.text
    # a file of the old name, the new name on the command line: the later layer wins
    path = write(
        tmp_path, "old.yaml", {"model": {"initializer": {"name": "gaussian", "restarts": 5}}}
    )
    assert load_config(path).inference.restarts == 5
    assert load_config(path, ["inference.restarts=2"]).inference.restarts == 2
    both = write(
        tmp_path,
        "both.yaml",
        {"model": {"initializer": {"restarts": 4}}, "inference": {"restarts": 6}},
    )
    with pytest.raises(
        ConfigError, match=r"both model.initializer.restarts=4 .* inference.restarts=6"
    ):
        load_config(both)
    with pytest.raises(
        ConfigError, match="inference.restarts=2 needs model.initializer.name=gaussian or kmeans"
    ):
        load_config(None, ["inference.restarts=2"])
    with pytest.raises(
        ConfigError, match=r"model.initializer.restarts=0 is out of range.*inference"
    ):
        load_config(None, ["model.initializer.restarts=0"])
    # what runs save: the new section only; plain dicts of either age read alike
    saved = tmp_path / "config.yaml"
    write_config(old, saved)
    text = saved.read_text()
    assert "inference:\n  restarts: 3" in text and "restarts" not in text.split("inference:")[0]
    assert inference_restarts(yaml.safe_load(text)) == 3
    assert inference_restarts({"model": {"initializer": {"name": "gaussian", "restarts": 7}}}) == 7
    assert inference_restarts({"model": {"initializer": {"name": "fixed"}}}) == 1


def test_demo_restarts_are_in_the_inference_section():
    text = (REPO / "configs" / "demo.yaml").read_text()
    assert "inference:\n  restarts: 8" in text
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.inference.restarts == 8 and cfg.model.initializer.name == "gaussian"


# ---------------------------------------------------- model defaults come from the schema
def test_slot_model_config_defaults_are_the_schemas():
    import dataclasses

    from egoslots.pipeline.model import DEFAULT_LOSS_WEIGHTS, SlotModelConfig

    cfg = load_config(None, ["globals.USE_STEVE_DECODER=false"])
    bare = SlotModelConfig(feature_dim=8, num_tokens=4)
    built = SlotModelConfig.from_config(cfg, 8, 4)
    differ = [
        f.name
        for f in dataclasses.fields(SlotModelConfig)
        if getattr(bare, f.name) != getattr(built, f.name) and f.name != "loss_weights"
    ]
    assert differ == [], differ  # (steve off in both: a bare config has no token grid)
    assert DEFAULT_LOSS_WEIGHTS == dict(load_config(None).model.loss_weights)
    assert {**DEFAULT_LOSS_WEIGHTS, **bare.loss_weights} == built.loss_weights


# ------------------------------------- train-slots resumes whatever the inference section says
def test_train_slots_resumes_with_other_inference_restarts(tmp_path):
    from omegaconf import OmegaConf

    from egoslots.stages.machinery.common import StageError
    from egoslots.stages.machinery.inference import load_trained
    from egoslots.stages.train_slots import train
    from tests.helpers.runs import make_dvae_run, slot_cfg
    from tests.helpers.stores import slot_store

    slot_store(tmp_path)
    make_dvae_run(tmp_path)
    gaussian = "model.initializer.name=gaussian"
    run = train(slot_cfg(tmp_path, gaussian, "trainer.max_steps=2", "trainer.ckpt_every=2"))
    # another inference.restarts resumes the run (before: "a different config")
    again = slot_cfg(tmp_path, gaussian, "inference.restarts=4", "trainer.max_steps=4")
    assert train(again) == run
    model, cfg, _, _ = load_trained(run)
    assert cfg.inference.restarts == 4 and model.config.restarts == 4
    # a finished run returns at once, whatever the restarts
    assert train(slot_cfg(tmp_path, gaussian, "inference.restarts=6", "trainer.max_steps=4")) == run
    # a run saved before the inference section (restarts under model.initializer) resumes too
    saved = OmegaConf.load(run / "config.yaml")
    del saved.inference
    saved.model.initializer.restarts = 8
    OmegaConf.save(saved, run / "config.yaml")
    assert train(slot_cfg(tmp_path, gaussian, "inference.restarts=2", "trainer.max_steps=6")) == run
    # what is trained still may not change
    with pytest.raises(StageError, match="a different config .*grouper.n_iters"):
        train(slot_cfg(tmp_path, gaussian, "trainer.max_steps=8", "grouper.n_iters=1"))


def test_docs_list_every_alias_row():
    """docs/config.md's alias table has a row for each row of ALIASES (key, kind, target)."""
    from egoslots.pipeline.config_schema import ALIASES

    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in (REPO / "docs" / "config.md").read_text().splitlines()
        if line.startswith("| `") and line.count("|") == 5
    ]
    documented = {(r[0], r[1], r[2]) for r in rows}
    for alias in ALIASES:
        key = ", ".join(f"`{k.strip()}`" for k in alias.key.split(","))
        target = f"`{alias.target}`" if alias.target and alias.kind != "foreign" else None
        matches = [d for d in documented if d[0] == key and d[1] == alias.kind]
        assert matches, f"docs/config.md has no row for {alias.key} ({alias.kind})"
        if target:
            assert any(d[2] == target for d in matches), (alias.key, alias.target)
