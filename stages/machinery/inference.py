"""A trained slot model applied to whole videos: what evaluate, export-slots and visualize share.

- :func:`load_trained`: a train-slots run directory -> (SlotModel in eval mode, its resolved
  config, its feature store, its dVAE's token hash), after checking that the checkpoint holds
  the model of the run's config and store.
- :func:`infer_windows` / :func:`infer_video`: the model over consecutive windows of the
  training clip length (:func:`window_length`), carrying the slots from one window to the next
  (``init_state`` <- ``next_state``), so slot identities persist over a whole video as they
  would online. Masks are returned per method (``OUTPUT_KEYS``). ``track="match"`` (what the
  commands use by default, ``run_options.DEFAULT_TRACK``) renames the slots the model cannot tell apart to
  keep the regions they had in the frame before (:class:`SlotTracker`); these functions
  default to the model's raw order.
- The videos of a split: :func:`iter_videos`, :func:`store_windows` (streamed from the store),
  :func:`available_split`, :func:`split_size`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from egoslots.cache.reader import ClipDataset
from egoslots.cache.store import FeatureStore, StoreError
from egoslots.pipeline.checkpoints import CheckpointError, load_weights
from egoslots.stages.machinery.common import StageError
from egoslots.stages.machinery.run_options import TRACK_MODES
from egoslots.stages.machinery.run_paths import path_from_run_file, store_of_run
from egoslots.stages.machinery.rundirs import (
    check_checkpoint_fits,
    checkpoint_path,
    read_checkpoint,
    read_json,
)
from egoslots.stages.machinery.slot_task import SlotTrainingModule
from egoslots.stages.machinery.tracking import SlotTracker

# method -> where its masks are in the model's outputs
OUTPUT_KEYS = {
    "model_decoder": ("decoder", "masks"),
    "model_attention": ("processor", "corrector", "masks"),
    "model_steve": ("steve", "masks"),
}


# --------------------------------------------------------------------------------------------
# Loading a trained run
# --------------------------------------------------------------------------------------------
def load_trained(
    run_dir: str | Path,
    checkpoint: str | int | Path = "last",
    map_location: str = "cpu",
    restarts: int | None = None,
):
    """A trained run -> (SlotModel in eval mode, resolved cfg, FeatureStore, tokens hash | None).

    ``restarts``: draws of a Gaussian (or k-means) initializer's first slots per video, the best kept
    (``SlotModel.best_first_slots``); None keeps the run's ``inference.restarts``. It is set on
    the model's config, the one place inference reads it (``model.config.restarts``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StageError(
            f"no run directory at {run_dir}; train one with `egoslots train-slots CONFIG`"
        )
    path = checkpoint_path(run_dir, checkpoint)
    ckpt = read_checkpoint(path)
    inputs_path = run_dir / "inputs.json"
    if not inputs_path.is_file():
        raise StageError(f"{run_dir} has no inputs.json: it is not a train-slots run directory")
    inputs = read_json(
        inputs_path,
        "the run's inputs record",
        f"restore it from a copy, or train the run again (`egoslots train-slots "
        f"{run_dir / 'config.yaml'} --overwrite`)",
    )
    # the store in the run's own work directory (a copied or moved one), else where it was
    found = store_of_run(run_dir, inputs["store_fingerprint"], [inputs["store"]])
    try:
        store = FeatureStore.open(found or path_from_run_file(run_dir, inputs["store"]))
    except StoreError as err:
        raise StageError(f"{err} (the store run {run_dir} was trained on)") from err
    if store.fingerprint != inputs["store_fingerprint"]:
        raise StageError(
            f"{inputs['store']} now holds store {store.fingerprint}, but {run_dir} was trained on "
            f"{inputs['store_fingerprint']}: re-extract with the run's config.yaml"
        )
    _check_checkpoint_of_run(path, ckpt, run_dir, store, inputs)
    module = SlotTrainingModule.load_from_checkpoint(
        path, map_location=map_location, weights_only=True
    )
    cfg = module.cfg  # the saved config with keys added since at their defaults
    model = module.model.eval()
    if restarts is not None:
        model.config.restarts = int(restarts)
    return model, cfg, store, inputs["dvae_hash"]


