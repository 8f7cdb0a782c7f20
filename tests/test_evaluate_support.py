"""A tiny store and trained run shared by the evaluate / export / visualize tests.

The store holds 6 videos (3 train, 3 test) of 6 frames, 32 px, with two moving squares, a
4x4 feature grid whose features say which object a patch shows, 8x8 dVAE token ids and
per-object attributes in meta.json. The run directory holds a resolved config and a
checkpoint of a small slot model obeying the SlotModel contract; ``install_run`` makes
``stages.train_slots.load_trained`` return it.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cache.store import FeatureStore, VideoRecord
from pipeline.config import load_config, save_resolved

SIZE, GRID, DIM, FRAMES, SLOTS, TOKEN_GRID, VOCAB = 32, 4, 8, 6, 4, 8, 16
DVAE_HASH = "dvae0000"


def square_video(seed: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Frames (T, S, S, 3), masks (T, S, S) and object attributes of two moving squares."""
    rng = np.random.default_rng(seed)
    frames = np.full((FRAMES, SIZE, SIZE, 3), 40, dtype=np.uint8)
    masks = np.zeros((FRAMES, SIZE, SIZE), dtype=np.uint8)
    objects = []
    for label, colour, mesh in ((1, (220, 30, 30), "cube"), (2, (30, 30, 220), "sphere")):
        side = int(rng.integers(8, 13))
        x, y = rng.integers(0, SIZE - side, 2)
        dx, dy = rng.integers(-2, 3, 2)
        positions = []
        for t in range(FRAMES):
            xt, yt = (
                int(np.clip(x + dx * t, 0, SIZE - side)),
                int(np.clip(y + dy * t, 0, SIZE - side)),
            )
            frames[t, yt : yt + side, xt : xt + side] = colour
            masks[t, yt : yt + side, xt : xt + side] = label
            positions.append([xt / SIZE, yt / SIZE, 0.0])
        # the synthetic generator's meta.json layout: mesh {name, id}, per-frame lists, None values
        objects.append(
            {
                "id": label,
                "mesh": {"name": mesh, "id": label - 1},
                "color": [c / 255 for c in colour],
                "size": side / SIZE,
                "texture": None,
                "positions": positions,
            }
        )
    return frames, masks, objects


def patch_features(masks: np.ndarray, rng) -> np.ndarray:
    """(T, N, D): each patch's label histogram in the first channels, plus noise."""
    p = SIZE // GRID
    t = masks.shape[0]
    blocks = (
        masks.reshape(t, GRID, p, GRID, p).transpose(0, 1, 3, 2, 4).reshape(t, GRID * GRID, p * p)
    )
    feats = np.zeros((t, GRID * GRID, DIM), dtype=np.float32)
    for label in range(3):
        feats[..., label] = (blocks == label).mean(-1)
    return feats + 0.05 * rng.standard_normal(feats.shape).astype(np.float32)


def make_store(
    root: Path, data_dir: Path, with_masks: bool = True, name: str = "store.zarr"
) -> FeatureStore:
    rng = np.random.default_rng(0)
    videos, arrays, first = [], {"frames": [], "masks": [], "features": []}, 0
    for i in range(6):
        vid = f"video_{i:02d}"
        frames, masks, objects = square_video(i)
        (data_dir / vid).mkdir(parents=True, exist_ok=True)
        (data_dir / vid / "meta.json").write_text(json.dumps({"fps": 6, "objects": objects}))
        videos.append(VideoRecord(vid, first, FRAMES, "train" if i < 3 else "test"))
        first += FRAMES
        arrays["frames"].append(frames)
        arrays["masks"].append(masks)
        arrays["features"].append(patch_features(masks, rng))
    store = FeatureStore.create(
        root / name,
        fingerprint="tinyfp",
        videos=videos,
        num_tokens=GRID * GRID,
        feature_dim=DIM,
        grid=(GRID, GRID),
        frame_size=SIZE,
        feature_dtype="float32",
        has_masks=with_masks,
        chunk_len=first,
    )
    chunk = {k: np.concatenate(v) for k, v in arrays.items() if with_masks or k != "masks"}
    store.write_chunk(0, chunk)
    store.mark_complete_if_done()
    sub = store.create_tokens(DVAE_HASH, (TOKEN_GRID, TOKEN_GRID), {"vocab_size": VOCAB})
    sub["ids"][:] = rng.integers(0, VOCAB, (first, TOKEN_GRID, TOKEN_GRID)).astype(np.uint16)
    sub["done"][:] = 1
    sub.attrs["complete"] = True
    return FeatureStore.open(root / name)


