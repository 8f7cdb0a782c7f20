"""Every config key's range, declared beside its field (pipeline/config_schema.py), tried with bad
values.

Property-style: every numeric key is set to 0, -1, nan and a huge value, every path key to a
file, a missing folder and an unwritable folder; the config check (``load_config``, in-process,
no training) must either accept the value or raise one ConfigError line naming the key and what
it accepts, and never any other exception.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from egoslots.pipeline.config import ConfigError, load_config
from egoslots.pipeline.config_schema import (
    Config,
    Dvae,
    PretrainEncoder,
    RunMachinery,
    Trainer,
    schema_fields,
    schema_limits,
)

LIMITS = schema_limits()
HUGE_INT = 10**15
HUGE_FLOAT = 1.0e300


def schema_leaves(node: Any = None, prefix: str = "") -> dict[str, type]:
    """{dotted key: its declared type} of every leaf of the schema (lists of dataclasses give
    their fields' keys, as LIMITS names them)."""
    if node is None:
        node = OmegaConf.structured(Config)
    out: dict[str, type] = {}
    for name in node.keys():
        key = f"{prefix}.{name}" if prefix else str(name)
        child = node._get_node(name)
        if isinstance(child, DictConfig):
            out.update(schema_leaves(child, key))
        elif isinstance(child, ListConfig):
            element = child._metadata.element_type
            if hasattr(element, "__dataclass_fields__"):
                out.update(schema_leaves(OmegaConf.structured(element), key))
            else:
                out[key] = list
        else:
            out[key] = child._metadata.ref_type
    return out


LEAVES = schema_leaves()
NUMERIC = sorted(k for k, t in LEAVES.items() if t in (int, float) or k.endswith(".devices"))
LISTS = sorted(k for k, t in LEAVES.items() if t is list)
PATHS = sorted(k for k, lim in LIMITS.items() if lim.kind in ("folder", "path"))


def test_every_leaf_but_a_switch_has_a_limit_or_is_free_on_purpose():
    """Numbers, lists, paths and enumerated strings declare a Limit beside their field; a string
    that takes any value says why (``free(..., why)``). Only booleans need neither."""
    fields = schema_fields()
    assert set(fields) == set(LEAVES)
    undeclared = [
        k
        for k, meta in fields.items()
        if LEAVES[k] is not bool and not meta.get("limit") and not meta.get("free")
    ]
    assert not undeclared, f"fields without limited(...) or free(..., why): {undeclared}"
    assert all(meta["free"].strip() for meta in fields.values() if "free" in meta)
    both = [k for k, meta in fields.items() if meta.get("limit") and meta.get("free")]
    assert not both, both


def test_every_numeric_list_and_path_key_has_a_limit():
    missing = [k for k in NUMERIC + LISTS if k not in LIMITS]
    assert not missing, f"keys without a Limit beside their field: {missing}"
    unknown = [k for k in LIMITS if k not in LEAVES]
    assert not unknown, f"LIMITS names keys the schema does not have: {unknown}"
    # path-like strings are limited too (expanded, never a file where a folder is meant)
    for key in (
        "work_dir",
        "store",
        "store_dir",
        "dvae_run",
        "dataset.path",
        "backbone.checkpoint",
    ):
        assert LIMITS[key].kind in ("folder", "path")


def accepted_or_one_line(overrides: list[str], key: str, tmp_path) -> str | None:
    """Run the config check; None when accepted, else the ConfigError line (asserted clean)."""
    try:
        load_config(None, [f"work_dir={tmp_path / 'w'}", *overrides])
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message, message
        assert key in message, f"{overrides}: the error does not name {key}: {message}"
        return message
    return None  # any other exception fails the test with its traceback


def bad_numbers(key: str) -> list[str]:
    if LEAVES[key] is int:
        return ["0", "-1", ".nan", str(HUGE_INT)]
    return ["0", "-1", ".nan", ".inf", str(HUGE_FLOAT)]


@pytest.mark.parametrize("key", NUMERIC)
def test_numeric_keys_at_0_minus1_nan_and_huge_are_accepted_or_one_config_error(key, tmp_path):
    limit = LIMITS[key]
    for value in bad_numbers(key):
        override = f"{key}={value}"
        if key == "optimizer.param_groups.lr":  # a field of every item of a list
            override = f"optimizer.param_groups=[{{regex: grouper, lr: {value}}}]"
        message = accepted_or_one_line([override], key, tmp_path)
        number = float(value.replace(".nan", "nan").replace(".inf", "inf"))
        outside = not math.isfinite(number) or (
            (limit.low is not None and number < limit.low)
            or (limit.high is not None and number > limit.high)
        )
        if outside:  # values the Limit excludes are refused, naming what it accepts
            assert message is not None, f"{key}={value} was accepted"
            if LEAVES[key] is float or number.is_integer():
                assert "must be" in message or "type" in message.lower(), message


@pytest.mark.parametrize("key", LISTS)
def test_list_keys_with_bad_items_are_accepted_or_one_config_error(key, tmp_path):
    for value in ("[0]", "[-1]", "[.nan]", f"[{HUGE_INT}]", "[]"):
        accepted_or_one_line([f"{key}={value}"], key, tmp_path)


@pytest.mark.parametrize("key", PATHS)
def test_path_keys_as_a_file_missing_or_unwritable_folder(key, tmp_path):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for value in (a_file, tmp_path / "missing" / "deeper", locked, a_file / "below"):
            message = accepted_or_one_line([f"{key}={value}"], key, tmp_path)
            if LIMITS[key].kind == "folder" and str(value).startswith(str(a_file)):
                assert message is not None and "file" in message, (key, value, message)
    finally:
        locked.chmod(0o700)


def test_the_issues_examples_name_the_key_and_range(tmp_path):
    cases = {
        "globals.SLOT_DIM=0": "globals.SLOT_DIM=0 is out of range: must be a finite number in [1,",
        "globals.BATCH_SIZE_PER_GPU=0": "globals.BATCH_SIZE_PER_GPU=0 is out of range",
        "trainer.max_steps=-1": "trainer.max_steps=-1 is out of range",
        "extract.frames_per_chunk=0": "extract.frames_per_chunk=0 is out of range",
        "optimizer.lr=.nan": "optimizer.lr=nan is not finite: must be a finite number in (0, 10]",
        "run_name=" + "x" * 300: "is not a plain folder name: must be a folder name of 1-100",
        "run_name=../../x": "run_name='../../x' is not a plain folder name",
        "extract.device=gpu0": "extract.device='gpu0' is not a device",
        "evaluate.split=bogus": "evaluate.split='bogus' is not allowed: must be one of train, val, test",
        "globals.SLOT_DIM=66": "not divisible by predictor.num_heads=4",
        "optimizer.param_groups=[{regex: '(', lr: 1}]": "optimizer.param_groups regex '('",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"work_dir={tmp_path}", override])
        assert expected in str(err.value), (override, str(err.value))