def _check_checkpoint_of_run(
    path: Path, ckpt: dict, run_dir: Path, store: FeatureStore, inputs: dict
) -> None:
    """The checkpoint must hold the slot model of the run's config.yaml on the run's store (a
    checkpoint copied in from another run would otherwise fail deep inside the model)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():  # nothing to compare with; load_from_checkpoint needs the saved config
        if not isinstance((ckpt.get("hyper_parameters") or {}).get("config"), dict):
            raise StageError(
                f"{path} is not a train-slots checkpoint (it has no slot-model config)"
            )
        return
    cfg_dict = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    grid = inputs.get("token_grid")
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = SlotTrainingModule(
            cfg_dict, store.feature_dim, int(store.meta["num_tokens"]), list(grid) if grid else None
        )
    check_checkpoint_fits(
        path,
        ckpt,
        expected,
        f"run {run_dir} (its config.yaml and store)",
        f"The checkpoint comes from another run: use that run's directory, or move it out of "
        f"{run_dir / 'checkpoints'}.",
    )


def checkpoint_identity(run_dir: str | Path, checkpoint: str = "last") -> dict:
    """Which weights a result came from: checkpoint file, size, mtime and training step."""
    path = Path(run_dir) / "checkpoints" / f"{checkpoint}.ckpt"
    if not path.exists():
        return {"checkpoint": str(path.name), "step": None}
    stat = path.stat()
    step = None
    try:
        ckpt = load_weights(path)
        step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    except CheckpointError:  # an unreadable file is reported by the loader, not here
        pass
    return {
        "checkpoint": path.name,
        "size": stat.st_size,
        "mtime": int(stat.st_mtime),
        "step": None if step is None else int(step),
    }


# --------------------------------------------------------------------------------------------
# Running the model over whole videos
# --------------------------------------------------------------------------------------------
def window_length(cfg) -> int:
    """Training clip length T: the window the model is run over."""
    return int(cfg.dataset.ep_length)


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree or tree[key] is None:
            return None
        tree = tree[key]
    return tree


def _reorder(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """values (t, K, ...) reordered along K per frame by ``order`` (t, K)."""
    index = order.view(*order.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return values.gather(1, index)


@torch.no_grad()
def infer_windows(
    model: torch.nn.Module,
    windows: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    track: str = "off",
) -> Iterator[dict]:
    """Run the model over consecutive windows of one video, carrying the slots between them.

    ``windows`` yields (features (t, N, D), tokens (t, h, w) | None); each result is
    {"slots": (t, K, D), "masks": {method: (t, K, N)}, "labels": (t, N)} on the CPU, float32
    (labels int64); with Invariant Slot Attention (grouper.invariant) each slot is followed by its
    position and scale, (y, x, scale_y, scale_x), as ISA's slots are: (t, K, D + 4). Methods the model does not output (no STEVE decoder) are left out. The first
    window's slots are the best of ``model.config.restarts`` draws (``SlotModel.best_first_slots``).
    ``track``: "off" keeps the model's slot order, labels the plain arg-max; "match" (the
    commands' default) renames tied slots frame by frame (:class:`SlotTracker`, matched on the
    decoder masks, else the attention masks; slots and every method's masks follow), labels the
    tracker's. Labels are those of the decoder masks (else the attention masks): what the
    pictures draw and exports write.
    """
    if track not in TRACK_MODES:
        raise StageError(f"track={track!r}: choose one of {', '.join(TRACK_MODES)}")
    tracker = SlotTracker() if track == "match" else None
    device = model_device(model)
    state = None
    for feats, toks in windows:
        x = feats[None].to(device)  # (1, t, N, D)
        first = model.best_first_slots(x) if state is None else None  # (1, K, D)
        out = model(x, None if toks is None else toks[None].to(device), state, first_slots=first)
        state = out.get("next_state")
        masks = {}
        for name, path in OUTPUT_KEYS.items():
            value = _get(out, path)
            if value is not None:
                masks[name] = value[0].float().cpu()
        slots = out["processor"]["state"][0].float().cpu()  # (t, K, D)
        if "geometry" in out["processor"]:  # Invariant Slot Attention: (y, x, scale_y, scale_x)
            slots = torch.cat([slots, out["processor"]["geometry"][0].float().cpu()], dim=-1)
        shown = masks.get("model_decoder", masks.get("model_attention"))
        if tracker is not None:
            order, labels = tracker.track(shown)
            slots = _reorder(slots, order)
            masks = {name: _reorder(value, order) for name, value in masks.items()}
        else:
            labels = shown.argmax(dim=1)
        yield {"slots": slots, "masks": masks, "labels": labels}


def infer_video(
    model: torch.nn.Module,
    features: torch.Tensor,
    tokens: torch.Tensor | None,
    window: int,
    seed: int | None = 0,
    track: str = "off",
) -> dict:
    """The model over one whole video in windows of ``window`` frames, slots carried across.

    features (T, N, D), tokens (T, h, w) | None -> {"slots": (T, K, D), "masks": {method:
    (T, K, N)}, "labels": (T, N)}.
    ``seed``: random numbers (the first slots of a Gaussian initializer) come from this seed,
    so scores and pictures repeat; the caller's random state is left as it was. None: unseeded.
    ``track``: see :func:`infer_windows`.
    """
    starts = range(0, features.shape[0], window)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        parts = list(
            infer_windows(
                model,
                (
                    (features[s : s + window], None if tokens is None else tokens[s : s + window])
                    for s in starts
                ),
                track,
            )
        )
    return {
        "slots": torch.cat([p["slots"] for p in parts]),
        "masks": {k: torch.cat([p["masks"][k] for p in parts]) for k in parts[0]["masks"]},
        "labels": torch.cat([p["labels"] for p in parts]),
    }


def store_windows(store, video, window: int, tokens_hash: str | None) -> Iterator[tuple]:
    """(features, tokens) windows of one video read straight from the store (long videos)."""
    ids = None
    if tokens_hash:
        store.tokens(tokens_hash)  # a clear StoreError if missing or incomplete
        ids = f"tokens/{tokens_hash}/ids"  # read by read_rows: every byte checksum-checked
    for lo in range(video.first, video.stop, window):
        hi = min(lo + window, video.stop)
        feats = torch.from_numpy(store.read_features(lo, hi))
        toks = (
            None if ids is None else torch.from_numpy(store.read_rows(ids, lo, hi).astype(np.int64))
        )
        yield feats, toks


def iter_videos(
    store,
    split: str,
    tokens_hash: str | None,
    max_videos: int | None = None,
    fields=("features", "masks"),
) -> Iterator[dict]:
    """Whole videos of one split (no flipped copies), as ClipDataset items."""
    fields = tuple(fields) + (("tokens",) if tokens_hash else ())
    data = ClipDataset(
        store,
        split=split,
        clip_length=None,
        fields=fields,
        tokens=tokens_hash,
        include_flipped=False,
    )
    count = len(data) if max_videos is None else min(len(data), max_videos)
    for i in range(count):
        yield data[i]


def available_split(store, split: str) -> str:
    """``split`` if it has videos, else the first of test, val, train that has (small datasets)."""
    if store.videos_in(split, hflip=False):
        return split
    for other in ("test", "val", "train"):
        if store.videos_in(other, hflip=False):
            return other
    return split


def split_size(store, split: str, max_videos: int | None) -> int:
    n = len(store.videos_in(split, hflip=False))
    return n if max_videos is None else min(n, max_videos)