class TinySlotModel(nn.Module):
    """One slot-attention step per frame, following the SlotModel output contract."""

    def __init__(self, feature_dim=DIM, num_slots=SLOTS, slot_dim=6, vocab=VOCAB):
        super().__init__()
        self.slots = nn.Parameter(torch.randn(num_slots, slot_dim) * 2)
        self.key = nn.Linear(feature_dim, slot_dim)
        self.value = nn.Linear(feature_dim, slot_dim)
        self.alpha = nn.Linear(slot_dim, slot_dim)
        self.token_embed = nn.Embedding(vocab, slot_dim)

    def forward(self, features, tokens=None, init_state=None):
        b, t, n, _ = features.shape
        state = self.slots.expand(b, -1, -1) if init_state is None else init_state
        states, attn, dec, steve = [], [], [], []
        for i in range(t):
            k, v = self.key(features[:, i]), self.value(features[:, i])  # (B, N, D)
            logits = torch.einsum("bkd,bnd->bkn", state, k)
            a = logits.softmax(dim=1)  # (B, K, N)
            state = state + torch.einsum("bkn,bnd->bkd", a / a.sum(-1, keepdim=True), v)
            states.append(state)
            attn.append(a)
            dec.append(torch.einsum("bkd,bnd->bkn", self.alpha(state), k).softmax(dim=1))
            if tokens is not None:
                emb = self.token_embed(tokens[:, i].flatten(1))  # (B, h*w, D)
                steve.append(torch.einsum("bkd,bnd->bkn", state, emb).softmax(dim=1))
        out = {
            "processor": {
                "state": torch.stack(states, 1),
                "corrector": {"masks": torch.stack(attn, 1)},
            },
            "decoder": {"masks": torch.stack(dec, 1)},
            "next_state": state,
        }
        if steve:
            out["steve"] = {"masks": torch.stack(steve, 1)}
        return out


def make_run(
    tmp_path: Path, with_masks: bool = True, use_dvae: bool = True
) -> tuple[Path, FeatureStore]:
    """A run directory (config.yaml, inputs.json, checkpoints/last.ckpt) over a tiny store."""
    data_dir = tmp_path / "data"
    store = make_store(tmp_path, data_dir, with_masks)
    run_dir = tmp_path / "runs" / "slots"
    cfg = load_config(
        None,
        [
            f"work_dir={tmp_path}",
            f"dataset.path={data_dir}",
            "dataset.source=frames",
            f"globals.NUM_SLOTS={SLOTS}",
            "globals.NUM_FRAMES=4",
            "globals.SLOT_DIM=6",
            f"globals.USE_DVAE={str(use_dvae).lower()}",
            f"globals.USE_STEVE_DECODER={str(use_dvae).lower()}",
            f"store={store.path}",
            "evaluate.probe_train_videos=null",
        ],
    )
    save_resolved(cfg, run_dir / "config.yaml")
    (run_dir / "inputs.json").write_text(
        json.dumps(
            {
                "store": str(store.path),
                "fingerprint": store.fingerprint,
                "dvae_hash": DVAE_HASH if use_dvae else None,
            }
        )
    )
    torch.manual_seed(0)
    model = TinySlotModel()
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save(
        {"global_step": 7, "state_dict": model.state_dict()}, run_dir / "checkpoints" / "last.ckpt"
    )
    return run_dir, store


def fake_load_trained(run_dir, checkpoint="last"):
    """load_trained for runs made by :func:`make_run`."""
    from pipeline.config import load_config as load

    run_dir = Path(run_dir)
    cfg = load(run_dir / "config.yaml")
    model = TinySlotModel()
    ckpt = torch.load(run_dir / "checkpoints" / f"{checkpoint}.ckpt", weights_only=False)
    model.load_state_dict(ckpt["state_dict"])
    inputs = json.loads((run_dir / "inputs.json").read_text())
    return model.eval(), cfg, FeatureStore.open(inputs["store"]), inputs["dvae_hash"]


def install_run(monkeypatch) -> None:
    """Make ``stages.train_slots.load_trained`` load tiny runs."""
    module = types.ModuleType("stages.train_slots")
    module.load_trained = fake_load_trained
    monkeypatch.setitem(sys.modules, "stages.train_slots", module)


_TRAINED: dict = {}


def trained_run(tmp_path_factory) -> Path:
    """A real train-slots run (SlotModel with the STEVE decoder, 3 steps), trained once per session."""
    if "run" in _TRAINED:
        return _TRAINED["run"]
    from stages.train_slots import train

    work = tmp_path_factory.mktemp("trained")
    make_store(work / "stores", work / "data", name="tinyfp.zarr")
    dvae = work / "runs" / "dvae"
    dvae.mkdir(parents=True)
    from pipeline.dvae import DVAE

    torch.manual_seed(0)
    torch.save(DVAE(vocab_size=VOCAB, hidden=8).state_dict(), dvae / "dvae.pt")  # untrained weights
    (dvae / "dvae.json").write_text(
        json.dumps(
            {
                "hash": DVAE_HASH,
                "store": "tinyfp",
                "vocab_size": VOCAB,
                "hidden": 8,
                "token_grid": [TOKEN_GRID, TOKEN_GRID],
            }
        )
    )
    cfg = load_config(
        None,
        [
            f"work_dir={work}",
            "store=tinyfp",
            "run_name=slots",
            "seed=0",
            f"dataset.path={work / 'data'}",
            "dataset.source=frames",
            f"globals.NUM_SLOTS={SLOTS}",
            "globals.SLOT_DIM=16",
            f"globals.VOCAB_SIZE={VOCAB}",
            "globals.NUM_FRAMES=4",
            "globals.BATCH_SIZE_PER_GPU=2",
            "dataset.num_workers=0",
            "decoder.hidden_dims=[32,32]",
            "steve_decoder.num_blocks=1",
            "steve_decoder.d_model=16",
            "steve_decoder.num_heads=2",
            "predictor.num_heads=2",
            "optimizer.warmup_steps=1",
            "trainer.max_steps=3",
            "trainer.ckpt_every=3",
            "trainer.val_every=100",
            "trainer.log_every=1",
            "trainer.image_every=100",
            "trainer.precision=32",
            "trainer.accelerator=cpu",
            "evaluate.probe_train_videos=null",
        ],
    )
    _TRAINED["run"] = train(cfg)
    return _TRAINED["run"]
