"""Reading frozen-encoder weight files: find or fetch them, hash them, load them without
unpickling code, unwrap training layouts and check their keys.

A file is found in this order: ``backbone.checkpoint`` (a path), ``$EGOSLOTS_WEIGHTS/<name>.pth``
(or ``.safetensors``), for timm models timm's local caches (Hugging Face hub cache, torch hub
cache), and last, by name (:func:`fetch_by_name`): a silicon-menagerie name fetches
``<name>.pth`` from the Hugging Face repo ``eminorhan/<name>`` into the Hugging Face cache with
``hf_hub_download``, as silicon-menagerie's own ``load_model`` does; a timm name fetches what
timm's pretrained mechanism would (its ``hf_hub_id``, else its ``url`` into the torch hub cache).
``HF_HUB_OFFLINE=1`` is respected: then only the caches are read, and a file not there is one
error saying what to fetch and where to put it. Whatever the place, the file's sha256 feeds the
extraction fingerprint.

Checkpoints are loaded with ``torch.load(weights_only=True)``: tensors and plain containers
only, plus the few harmless globals that training scripts store next to the weights
(``argparse.Namespace`` from DINO / Mugs / MAE's ``args``, numpy scalars). Anything else is
refused before it is unpickled.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Keys under which training scripts nest the model's state dict (first match wins):
# DINO / Mugs save {"teacher", "student", ...}; MAE {"model", ...}; many others "state_dict".
CONTAINER_KEYS = ("teacher", "model", "state_dict")
# Wrapper prefixes left by DDP (module.), DINO's multi-crop wrapper (backbone.), Mugs (encoder.).
WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.")


def _numpy_safe_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    return [
        core.multiarray.scalar,
        np.dtype,
        type(np.dtype(np.float32)),
        type(np.dtype(np.float64)),
        type(np.dtype(np.int64)),
    ]


SAFE_GLOBALS = [argparse.Namespace, *_numpy_safe_globals()]


class CheckpointError(ValueError):
    """A weights file that cannot be found or used (egoslots.pipeline.backbones re-raises as BackboneError)."""


def sha256_file(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MB blocks (multi-GB checkpoints never sit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block_size):
            digest.update(chunk)
    return digest.hexdigest()


def weights_dir_candidates(name: str) -> list[Path]:
    """``$EGOSLOTS_WEIGHTS/<name>.pth`` and ``.safetensors`` (empty if the variable is unset)."""
    root = os.environ.get("EGOSLOTS_WEIGHTS")
    if not root:
        return []
    return [Path(root).expanduser() / f"{name}{ext}" for ext in (".pth", ".safetensors")]


def explicit_checkpoint(path: str | None) -> Path | None:
    """``backbone.checkpoint`` as a Path, or None; a path that is not a file is an error."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"backbone.checkpoint={path}: no such file")
    return p


def timm_cache_candidates(pretrained_cfg: Mapping[str, Any]) -> list[tuple[str, Path | None]]:
    """Where timm would have cached this model's weights, looked up on disk only (no network):
    (description, path or None) pairs."""
    found: list[tuple[str, Path | None]] = []
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = hub_id.partition("@")
        names = (
            [pretrained_cfg["hf_hub_filename"]]
            if pretrained_cfg.get("hf_hub_filename")
            else ["model.safetensors", "pytorch_model.bin"]
        )
        for filename in names:
            hit = try_to_load_from_cache(repo_id, filename, revision=revision or None)
            found.append(
                (
                    f"Hugging Face cache {repo_id}/{filename}",
                    Path(hit) if isinstance(hit, str) else None,
                )
            )
    url = pretrained_cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
        found.append((str(path), path))
    return found