def test_work_dir_with_home_or_a_variable_is_expanded_and_a_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("EGOSLOTS_TEST_DIR", str(tmp_path / "var"))
    cfg = load_config(None, ["work_dir=$HOME/x", "dvae_run=~/runs/d"])
    assert cfg.work_dir == str(tmp_path / "x")
    assert cfg.dataset.path == str(tmp_path / "x" / "data" / "synthetic")  # follows work_dir
    assert cfg.dvae_run == str(tmp_path / "runs" / "d")
    assert load_config(None, ["work_dir=${oc.env:EGOSLOTS_TEST_DIR}"]).work_dir == str(
        tmp_path / "var"
    )
    monkeypatch.delenv("EGOSLOTS_NOT_SET", raising=False)
    with pytest.raises(ConfigError, match=r"\$EGOSLOTS_NOT_SET is not set"):
        load_config(None, ["work_dir=$EGOSLOTS_NOT_SET/x"])
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="work_dir=.*file.* is a file: must be a folder"):
        load_config(None, [f"work_dir={tmp_path / 'file'}"])
    assert not os.path.exists("$HOME")


def test_shipped_configs_pass_the_limits():
    from egoslots.pipeline.config import CONFIG_DIR

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        load_config(path)


MACHINERY = [f.name for f in dataclasses.fields(RunMachinery)]


def test_the_run_machinery_is_one_set_of_keys_with_one_limit_each():
    """trainer.*, dvae.* and pretrain_encoder.* share RunMachinery's nine keys and their limits;
    only trainer.image_every keeps its own (stage 3's pictures have no "never")."""
    assert len(MACHINERY) == 9
    sections = {"trainer": Trainer, "dvae": Dvae, "pretrain_encoder": PretrainEncoder}
    for section, cls in sections.items():
        assert issubclass(cls, RunMachinery), section
    for name in MACHINERY:
        limits = {s: LIMITS.get(f"{s}.{name}") for s in sections}
        if name == "image_every":
            assert limits["dvae"] == limits["pretrain_encoder"] and limits["dvae"].low == 0
            assert limits["trainer"].low == 1
        else:
            assert len(set(limits.values())) == 1, (name, limits)
    cfg = load_config(None)  # each stage keeps its own defaults
    assert (cfg.dvae.max_steps, cfg.pretrain_encoder.max_steps, cfg.trainer.max_steps) == (
        30000,
        100000,
        100000,
    )
    assert (cfg.dvae.ckpt_every, cfg.pretrain_encoder.ckpt_every, cfg.trainer.ckpt_every) == (
        1000,
        1000,
        2500,
    )
    assert (cfg.dvae.image_every, cfg.trainer.image_every) == (1000, 5000)
    for section in sections:
        assert cfg[section].precision == "auto" and cfg[section].devices == 1


def test_image_every_0_means_never_where_the_stage_has_a_never(tmp_path):
    assert load_config(None, ["dvae.image_every=0"]).dvae.image_every == 0
    assert load_config(None, ["pretrain_encoder.image_every=0"]).pretrain_encoder.image_every == 0
    with pytest.raises(
        ConfigError, match=r"trainer.image_every=0 is out of range: must be .* \[1,"
    ):
        load_config(None, ["trainer.image_every=0"])
