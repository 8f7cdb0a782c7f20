"""One place that turns YAML files plus command-line overrides into a checked config.

Configs compose: a file may list ``defaults: [base.yaml, ...]`` (paths relative to the file)
that are merged first, in order, and the file's own keys override them. ``${...}``
interpolation works across the whole tree (OmegaConf), and ``key=value`` overrides from the
command line are merged last. Every key is checked against the typed schema in
:mod:`pipeline.config_schema`; a misspelt key is an error that names it and suggests the
closest valid key, and keys that the users' integrated-model docs use for concepts the staged
design does not have get an explanation instead of a bare "unknown key".
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config_schema import DECODER_MIXINGS, DVAE_ARCHS, Config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file or key at fault."""


# Keys users know from the integrated model hacked into SlotContrast, whose concept lives
# elsewhere (or nowhere) in egoslots' staged design. Checked before the schema.
FOREIGN_KEYS = {
    "model.loss_weights.loss_dvae_recon": (
        "loss_dvae_recon is a stage-2 loss in egoslots: the dVAE is pretrained first by "
        "`egoslots pretrain-dvae` and frozen, so it has no weight in the slot model. "
        "Use dvae.* keys (e.g. dvae.lr, dvae.max_steps) to change its training."
    ),
    "encoder.backbone.frozen": (
        "the backbone is always frozen in egoslots: its features are computed once by "
        "`egoslots extract-features` and read from the cache. Fine-tuning the ViT is not supported."
    ),
    "encoder": (
        "egoslots has no `encoder` section: the frozen ViT is configured under `backbone` "
        "(backbone.name, backbone.checkpoint, backbone.block) and runs only in extract-features."
    ),
    "globals.NUM_GPUS": (
        "the number of GPUs is trainer.devices (train-slots) and dvae.devices (pretrain-dvae); "
        "globals.BATCH_SIZE_PER_GPU stays per device, so the global batch grows with the devices."
    ),
    "dataset.json_dir": "egoslots reads data from dataset.path (see dataset.source for the format).",
    "dataset.img_dir": "egoslots reads data from dataset.path (see dataset.source for the format).",
}


def _if_resolver(cond, a, b):
    return a if cond else b


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("if"):
        # ${if:${globals.USE_SILICON_VIT},${globals.SILICON_MODEL},vit_base_patch14_dinov2}
        OmegaConf.register_resolver("if", _if_resolver)


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
        siblings = [k for k in valid if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
        close = difflib.get_close_matches(path, siblings, n=1, cutoff=0.5)
        if not close:
            close = difflib.get_close_matches(path, sorted(valid), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{source}: unknown config key '{path}'{hint}")


def _is_open_dict(schema: DictConfig, path: str) -> bool:
    node = OmegaConf.select(schema, path)
    return (
        isinstance(node, DictConfig)
        and node._metadata.ref_type in (dict, Any)
        and not node._metadata.object_type
    )


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Load one YAML file and, first, the files its ``defaults`` list names."""
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
        merged = OmegaConf.merge(merged, _load_yaml(parent, seen + (path,)))
    return OmegaConf.merge(merged, node)


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


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Schema defaults <- YAML file (with its defaults chain) <- overrides, then validated.

    Interpolations are resolved lazily by OmegaConf; :func:`resolve` gives a plain copy.
    """
    schema = OmegaConf.structured(Config)
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        layers.append((str(path), _load_yaml(Path(path))))
    if overrides:
        layers.append(("command-line override", parse_overrides(overrides)))
    cfg = schema
    for source, layer in layers:
        raw = OmegaConf.to_container(layer, resolve=False)
        _check_keys(raw, source, schema)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{source}: {_describe(err)}") from err
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path or 'config'}: {_describe(err)}") from err
    _validate(cfg)
    return cfg


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def _validate(cfg: DictConfig) -> None:
    """Cross-field checks that a schema cannot express."""
    g = cfg.globals
    if g.USE_STEVE_DECODER and not g.USE_DVAE:
        raise ConfigError(
            "globals.USE_STEVE_DECODER=true needs globals.USE_DVAE=true: the STEVE decoder predicts "
            "the dVAE's tokens. Set globals.USE_STEVE_DECODER=false for a run without the dVAE."
        )
    if g.NUM_SLOTS < 1:
        raise ConfigError(f"globals.NUM_SLOTS must be >= 1, got {g.NUM_SLOTS}")
    if cfg.dvae.arch not in DVAE_ARCHS:
        raise ConfigError(f"dvae.arch={cfg.dvae.arch} is not one of {', '.join(DVAE_ARCHS)}")
    if cfg.decoder.mixing not in DECODER_MIXINGS:
        raise ConfigError(
            f"decoder.mixing={cfg.decoder.mixing} is not one of {', '.join(DECODER_MIXINGS)}"
        )
    if g.VOCAB_SIZE > 65536:
        raise ConfigError(
            f"globals.VOCAB_SIZE={g.VOCAB_SIZE} is over 65536: token ids are cached as uint16."
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
    "load_config",
    "parse_overrides",
    "resolve",
    "section_dict",
    "to_yaml",
    "CONFIG_DIR",
]