def hub_offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it only once, at import)."""
    import huggingface_hub.constants as hub

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(hub.HF_HUB_OFFLINE) or env in ("1", "on", "yes", "true")


def hub_sources(name: str, timm_cfg: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """Where weights of ``name`` come from by name: [(hub repo id or "url", file name or URL)].

    silicon-menagerie: ``eminorhan/<name>``, file ``<name>.pth`` (its ``load_model``). timm, as
    its pretrained mechanism resolves it: ``hf_hub_id`` (``hf_hub_filename``, else
    model.safetensors then pytorch_model.bin), else ``url``.
    """
    if timm_cfg is None:
        return [(f"eminorhan/{name}", f"{name}.pth")]
    hub_id = timm_cfg.get("hf_hub_id")
    if hub_id:
        if timm_cfg.get("hf_hub_filename"):
            return [(hub_id, timm_cfg["hf_hub_filename"])]
        return [(hub_id, "model.safetensors"), (hub_id, "pytorch_model.bin")]
    return [("url", timm_cfg["url"])] if timm_cfg.get("url") else []


def fetch_by_name(name: str, timm_cfg: Mapping[str, Any] | None = None) -> Path:
    """The weights of backbone ``name`` from the Hugging Face cache (or the torch hub cache for a
    timm URL), downloaded into it first unless ``HF_HUB_OFFLINE=1``. Raises CheckpointError
    saying what to fetch and where to put it when neither works."""
    from huggingface_hub import hf_hub_download

    offline = hub_offline_mode()
    sources = hub_sources(name, timm_cfg)
    failures = []
    for repo, filename in sources:
        try:
            if repo == "url":
                if offline:
                    raise FileNotFoundError("HF_HUB_OFFLINE=1 and not in the torch hub cache")
                from timm.models._hub import download_cached_file

                return Path(download_cached_file(filename))
            repo_id, _, revision = repo.partition("@")
            return Path(
                hf_hub_download(
                    repo_id, filename, revision=revision or None, local_files_only=offline
                )
            )
        except Exception as err:  # hub, HTTP and file errors all become one message below
            failures.append(f"{repo}/{filename}: {type(err).__name__}")
    if not sources:
        raise CheckpointError(f"backbone.name={name} names no pretrained weights to fetch")
    repo, filename = sources[0]
    fetch = (
        f"fetch {filename}"
        if repo == "url"
        else f"fetch it with `hf download {repo.partition('@')[0]} {filename}`"
    )
    why = "HF_HUB_OFFLINE=1 and it is not in the cache" if offline else "download failed"
    raise CheckpointError(
        f"no weights for backbone.name={name}: {why} ({'; '.join(failures)}). On a machine with "
        f"network, {fetch} (into the Hugging Face cache, $HF_HUB_CACHE), or put the file at "
        f"$EGOSLOTS_WEIGHTS/{name}{Path(filename).suffix or '.pth'}, or pass backbone.checkpoint=PATH"
    )


def locate(
    name: str,
    checkpoint: str | None,
    timm_cfg: Mapping[str, Any] | None = None,
) -> Path:
    """The weights file for backbone ``name``: ``backbone.checkpoint``, else
    ``$EGOSLOTS_WEIGHTS/<name>.pth|.safetensors``, else (timm models) timm's local caches, else
    :func:`fetch_by_name`. An error lists every place looked in."""
    path = explicit_checkpoint(checkpoint)
    if path is not None:
        return path
    places: list[tuple[str, Path | None]] = [(str(p), p) for p in weights_dir_candidates(name)]
    if not places:
        places.append(("$EGOSLOTS_WEIGHTS (not set)", None))
    if timm_cfg is not None:
        places += timm_cache_candidates(timm_cfg)
    for _, candidate in places:
        if candidate is not None and candidate.is_file():
            return candidate
    try:
        return fetch_by_name(name, timm_cfg)
    except CheckpointError as err:
        looked = "; ".join(["backbone.checkpoint (not set)"] + [label for label, _ in places])
        raise CheckpointError(f"{err} (looked in: {looked})") from err


# What to do about a damaged weights file, unless the caller knows better.
DAMAGED_HINT = "it is truncated or damaged: restore it from a copy, or write it again"
# What to do about a file holding other pickled objects, unless the caller knows better.
FOREIGN_HINT = (
    "egoslots never writes such a file: use the checkpoint egoslots wrote, or, if you trust "
    "the file, re-save just its tensors"
)


def load_weights(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    damaged: str = DAMAGED_HINT,
    foreign: str = FOREIGN_HINT,
) -> Any:
    """What a .pt / .pth / .ckpt file holds, loaded with ``torch.load(weights_only=True)``: the
    one loader of every weights file egoslots reads (backbones, dvae.pt, Lightning checkpoints).

    Tensors and plain containers only, plus :data:`SAFE_GLOBALS`; a file holding other pickled
    objects is refused before anything in it runs. Every failure is one :class:`CheckpointError`
    naming the file: ``foreign`` says what to do about such a file, ``damaged`` about one that
    does not read (truncated, not a torch file: torch's UnpicklingError / RuntimeError /
    EOFError / zip errors). Zip files are memory-mapped: a DINO or Lightning checkpoint also
    holds optimizer state, which is then never read into memory."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(
                path, map_location=map_location, weights_only=True, mmap=zipfile.is_zipfile(path)
            )
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise CheckpointError(
                f"refused to load {path}: it holds pickled Python objects other than tensors "
                f"and containers (unsupported global {found.group(1)}), which were not run "
                f"(torch.load weights_only=True allows only tensors, containers, "
                f"argparse.Namespace and numpy scalars): {foreign}"
            ) from err
        reason = re.search(r"WeightsUnpickler error: (.*)", str(err))
        raise CheckpointError(
            _unreadable(path, reason.group(1) if reason else err, damaged)
        ) from err
    except IsADirectoryError as err:
        raise CheckpointError(f"{path} is a folder, not a weights file: {damaged}") from err
    except FileNotFoundError as err:
        raise CheckpointError(f"no weights file {path}: {damaged}") from err
    except Exception as err:  # noqa: BLE001 - RuntimeError, EOFError, zip, struct, ... errors
        raise CheckpointError(_unreadable(path, err, damaged)) from err


