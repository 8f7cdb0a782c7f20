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
from egoslots.pipeline.label_free import TIE_TOLERANCE, tied_argmax
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

    ``restarts``: draws of a Gaussian initializer's first slots per video, the best kept
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
    cfg = OmegaConf.create(module.hparams.config)
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


def tie_groups(frame: torch.Tensor, tol: float = TIE_TOLERANCE) -> torch.Tensor:
    """Soft masks (K, N) of one frame -> (K,) a group id per slot: slots the model cannot tell
    apart share one. Two slots are linked when their masks tie (within ``tol`` of the token's
    largest value, ``tied_argmax``) on more than half of the tokens either of them could own;
    groups are the linked components. A slot that owns no token is alone."""
    top = frame.max(dim=0, keepdim=True).values
    tied = (frame >= top - tol).double()  # (K, N)
    both = tied @ tied.T  # tokens both tie on
    either = tied.sum(1)[:, None] + tied.sum(1)[None, :] - both
    linked = (2 * both > either) | torch.eye(frame.shape[0], dtype=torch.bool)
    reach = linked.double()
    for _ in range(frame.shape[0]):  # transitive closure: K is small
        reach = ((reach @ reach) > 0).double()
    return (reach > 0).double().argmax(dim=1)  # the lowest slot of each one's component


def whole_moves(overlap: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
    """(K, K) token overlaps (names one frame before, slots now), (K,) each name's slot one
    frame before -> (K, K) bool: the renamings a whole region's move justifies.

    A region moves whole when most of a name's tokens of the frame before are in one other slot
    now, and most of that slot's tokens come from the name (a majority both ways). Then the
    name may follow its region to that slot, and the name the slot had may take the slot the
    region left (a swap). A slot that keeps most of its own region is never renamed: neighbours
    trading a few of its tokens do not move its name (docs/real-video.md)."""
    k = overlap.shape[0]
    before = overlap.sum(1, keepdim=True)  # (K, 1) tokens each name held one frame before
    now = overlap.sum(0, keepdim=True)  # (1, K) tokens each slot holds now
    whole = (2 * overlap > before) & (2 * overlap > now)
    whole[torch.arange(k), carried] = False
    names, slots = whole.nonzero(as_tuple=True)
    allowed = whole.clone()
    holder = torch.empty(k, dtype=torch.long)
    holder[carried] = torch.arange(k)  # the name each slot had one frame before
    allowed[holder[slots], carried[names]] = True  # the displaced name takes the region's old slot
    return allowed


class SlotTracker:
    """Renames slots the model cannot tell apart so that each keeps the region it had one frame
    before, and says which slot owns each token.

    Slot attention, the predictor and the decoder treat slots alike whatever their index, and a
    slot carried from frame to frame keeps its index: that is the model's own identity, and
    where its slots are distinct it is kept. But spare slots settle on (near-)identical vectors
    on real footage, and between those the index is only a name: such slots trade a region back
    and forth, which is what the identity switches of ``docs/real-video.md`` are. So, frame by
    frame:

    1. :func:`tie_groups`: slots whose masks tie (within 1e-3) on most of the tokens either could
       own form a group; a distinct slot is a group of its own;
    2. within each group, the names the group's slots had in frame t-1 are matched one-to-one to
       the group's slots by how many tokens they share (tokens labelled by
       ``label_free.tied_argmax`` in the model's order; Hungarian; on a tie a name stays with
       the model's slot it had), and slots and every method's masks are reordered. A name may
       also leave its group when its region moved *whole* to another slot (:func:`whole_moves`:
       a majority of the name's tokens in that slot, and of that slot's tokens from the name;
       ``whole_moves=False`` turns this off): on bikes, distinct slots swapping whole regions
       inside a shot were most of the remaining switches (docs/real-video.md);
    3. each token's slot (``labels``) is chosen among the renamed slots within 1e-3 of its
       largest mask value, keeping the token's slot of frame t-1 when that is one of them
       (``tied_argmax(prefer=)``): a token changes slot only when another slot's mask is clearly
       larger. Otherwise a region tied slots share goes to the lowest of their names whatever
       step 2 chose (bigbuckbunny, docs/real-video.md).

    Renaming distinct slots by any overlap made every frame pair's identity look perfect on
    real footage but cost the demo's synthetic test videos 7 points of video FG-ARI: it
    overrode the model where the model was right (docs/real-video.md); a region that moves
    whole is the one case where the overlap is unambiguous. (Soft-mask overlaps match
    worse in step 2: a slot with a diffuse mask overlaps everything.) The model's own state is
    untouched, so masks as sets, reconstructions and scores that ignore slot order are exactly as
    without it; ``label_free.sticky_labels`` of the renamed masks gives the same ``labels``.
    """

    def __init__(self, whole_moves: bool = True):
        self.previous: torch.Tensor | None = None  # (N,) each token's slot name in the last frame
        self.carried: torch.Tensor | None = None  # (K,) the model's slot of each name, last frame
        self.whole_moves = whole_moves  # also follow a region that moves whole to a distinct slot

    def track(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """masks (t, K, N) of one window in the model's order -> (order (t, K): the model's slot
        index per name, labels (t, N): each token's slot name)."""
        from scipy.optimize import linear_sum_assignment

        orders, labels = [], []
        for frame in masks.float():
            k = frame.shape[0]
            if self.previous is None:
                order = torch.arange(k)
            else:
                current = tied_argmax(frame).long()  # (N,) in the model's order
                overlap = torch.zeros(k * k, dtype=torch.float64)
                overlap.index_add_(
                    0, self.previous * k + current, torch.ones(current.numel(), dtype=torch.float64)
                )
                overlap = overlap.view(k, k)  # (previous names, slots): shared tokens
                carried = self.carried  # (K,) the model's slot of each name one frame before
                group = tie_groups(frame)  # (K,) which slots the model cannot tell apart
                allowed = group[carried][:, None] == group[None, :]
                if self.whole_moves:
                    allowed |= whole_moves(overlap, carried)
                overlap[torch.arange(k), carried] += 0.5 / k  # a tie keeps the model's slot
                overlap[~allowed] = -1e9  # a name moves only within its slot's group
                _, cols = linear_sum_assignment(overlap.numpy(), maximize=True)
                order = torch.as_tensor(cols, dtype=torch.long)
            self.carried = order
            self.previous = tied_argmax(frame[order], prefer=self.previous).long()
            orders.append(order)
            labels.append(self.previous)
        return torch.stack(orders), torch.stack(labels)

    def order(self, masks: torch.Tensor) -> torch.Tensor:
        """masks (t, K, N) in the model's order -> (t, K) slot index per name (:meth:`track`)."""
        return self.track(masks)[0]


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
    (labels int64). Methods the model does not output (no STEVE decoder) are left out. The first
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
        slots = out["processor"]["state"][0].float().cpu()
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