def _unreadable(path: Path, err: object, damaged: str) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    reason = reason.split(". This is an internal")[0]  # torch's paragraph after miniz's reason
    if isinstance(err, BaseException):
        reason = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
    return (
        f"cannot read checkpoint {path}: {path.name} is not a readable PyTorch checkpoint "
        f"({reason}); {damaged}"
    )


def read_weights_file(path: Path) -> Any:
    """The object stored in a .pth / .bin / .safetensors file, loaded without unpickling code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    return load_weights(
        path,
        damaged="check backbone.checkpoint / $EGOSLOTS_WEIGHTS, or download the file again",
        foreign="if you trust the file, re-save just its state dict: "
        "torch.save(torch.load(PATH, weights_only=False)['teacher'], 'clean.pth')",
    )


def extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors from a training checkpoint: unwrap ``teacher`` / ``model`` /
    ``state_dict`` and strip wrapper prefixes (``module.``, ``backbone.``, ``encoder.``)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for key in CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        state[key] = value
    if not state:
        raise CheckpointError(f"{path} holds no tensors (top-level keys: {sorted(obj)[:10]})")
    return state


def _listing(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    training_only: tuple[str, ...],
    path: Path,
    name: str,
) -> dict[str, torch.Tensor]:
    """The checkpoint's backbone tensors, after checking they match the model exactly.

    Missing keys, unexpected keys (other than known training-only parts whose names start with
    ``training_only``) and shape mismatches are errors that list the keys at fault.
    """
    hint = f"is backbone.checkpoint={path} the weights of backbone.name={name}?"
    missing = set(expected) - set(state)
    if missing:
        raise CheckpointError(f"{path} lacks backbone keys: {_listing(missing)} ({hint})")
    unexpected = {k for k in state if k not in expected and not k.startswith(training_only)}
    if unexpected:
        raise CheckpointError(f"{path} has unexpected keys: {_listing(unexpected)} ({hint})")
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if state[k].shape != expected[k].shape
    ]
    if wrong:
        raise CheckpointError(f"{path} has tensors of the wrong shape: {_listing(wrong)} ({hint})")
    return {k: state[k] for k in expected}


def load_model(
    build: Callable[[], nn.Module],
    path: Path,
    name: str,
    training_only: tuple[str, ...],
    filter_fn: Callable | None = None,
    resample: Callable | None = None,
) -> nn.Module:
    """Build a model skeleton on the meta device (no wasted random init) and fill it from ``path``:
    unwrap the training layout, convert (``filter_fn``, e.g. timm's ``checkpoint_filter_fn``),
    resample the position embedding for the model's grid, check keys and shapes, load."""
    with torch.device("meta"):
        model = build()
    state = extract_state_dict(read_weights_file(path), path)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as err:  # a third-party converter: report it against the file
            raise CheckpointError(
                f"{path}: could not convert it for backbone.name={name}: {err!r}"
            ) from err
    if resample is not None and "pos_embed" in state:
        state["pos_embed"] = resample(state["pos_embed"], model)
    state = check_state_dict(state, model.state_dict(), training_only, path, name)
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model = build()  # non-persistent buffers (e.g. rotary tables) need a real init
        model.load_state_dict(state, strict=True)
    return model.float()


def resample_pos_embed_dino(pos_embed: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Bicubic, no antialiasing (as DINO / MAE interpolate), CLS position kept."""
    from timm.layers import resample_abs_pos_embed

    if pos_embed.shape == model.pos_embed.shape:
        return pos_embed
    old = round((pos_embed.shape[1] - 1) ** 0.5)
    if old * old != pos_embed.shape[1] - 1:
        return pos_embed  # not a square grid: check_state_dict reports the shape mismatch
    return resample_abs_pos_embed(
        pos_embed.float(),
        new_size=list(model.patch_embed.grid_size),
        old_size=[old, old],
        num_prefix_tokens=1,
        interpolation="bicubic",
        antialias=False,
    )
