"""Does stage 3 discover objects? Learning curves of the slot model on synthetic videos.

    python bench/discovery.py render                      # the three splits (cached on disk)
    python bench/discovery.py curve --encoder oracle --seeds 0 1 2 --minutes 4
    python bench/discovery.py curve --encoder patch-pixels --set slot_dim=32 --set loss_ss=0.5
    python bench/discovery.py baselines --split test
    python bench/discovery.py plot a.json b.json --labels A B --out curves.png

Data: the synthetic generator (``egoslots.pipeline.data.synthetic``), three disjoint generator seeds —
``train`` (seed 1000) to train on, ``val`` (seed 2000) to choose settings on, ``test`` (seed 3000)
only for the final figures. Nothing is ever tuned on ``test``.

Encoders (features per token, computed once per split and cached in memory):

- ``oracle``: bench-only. Every video draws one random unit vector per ground-truth label
  (background included); a token's feature is the area-weighted mix of the vectors of the labels
  inside its patch, plus Gaussian noise. The easiest input there is: if slot attention cannot
  group these, no encoder will help.
- ``patch-pixels``: the parameter-free encoder of the old demo (normalised RGB of each patch).
- ``vit:PATH[@SIZE]``: a frozen ViT loaded through the product's backbone factory: an
  ``encoder.pth`` or ``encoder.safetensors`` that ``egoslots pretrain-encoder`` exports (e.g.
  the demo's ``configs/encoders/synthetic-p8/encoder.safetensors``), or a backbone name; ``@SIZE``
  resizes the frames to SIZE px first (e.g. a patch-8 encoder at 128 px gives 16x16 tokens).
- ``file:PATH``: precomputed (V, T, N, D) features, ``{split}`` in the path (a cache of the
  above, to run many settings without recomputing them).

Training is the stage-3 model (``egoslots.pipeline.model.SlotModel``), its losses, Adam with the
product's warm-up/decay schedule and gradient-norm clipping, on random clips of the train
videos, in a plain loop (no Lightning, no store) so many variants run quickly. Scores are the
project's metrics (``egoslots.pipeline.metrics.evaluate_masks``: video FG-ARI and video mBO at the frame
resolution) on whole videos, for the decoder's masks and the slot-attention masks, raw and
refined to pixels with the video's colours (``pipeline/refine.py``, as ``egoslots evaluate``
reports them), beside per-video k-means on colours (per pixel, and per token at the slot grid),
per-video k-means on the encoder's features (what ``egoslots evaluate`` reports as "k-means per
video", raw and refined) and the grid.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egoslots.pipeline import baselines, metrics  # noqa: E402
from egoslots.pipeline.components import split_components  # noqa: E402
from egoslots.pipeline.dvae import DVAE, gumbel_tau, reconstruction_loss  # noqa: E402
from egoslots.pipeline.model import SlotModel, SlotModelConfig  # noqa: E402
from egoslots.pipeline.refine import refine_masks  # noqa: E402
from egoslots.pipeline.schedules import warmup_exp_decay  # noqa: E402
from egoslots.stages.machinery.pictures import PALETTE  # noqa: E402

SPLIT_SEEDS = {"train": 1000, "val": 2000, "test": 3000}
DEFAULT_CACHE = Path(os.environ.get("EGOSLOTS_BENCH_CACHE", "/tmp/egoslots-discovery"))


# --------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataSpec:
    videos: int = 96
    frames: int = 16
    size: int = 64
    min_objects: int | None = 3  # None: the scene family's own range (``scenes.object_range``)
    max_objects: int | None = 5
    scene: str = "tabletop"  # a scene family of the generator (``make-synthetic --scene``)

    def tag(self) -> str:
        """The part of cache file names that names the data (tabletop keeps its old names)."""
        from egoslots.pipeline.data.scenes import object_range

        lo, hi = object_range(self.scene, self.min_objects, self.max_objects)
        family = "" if self.scene == "tabletop" else f"-{self.scene}"
        return f"t{self.frames}-px{self.size}-o{lo}-{hi}{family}"

    def videos_of(self, split: str) -> int:
        return self.videos if split == "train" else max(8, self.videos // 4)


def _render_one(task):
    seed, index, frames, size, lo, hi, scene = task
    from egoslots.pipeline.data import synthetic as syn

    rng = syn.video_rng(seed, index)
    spec = syn.sample_scene(rng, frames, min_objects=lo, max_objects=hi, scene=scene)
    rgb, labels = [], []
    for r, m, _, _ in syn.render_video(spec, frames, size):
        rgb.append(r)
        labels.append(m)
    return np.stack(rgb).astype(np.uint8), np.stack(labels).astype(np.uint8)


def render_split(split: str, data: DataSpec, cache: Path = DEFAULT_CACHE) -> dict:
    """Frames (V, T, S, S, 3) uint8 and masks (V, T, S, S) uint8 of one split, cached as .npz."""
    n = data.videos_of(split)
    name = f"{split}-s{SPLIT_SEEDS[split]}-v{n}-{data.tag()}.npz"
    path = cache / name
    if path.exists():
        with np.load(path) as z:
            return {"frames": z["frames"], "masks": z["masks"], "name": split}
    cache.mkdir(parents=True, exist_ok=True)
    tasks = [
        (
            SPLIT_SEEDS[split],
            i,
            data.frames,
            data.size,
            data.min_objects,
            data.max_objects,
            data.scene,
        )
        for i in range(n)
    ]
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(max(1, min(2, os.cpu_count() or 1))) as pool:
        out = pool.map(_render_one, tasks)
    frames = np.stack([f for f, _ in out])
    masks = np.stack([m for _, m in out])
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, frames=frames, masks=masks)
    tmp.replace(path)
    print(f"# rendered {split}: {n} videos in {time.perf_counter() - start:.0f} s -> {path}")
    return {"frames": frames, "masks": masks, "name": split}


# ----------------------------------------------------------------------------------- encoders
def patch_label_fractions(masks: torch.Tensor, patch: int, num_labels: int) -> torch.Tensor:
    """masks (V, T, S, S) -> fraction of each label in each patch (V, T, N, L)."""
    onehot = F.one_hot(masks.long(), num_labels).float()  # (V, T, S, S, L)
    v, t, s, _, n_labels = onehot.shape
    x = onehot.permute(0, 1, 4, 2, 3).reshape(v * t, n_labels, s, s)
    frac = F.avg_pool2d(x, patch)  # (V*T, L, h, w)
    return frac.flatten(2).transpose(1, 2).reshape(v, t, -1, n_labels)


def oracle_features(
    masks: np.ndarray,
    patch: int,
    dim: int = 32,
    noise: float = 0.1,
    seed: int = 0,
    semantic: bool = False,
) -> torch.Tensor:
    """Per-video random unit vector per label, area-mixed per token, plus noise: (V, T, N, dim).

    ``semantic``: like features of a trained encoder, the background vector is the same in every
    video and every object vector shares one "object" direction (half its length) with the other
    objects; the other half is the object's own random identity.
    """
    m = torch.from_numpy(masks)
    num_labels = int(m.max()) + 1
    frac = patch_label_fractions(m, patch, num_labels)  # (V, T, N, L)
    gen = torch.Generator().manual_seed(seed)
    table = F.normalize(torch.randn(m.shape[0], num_labels, dim, generator=gen), dim=-1)
    if semantic:
        shared = F.normalize(
            torch.randn(2, dim, generator=torch.Generator().manual_seed(7)), dim=-1
        )
        table[:, 0] = shared[0]  # background: one vector for every video
        table[:, 1:] = F.normalize(table[:, 1:] + shared[1], dim=-1)  # objects: common direction
    feats = torch.einsum("vtnl,vld->vtnd", frac, table) * math.sqrt(dim)  # unit variance
    return feats + noise * torch.randn(feats.shape, generator=gen)


def encoder_features(name: str, frames: np.ndarray, patch: int, batch: int = 64) -> torch.Tensor:
    """Features (V, T, N, D) of a frozen encoder: ``patch-pixels`` or ``vit:PATH``."""
    from omegaconf import OmegaConf

    from egoslots.pipeline.backbones import PatchPixels, build_backbone

    size = frames.shape[2]
    if name == "patch-pixels":
        encoder = PatchPixels(size, patch)
    elif name.startswith("vit:"):  # vit:PATH or vit:PATH@INPUT_SIZE (frames resized to it)
        path, _, resize = name[4:].partition("@")
        size = int(resize or size)
        if path.endswith((".pth", ".safetensors")) and Path(path).is_file():  # pretrain-encoder
            cfg = {"name": "self", "checkpoint": path, "input_size": size}
        else:  # a backbone name
            cfg = {"name": path, "checkpoint": None, "input_size": size}
        encoder = build_backbone(OmegaConf.create(cfg))
    else:
        raise SystemExit(f"unknown encoder {name!r}: oracle | patch-pixels | vit:PATH[@SIZE]")
    encoder.eval()
    flat = torch.from_numpy(frames.reshape(-1, *frames.shape[2:]))
    out = []
    with torch.no_grad():
        for i in range(0, len(flat), batch):
            x = flat[i : i + batch].permute(0, 3, 1, 2).float() / 255.0
            if x.shape[-1] != size:  # upsampling: bilinear (antialias changes nothing here)
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            out.append(encoder(x).float())
    feats = torch.cat(out)
    return feats.reshape(*frames.shape[:2], *feats.shape[1:])


def features_for(encoder: str, split: dict, patch: int, seed: int) -> torch.Tensor:
    if encoder.startswith("file:"):  # precomputed (V, T, N, D) tensors, "{split}" in the path
        return torch.load(encoder[5:].format(split=split["name"]), weights_only=True).float()
    if encoder in ("oracle", "oracle-semantic"):
        # one table per split and seed: the vectors of a video never leak across splits
        return oracle_features(split["masks"], patch, seed=seed, semantic=encoder != "oracle")
    return encoder_features(encoder, split["frames"], patch)


DVAE_GRID = 16  # the dVAE's token grid on the bench's 64 px frames (4 px per token)


def dvae_tokens(data: DataSpec, vocab: int, steps: int, cache: Path, seed: int = 0) -> dict:
    """{split: (V, T, 16, 16) token ids} of a dVAE trained on the train split's frames with the
    demo's recipe (configs/demo.yaml: lr 1e-3, batch 32, tau 1 -> 0.1 over the run), cached."""
    key = f"dvae-v{vocab}-s{steps}-seed{seed}-{data.videos}-{data.tag()}.pt"
    path = cache / key
    if path.exists():
        return torch.load(path, weights_only=True)
    torch.manual_seed(seed)
    videos = {split: render_split(split, data, cache)["frames"] for split in SPLIT_SEEDS}
    frames = torch.from_numpy(videos["train"]).flatten(0, 1)  # (V*T, S, S, 3)
    dvae = DVAE(vocab, 64)
    opt = torch.optim.Adam(dvae.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        x = frames[torch.randint(len(frames), (32,), generator=gen)]
        x = x.permute(0, 3, 1, 2).float() / 255.0  # (32, 3, S, S)
        out = dvae(x, gumbel_tau(step, 1.0, 0.1, steps))
        loss = reconstruction_loss(out.recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tokens = {}
    for split, clips in videos.items():
        f = torch.from_numpy(clips)  # (V, T, S, S, 3)
        x = f.flatten(0, 1).permute(0, 3, 1, 2).float() / 255.0
        ids = torch.cat([dvae.encode_ids(x[i : i + 256]) for i in range(0, len(x), 256)])
        tokens[split] = ids.reshape(*f.shape[:2], *ids.shape[1:]).to(torch.int16)
    print(
        f"# dVAE: {steps} steps in {time.perf_counter() - start:.0f} s, last loss {float(loss.detach()):.1f}"
        f", codes used on train {len(torch.unique(tokens['train']))}/{vocab}"
    )
    torch.save(tokens, path)
    return tokens


# -------------------------------------------------------------------------------------- model
@dataclass
class Setting:
    """One point of the search: model and optimisation knobs (defaults = today's demo)."""

    num_slots: int = 6
    slot_dim: int = 64
    initializer: str = "fixed"
    n_iters: int = 2
    n_iters_first: int = 3
    decoder_hidden: tuple[int, ...] = (256, 256)
    predictor: bool = True
    loss_ss: float = 0.5
    loss_featrec: float = 1.0
    lr: float = 4e-4
    warmup: int = 100
    final_lr: float = 0.5  # the lr factor the decay reaches at the last step (0.5: SlotContrast's)
    clip: float = 0.05
    batch: int = 16
    clip_length: int = 4
    patch: int = 8
    bf16: bool = False  # bf16 autocast for the forward pass (losses stay float32)
    pos_emb: bool = False  # Slot Attention's soft position embedding added to the grouped inputs
    seed_init: bool = False  # first-frame slots from farthest-point seeds of that frame's keys
    eye_qkv: bool = False  # slot attention's q, k, v projections start as the identity
    dec_pos: bool = True  # False: no decoder position (decoder.positions=none's maths, measured so)
    mix: str = "alpha"  # decoder mixing weights: its own alpha masks | the slot-attention masks
    ema: float = 0.0  # > 0: score an exponential moving average of the weights (this decay)
    steve: bool = False  # STEVE's token decoder on the tokens of a dVAE trained here (the demo's)
    steve_blocks: int = 2
    steve_d_model: int = 64
    steve_detach: bool = False  # its cross-entropy trains the decoder only, not the slots
    loss_steve: float = 1.0
    vocab: int = 64
    dvae_steps: int = 400
    salient: float = 0.0  # > 0: feature loss weighted towards tokens far from the frame's mean
    redund: float = 0.0  # > 0: SRL's slot-redundancy warm-up loss, this weight (hynnsk/SRL)
    redund_steps: int = 100  # ... for the first this many steps (SRL: the first tenth)
    redund_pairs: int = 5  # ... over this many most-similar slot pairs per clip (SRL: 5)
    restarts: int = 1  # scoring: best of R first-slot draws on the first window (also 1 draw)
    extra: dict = field(default_factory=dict)

    def model(self, feature_dim: int, num_tokens: int) -> SlotModel:
        model = self._model(feature_dim, num_tokens)
        if self.seed_init:
            model.__class__ = SeededSlotModel
        if self.eye_qkv:
            sa = model.processor.corrector
            for lin in (sa.to_q, sa.to_k, sa.to_v):
                torch.nn.init.eye_(lin.weight)
        if not self.dec_pos:  # a zero, frozen position embedding: the decoder paints each
            # slot's one feature vector, so the loss is a soft k-means distortion of the features
            model.decoder.pos_emb.data.zero_()
            model.decoder.pos_emb.requires_grad_(False)
        return model

    def _model(self, feature_dim: int, num_tokens: int) -> SlotModel:
        config = SlotModelConfig(
            feature_dim=feature_dim,
            num_tokens=num_tokens,
            num_slots=self.num_slots,
            slot_dim=self.slot_dim,
            initializer=self.initializer,
            n_iters=self.n_iters,
            n_iters_first=self.n_iters_first,
            predictor=self.predictor,
            decoder_hidden_dims=tuple(self.decoder_hidden),
            decoder_mixing=self.mix,
            position_embedding=self.pos_emb,
            steve=self.steve,
            vocab_size=self.vocab,
            token_grid=(DVAE_GRID, DVAE_GRID) if self.steve else None,
            steve_blocks=self.steve_blocks,
            steve_d_model=self.steve_d_model,
            steve_dropout=0.0,
            steve_detach_slots=self.steve_detach,
            loss_weights={
                "loss_featrec": self.loss_featrec,
                "loss_ss": self.loss_ss,
                "loss_steve_ce": self.loss_steve,
            },
            **self.extra,
        )
        return SlotModel(config)


def farthest_point_seeds(x: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic k-means++-like seeding: indices (B, K) of K mutually far tokens of x (B, N, D).

    The first seed is the token farthest from the frame's mean; each next one the token farthest
    from every seed so far (cosine distance)."""
    x = F.normalize(x.float(), dim=-1)
    mean = F.normalize(x.mean(1, keepdim=True), dim=-1)  # (B, 1, D)
    dist = 1 - (x * mean).sum(-1)  # (B, N)
    picks = []
    for _ in range(k):
        i = dist.argmax(-1)  # (B,)
        picks.append(i)
        chosen = x[torch.arange(x.shape[0]), i]  # (B, D)
        dist = torch.minimum(dist, 1 - (x * chosen[:, None]).sum(-1))
    return torch.stack(picks, 1)


class SeededSlotModel(SlotModel):
    """SlotModel whose first-frame slots start from the data: the learned fixed slots plus the
    values of K far-apart tokens of the first frame (farthest-point seeds on the keys)."""

    def forward(self, features, tokens=None, init_state=None):
        if init_state is not None:
            return super().forward(features, tokens, init_state)
        B = features.shape[0]
        inputs = self.feature_mlp(features[:, 0])  # (B, N, D)
        keys, values = self.processor.corrector.project_inputs(inputs)
        with torch.no_grad():
            idx = farthest_point_seeds(keys, self.num_slots)  # (B, K)
        seeds = values[torch.arange(B)[:, None], idx]  # (B, K, D)
        init = self.initializer(B) + seeds
        return super().forward(features, tokens, init)  # carried: every frame n_iters


def parse_sets(pairs: list[str]) -> dict:
    """``key=value`` strings -> typed Setting fields (tuples as ``a,b``; ``extra.k=v`` allowed)."""
    out: dict = {}
    types = {f: type(v) for f, v in asdict(Setting()).items()}
    for pair in pairs:
        key, _, text = pair.partition("=")
        value = json.loads(text) if text[:1] in "[{" or text in ("true", "false") else text
        if key.startswith("extra."):
            out.setdefault("extra", {})[key[6:]] = _auto(value)
        elif types.get(key) is tuple:
            out[key] = tuple(int(x) for x in str(text).split(",") if x)
        elif types.get(key) is bool:
            out[key] = str(text).lower() in ("1", "true", "yes")
        elif key in types:
            out[key] = types[key](value)
        else:
            raise SystemExit(f"unknown setting {key!r}; known: {', '.join(types)}")
    return out


def _auto(value):
    if not isinstance(value, str):
        return value
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


# --------------------------------------------------------------------------------- evaluation
def colour_kmeans_token_masks(frames: np.ndarray, k: int, patch: int, seed: int) -> torch.Tensor:
    """Per-video k-means on the mean colour of each patch: one-hot (T, K, N) at the slot grid."""
    x = torch.from_numpy(frames).float().permute(0, 3, 1, 2)  # (T, 3, S, S)
    x = F.avg_pool2d(x, patch).permute(0, 2, 3, 1).round().to(torch.uint8)  # (T, h, w, 3)
    return baselines.colour_kmeans_masks(x, k, seed=seed)


def baseline_scores(
    split: dict, feats: torch.Tensor, k: int, patch: int, seed: int = 0, inits10: bool = True
) -> dict:
    """{method: [video_metrics per video]} of the training-free baselines. ``inits10``: also colour
    k-means with the best of 10 inits (the slowest baseline; its scores do not depend on the
    slots' setting, so families may skip it once measured)."""
    size = split["frames"].shape[2]
    grid = (size // patch, size // patch)
    out: dict[str, list] = {}
    for v in range(len(split["frames"])):
        true = torch.from_numpy(split["masks"][v]).long()
        t = true.shape[0]
        feature_kmeans = baselines.kmeans_masks(feats[v], k, "video", seed=seed)
        cands = {
            "colour k-means / pixel": (
                baselines.colour_kmeans_masks(torch.from_numpy(split["frames"][v]), k, seed=seed),
                (size, size),
            ),
            "colour k-means / pixel, best of 10 inits": (  # sklearn's n_init, by inertia
                baselines.colour_kmeans_masks(
                    torch.from_numpy(split["frames"][v]), k, seed=seed, n_init=10
                ),
                (size, size),
            ),
            "colour k-means / token": (  # the best of 10 inits (below) is left out without inits10
                colour_kmeans_token_masks(split["frames"][v], k, patch, seed),
                grid,
            ),
            "feature k-means / video": (feature_kmeans, grid),
            "feature k-means / video, refined": (
                refine_masks(feature_kmeans, split["frames"][v], grid),
                (size, size),
            ),
            "grid": (baselines.grid_masks(t, k, grid), grid),
        }
        if not inits10:
            del cands["colour k-means / pixel, best of 10 inits"]
        # every connected part its own tracked segment (pipeline/components.py), as for the slots
        split_kmeans = split_components(feature_kmeans, grid)
        cands["feature k-means / video, split"] = (split_kmeans, grid)
        cands["feature k-means / video, split, refined"] = (
            refine_masks(split_kmeans, split["frames"][v], grid),
            (size, size),
        )
        cands["colour k-means / pixel, split"] = (  # parts under one token's area are speckle
            split_components(cands["colour k-means / pixel"][0], (size, size), patch * patch),
            (size, size),
        )
        # what the token grid allows: each label's share of each token, as soft masks
        labels = int(split["masks"][v].max()) + 1
        ceiling = patch_label_fractions(true[None], patch, labels)[0].transpose(1, 2)
        cands["ceiling: ground truth per token"] = (ceiling, grid)
        cands["ceiling: ground truth per token, refined"] = (
            refine_masks(ceiling, split["frames"][v], grid),
            (size, size),
        )
        for name, (masks, g) in cands.items():
            out.setdefault(name, []).append(metrics.evaluate_masks(masks, true, g))
    return out


@torch.no_grad()
def model_scores(
    model: SlotModel,
    split: dict,
    feats: torch.Tensor,
    patch: int,
    restarts: int = 1,
    window: int = 4,
    draw1: bool = True,
) -> dict:
    """{"decoder": [...], "attention": [...], "decoder_refined": [...], "attention_refined":
    [...]}: video_metrics of whole videos, one pass each; ``_refined``: the masks taken to pixels
    with the video's colours (pipeline/refine.py). ``restarts`` > 1: the first slots are the best
    of that many draws on the first ``window`` frames (``SlotModel.best_first_slots``, as
    evaluate does), and the one-draw scores are added as ``draw1_attention[_refined]`` (unless
    ``draw1`` is False)."""
    model.eval()
    size = split["frames"].shape[2]
    grid = (size // patch, size // patch)
    out: dict[str, list] = {}
    for v in range(len(feats)):
        true = torch.from_numpy(split["masks"][v]).long()

        def score(name: str, masks: torch.Tensor, v=v, true=true) -> None:  # raw and refined
            out.setdefault(name, []).append(metrics.evaluate_masks(masks, true, grid))
            fine = refine_masks(masks.float(), split["frames"][v], grid)
            out.setdefault(f"{name}_refined", []).append(
                metrics.evaluate_masks(fine, true, (size, size))
            )
            if name == "attention":  # every connected part its own tracked segment, then refined
                parts = split_components(masks.float(), grid)
                out.setdefault(f"{name}_split", []).append(
                    metrics.evaluate_masks(parts, true, grid)
                )
                out.setdefault(f"{name}_split_refined", []).append(
                    metrics.evaluate_masks(
                        refine_masks(parts, split["frames"][v], grid), true, (size, size)
                    )
                )

        if restarts > 1 and draw1:  # the plain draw too, side by side
            with torch.random.fork_rng():
                torch.manual_seed(0)
                score(
                    "draw1_attention", model(feats[v : v + 1])["processor"]["corrector"]["masks"][0]
                )
        with torch.random.fork_rng():  # a Gaussian initializer's draws: the same every time
            torch.manual_seed(0)
            first = model.best_first_slots(feats[v : v + 1, :window], restarts)
            o = model(feats[v : v + 1], first_slots=first)
        attention, decoder = o["processor"]["corrector"]["masks"][0], o["decoder"]["masks"][0]
        score("attention", attention)
        if torch.equal(decoder, attention):  # attention mixing: the same masks, scored once
            out.setdefault("decoder", []).append(out["attention"][-1])
            out.setdefault("decoder_refined", []).append(out["attention_refined"][-1])
        else:
            score("decoder", decoder)
    model.train()
    return out


@torch.no_grad()
def picture(model, split: dict, feats: torch.Tensor, setting, path: str, videos=(0, 1, 2)) -> None:
    """Rows per video: frames, GT, attention argmax, decoder argmax (every 3rd frame)."""
    from PIL import Image

    model.eval()
    size = split["frames"].shape[2]
    g = size // setting.patch
    rows = []
    for v in videos:
        o = model(feats[v : v + 1])
        att = metrics.masks_to_labels(o["processor"]["corrector"]["masks"][0], (size, size), (g, g))
        dec = metrics.masks_to_labels(o["decoder"]["masks"][0], (size, size), (g, g))
        ts = range(0, split["frames"].shape[1], 3)
        for kind in ("rgb", "gt", "att", "dec"):
            tiles = []
            for t in ts:
                if kind == "rgb":
                    tiles.append(split["frames"][v, t])
                elif kind == "gt":
                    tiles.append(PALETTE[split["masks"][v, t] % len(PALETTE)])
                else:
                    lab = (att if kind == "att" else dec)[t].numpy()
                    tiles.append(PALETTE[lab % len(PALETTE)])
            rows.append(np.concatenate(tiles, 1))
    Image.fromarray(np.concatenate(rows, 0)).resize(
        (rows[0].shape[1] * 2, len(rows) * size * 2), 0
    ).save(path)
    model.train()


def mean_of(per_video: list[dict], key: str) -> float:
    vals = [d[key] for d in per_video if np.isfinite(d[key])]
    return float(np.mean(vals)) if vals else float("nan")


# ----------------------------------------------------------------------------------- training
def train_curve(
    setting: Setting,
    train_feats: torch.Tensor,
    eval_split: dict,
    eval_feats: torch.Tensor,
    seed: int,
    minutes: float | None,
    steps: int | None,
    every: int,
    log=print,
    train_tokens: torch.Tensor | None = None,
    score_start: bool = True,
    draw1: bool = True,
) -> list[dict]:
    """Train one model; score it on the eval split every ``every`` steps. Returns the curve.
    ``train_tokens`` (V, T, h, w): dVAE ids for the STEVE decoder (``setting.steve``);
    ``score_start``: also score the untrained model (step 0); ``draw1``: see model_scores."""
    torch.manual_seed(seed)
    v, t, n, d = train_feats.shape
    model = setting.model(d, n)
    opt = torch.optim.Adam(model.parameters(), lr=setting.lr)
    total = steps or 10**9
    gen = torch.Generator().manual_seed(seed)
    curve = []
    start = time.perf_counter()
    step = 0
    spent = 0.0  # training seconds only (evaluation excluded)

    averaged = None
    if setting.ema > 0:  # Polyak averaging: the scored model is the weights' moving average
        averaged = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(setting.ema)
        )

    def record():
        scored = model if averaged is None else averaged.module
        scores = model_scores(
            scored, eval_split, eval_feats, setting.patch, setting.restarts, setting.clip_length,
            draw1,
        )  # fmt: skip
        row = {"step": step, "seconds": round(spent, 1)}
        for name, per_video in scores.items():
            row[f"{name}_fg_ari"] = mean_of(per_video, "video_fg_ari")
            row[f"{name}_mbo"] = mean_of(per_video, "video_mbo")
            row[f"{name}_frame_fg_ari"] = mean_of(per_video, "frame_fg_ari")
        curve.append(row)
        log(
            f"  step {step:6d} {spent:7.0f}s  loss {loss_value:.4f}  "
            f"dec {100 * row['decoder_fg_ari']:5.1f}/{100 * row['decoder_mbo']:5.1f}  "
            f"att {100 * row['attention_fg_ari']:5.1f}/{100 * row['attention_mbo']:5.1f}  "
            f"att refined {100 * row['attention_refined_fg_ari']:5.1f}/{100 * row['attention_refined_mbo']:5.1f}  "
            f"split refined {100 * row['attention_split_refined_fg_ari']:5.1f}/{100 * row['attention_split_refined_mbo']:5.1f}  "
            f"frame FG-ARI dec {100 * row['decoder_frame_fg_ari']:5.1f} att {100 * row['attention_frame_fg_ari']:5.1f}"
        )

    loss_value = float("nan")
    if score_start:
        record()
    while step < total and (minutes is None or spent < minutes * 60):
        tick = time.perf_counter()
        vids = torch.randint(v, (setting.batch,), generator=gen)
        starts = torch.randint(t - setting.clip_length + 1, (setting.batch,), generator=gen)
        idx = starts[:, None] + torch.arange(setting.clip_length)
        batch = train_feats[vids[:, None], idx]  # (B, T, N, D)
        tokens = None if train_tokens is None else train_tokens[vids[:, None], idx].long()
        factor = warmup_exp_decay(
            step,
            setting.warmup,
            max(total, setting.warmup + 1),
            decay=steps is not None,
            final_factor=setting.final_lr,
        )
        for g in opt.param_groups:
            g["lr"] = setting.lr * factor
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting.bf16):
            out = model(batch, tokens)
        losses = model.losses(out)
        if setting.salient > 0:  # (1 - a) + a * distance to the frame's mean feature, mean 1
            weighted = salient_featrec(out["decoder"]["reconstruction"], batch, setting.salient)
            losses["loss"] = losses["loss"] + setting.loss_featrec * (
                weighted - losses["loss_featrec"]
            )
        if setting.redund > 0 and step < setting.redund_steps:
            losses["loss"] = losses["loss"] + setting.redund * redundancy_loss(
                out["processor"]["state"][:, -1],
                out["processor"]["corrector"]["masks"][:, -1],
                setting.redund_pairs,
            )
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if setting.clip and setting.steve_detach:  # each part clipped on its own gradient
            for part in model.parameter_parts():
                torch.nn.utils.clip_grad_norm_(part, setting.clip)
        elif setting.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), setting.clip)
        opt.step()
        if averaged is not None:
            averaged.update_parameters(model)
        loss_value = float(losses["loss"].detach())
        step += 1
        spent += time.perf_counter() - tick
        if step % every == 0:
            record()
    if not curve or curve[-1]["step"] != step:
        record()
    train_curve.last_model = model if averaged is None else averaged.module
    log(f"  ({step} steps, {time.perf_counter() - start:.0f} s wall with evaluation)")
    return curve


def redundancy_loss(slots: torch.Tensor, masks: torch.Tensor, pairs: int) -> torch.Tensor:
    """SRL's slot-redundancy warm-up (Seong, Moon, Heo, ICLR 2026; github.com/hynnsk/SRL,
    ``Slot_Redundancy_Loss``): in each clip's last frame take the ``pairs`` most cosine-similar
    slot pairs greedily (a slot in one pair only), keep the slot of each pair whose attention
    over the tokens is flatter, and push that attention towards uniform: the mean KL(p || U).
    Two deliberate differences: p is the slot's attention renormalised over tokens (the weights
    of its update), since SRL's softmax of the logits over tokens is not among our outputs; and
    the flatter slot and the KL are taken on the clip's last frame only (SRL: averaged over the
    clip's frames). slots (B, K, D), masks (B, K, N) -> scalar."""
    b, k, n = masks.shape
    p = masks / masks.sum(-1, keepdim=True).clamp_min(1e-12)  # (B, K, N)
    kl = (p * p.clamp_min(1e-12).log()).sum(-1) + np.log(n)  # (B, K), 0 for a uniform slot
    unit = F.normalize(slots.detach().float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)  # (B, K, K)
    sim = sim.masked_fill(torch.eye(k, dtype=torch.bool), -float("inf"))
    kept = []
    for i in range(b):
        s = sim[i].clone()
        for _ in range(min(pairs, k // 2)):
            a, c = divmod(int(s.argmax()), k)
            kept.append((i, a if kl[i, a] <= kl[i, c] else c))
            s[[a, c], :] = -float("inf")
            s[:, [a, c]] = -float("inf")
    rows, cols = zip(*kept)
    return kl[list(rows), list(cols)].mean()


def salient_featrec(recon: torch.Tensor, feats: torch.Tensor, a: float) -> torch.Tensor:
    """The feature loss with each token's squared error weighted by (1 - a) + a * w, w its
    squared distance to its frame's mean feature over that distance's frame mean: tokens unlike
    the rest of the frame (small objects) count more than the floor. recon, feats (B, T, N, D)."""
    feats = feats.float()
    err = (recon.float() - feats).pow(2).mean(-1)  # (B, T, N)
    dist = (feats - feats.mean(2, keepdim=True)).pow(2).sum(-1)  # (B, T, N)
    w = dist / dist.mean(2, keepdim=True).clamp_min(1e-8)
    return ((1 - a + a * w) * err).mean()


# ------------------------------------------------------------------------------------ commands
def machine() -> str:
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line),
            platform.processor(),
        )
    except OSError:
        model = platform.processor()
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def cmd_render(args, data: DataSpec) -> None:
    for split in ("train", "val", "test"):
        s = render_split(split, data, args.cache)
        print(
            f"{split}: {s['frames'].shape}, objects/video {np.mean([len(np.unique(m)) - 1 for m in s['masks']]):.1f}"
        )


def cmd_baselines(args, data: DataSpec) -> None:
    split = render_split(args.split, data, args.cache)
    feats = features_for(args.encoder, split, args.patch, seed=SPLIT_SEEDS[args.split])
    scores = baseline_scores(split, feats, args.slots, args.patch)
    print(
        f"# {args.split} split, {len(split['frames'])} videos, K={args.slots}, patch {args.patch}"
    )
    print("| baseline | video FG-ARI | video mBO |\n|---|---|---|")
    for name, per_video in scores.items():
        print(
            f"| {name} | {100 * mean_of(per_video, 'video_fg_ari'):.1f} | {100 * mean_of(per_video, 'video_mbo'):.1f} |"
        )


def cmd_curve(args, data: DataSpec) -> None:
    setting = Setting(**{"patch": args.patch, "num_slots": args.slots, **parse_sets(args.set)})
    train = render_split("train", data, args.cache)
    split = render_split(args.split, data, args.cache)
    train_feats = features_for(args.encoder, train, setting.patch, seed=SPLIT_SEEDS["train"])
    if args.train_videos:  # a smaller training set (the demo trains on 32 videos)
        train_feats = train_feats[: args.train_videos]
    eval_feats = features_for(args.encoder, split, setting.patch, seed=SPLIT_SEEDS[args.split])
    print(f"# {machine()}")
    print(f"# encoder {args.encoder} {tuple(train_feats.shape)}; eval on {args.split}; {setting}")
    train_tokens = None
    if setting.steve:
        train_tokens = dvae_tokens(data, setting.vocab, setting.dvae_steps, args.cache)["train"]
        train_tokens = train_tokens[: len(train_feats)]
    curves = []
    for seed in args.seeds:
        print(f"# seed {seed}")
        curves.append(
            train_curve(
                setting,
                train_feats,
                split,
                eval_feats,
                seed,
                args.minutes,
                args.steps,
                args.every,
                train_tokens=train_tokens,
            )
        )
        if args.save:  # the trained model, to score other mask post-processing without retraining
            Path(args.save).mkdir(parents=True, exist_ok=True)
            torch.save(train_curve.last_model.state_dict(), Path(args.save) / f"seed{seed}.pt")
    base = {}
    if not args.no_baselines:
        base = baseline_scores(split, eval_feats, setting.num_slots, setting.patch)
    if args.picture:
        picture(train_curve.last_model, split, eval_feats, setting, args.picture)
    if args.out:
        record = {
            "encoder": args.encoder,
            "split": args.split,
            "setting": asdict(setting),
            "data": asdict(data),
            "train_videos": len(train_feats),
            "machine": machine(),
            "curves": curves,
            "baselines": {
                k: {m: mean_of(v, m) for m in ("video_fg_ari", "video_mbo")}
                for k, v in base.items()
            },
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
    finals = [c[-1] for c in curves]
    print("\n| method | video FG-ARI | video mBO |\n|---|---|---|")
    names = ["decoder", "attention", "decoder_refined", "attention_refined"]
    names += ["attention_split", "attention_split_refined"]
    if setting.restarts > 1:  # the same model with one draw of the first slots
        names += ["draw1_attention", "draw1_attention_refined"]
    for name in names:
        fa = [100 * f[f"{name}_fg_ari"] for f in finals]
        mb = [100 * f[f"{name}_mbo"] for f in finals]
        print(
            f"| slots: {name.replace('_refined', '').replace('_split', '')} masks{', split' * ('_split' in name)}{', refined' * name.endswith('refined')} | {np.mean(fa):.1f} ± {np.std(fa):.1f} | {np.mean(mb):.1f} ± {np.std(mb):.1f} |"
        )
    for name, per_video in base.items():
        print(
            f"| {name} | {100 * mean_of(per_video, 'video_fg_ari'):.1f} | {100 * mean_of(per_video, 'video_mbo'):.1f} |"
        )


FAMILY_ROWS = {  # the cross-family table: its row names -> (result key, where it comes from)
    "slots, raw": "attention",
    "slots, refined": "attention_refined",
    "slots, split": "attention_split",
    "slots, split, refined": "attention_split_refined",
    "colour k-means per video": "colour k-means / pixel",
    "colour k-means per video, best of 10 inits": "colour k-means / pixel, best of 10 inits",
    "feature k-means per video": "feature k-means / video",
    "feature k-means per video, refined": "feature k-means / video, refined",
    "feature k-means per video, split": "feature k-means / video, split",
    "feature k-means per video, split, refined": "feature k-means / video, split, refined",
    "colour k-means per video, split": "colour k-means / pixel, split",
    "grid": "grid",
    "ceiling: ground truth per token, refined": "ceiling: ground truth per token, refined",
}


def family_data(data: DataSpec, scene: str) -> DataSpec:
    """The bench's data spec for one scene family: tabletop keeps 3-5 objects, the others their
    family's own object range."""
    lo, hi = (3, 5) if scene == "tabletop" else (None, None)
    return DataSpec(data.videos, data.frames, data.size, lo, hi, scene)


def cmd_families(args, data: DataSpec) -> None:
    """One setting, every scene family: train on each family's train videos (one model per
    seed), score on its ``--split`` videos beside the baselines, one table. The family the
    setting was chosen on is named with ``--chosen-on``; the others are reported apart."""
    setting = Setting(**{"patch": args.patch, "num_slots": args.slots, **parse_sets(args.set)})
    print(f"# {machine()}")
    print(f"# encoder {args.encoder}; {args.split} split; chosen on {args.chosen_on}; {setting}")
    results: dict = {}
    for scene in args.families:
        fam = family_data(data, scene)
        train = render_split("train", fam, args.cache)
        split = render_split(args.split, fam, args.cache)
        train_feats = features_for(args.encoder, train, setting.patch, seed=SPLIT_SEEDS["train"])
        eval_feats = features_for(args.encoder, split, setting.patch, seed=SPLIT_SEEDS[args.split])
        rows: dict[str, list[tuple[float, float]]] = {}
        for seed in args.seeds:
            start = time.perf_counter()
            final = train_curve(
                setting, train_feats, split, eval_feats, seed, None, args.steps, args.steps,
                log=lambda *_: None, score_start=False, draw1=False,
            )[-1]  # fmt: skip
            if args.save:  # each family's and seed's model, to score other post-processing later
                Path(args.save).mkdir(parents=True, exist_ok=True)
                model = train_curve.last_model
                torch.save(model.state_dict(), Path(args.save) / f"{scene}-seed{seed}.pt")
            for label, key in list(FAMILY_ROWS.items())[:4]:
                rows.setdefault(label, []).append((final[f"{key}_fg_ari"], final[f"{key}_mbo"]))
            print(
                f"# {scene} seed {seed}: refined {100 * final['attention_refined_fg_ari']:.1f} / "
                f"{100 * final['attention_refined_mbo']:.1f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        base = {}
        if not args.no_baselines:  # the same for every seed: one process may score them for all
            base = baseline_scores(
                split, eval_feats, setting.num_slots, setting.patch, inits10=not args.no_inits10
            )
        for label, key in list(FAMILY_ROWS.items())[4:]:
            if key not in base:
                continue
            rows[label] = [(mean_of(base[key], "video_fg_ari"), mean_of(base[key], "video_mbo"))]
        results[scene] = rows
    print(
        f"\n| {args.split} videos, x100, video FG-ARI / mBO | "
        + " | ".join(f"{s}{' (chosen on)' if s == args.chosen_on else ''}" for s in results)
        + " |"
    )
    print("|---|" + "---|" * len(results))
    for label in FAMILY_ROWS:
        if any(label not in rows for rows in results.values()):
            continue  # a row left out (--no-inits10)
        cells = []
        for rows in results.values():
            vals = np.array(rows[label]) * 100  # (seeds, 2)
            spread = f" ± {vals[:, 0].std():.1f}" if len(vals) > 1 else ""
            cells.append(f"{vals[:, 0].mean():.1f}{spread} / {vals[:, 1].mean():.1f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "encoder": args.encoder, "split": args.split, "chosen_on": args.chosen_on,
            "setting": asdict(setting), "data": asdict(data), "seeds": args.seeds,
            "machine": machine(), "results": results,
        }, indent=1))  # fmt: skip


def cmd_plot(args, data: DataSpec) -> None:
    """Learning curves of finished runs (their --out JSON files) as one PNG: video FG-ARI and
    video mBO of the slot masks (``--masks``) against steps (mean over seeds), with per-video
    colour k-means as a dashed line. Pillow only, so the bench needs no plotting library."""
    from PIL import Image, ImageDraw, ImageFont

    runs = [json.loads(Path(f).read_text()) for f in args.files]
    labels = args.labels or [Path(f).stem for f in args.files]
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
    panel_w, panel_h, pad, legend_h = 420, 300, 50, 22 * len(runs) + 10
    img = Image.new("RGB", (2 * panel_w + pad, panel_h + 2 * pad + legend_h), "white")
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 13)
    except OSError:
        font = ImageFont.load_default()
    max_step = max(r["curves"][0][-1]["step"] for r in runs)
    for panel, (metric, title) in enumerate(
        [("fg_ari", "video FG-ARI x100"), ("mbo", "video mBO x100")]
    ):
        x0, y0 = pad + panel * (panel_w + pad // 2), pad

        def xy(step, value, x0=x0, y0=y0):
            w, h = panel_w - pad, panel_h - pad
            return x0 + w * step / max_step, y0 + h * (1 - value / 0.8)  # y axis 0 .. 80

        draw.rectangle([xy(0, 0.8), xy(max_step, 0)], outline="black")
        draw.text((x0, y0 - 22), title, fill="black", font=font)
        for v in (0.2, 0.4, 0.6):
            draw.line([xy(0, v), xy(max_step, v)], fill="#dddddd")
            draw.text((x0 - 24, xy(0, v)[1] - 7), f"{100 * v:.0f}", fill="black", font=font)
        draw.text((xy(max_step, 0)[0] - 70, xy(0, 0)[1] + 4), f"{max_step} steps", fill="black",
                  font=font)  # fmt: skip
        if args.bar:  # given: the runs were scored --no-baselines
            bar = float(args.bar.split(",")[panel]) / 100
        else:
            scored = [r for r in runs if r["baselines"]]
            if not scored:
                raise SystemExit("no run has baselines: give colour k-means' figures, --bar A,B")
            bar = scored[0]["baselines"]["colour k-means / pixel"][f"video_{metric}"]
        for sx in range(0, max_step, max(1, max_step // 40)):
            draw.line([xy(sx, bar), xy(min(sx + max_step / 80, max_step), bar)], fill="black")
        for i, run in enumerate(runs):
            points = []
            for j, row in enumerate(run["curves"][0]):
                vals = [c[j][f"{args.masks}_{metric}"] for c in run["curves"] if len(c) > j]
                points.append(xy(row["step"], float(np.mean(vals))))
            draw.line(points, fill=colours[i % len(colours)], width=3)
    for i, label in enumerate([*labels, "colour k-means per video (dashed)"]):
        y = panel_h + pad + 10 + 22 * i
        colour = colours[i % len(colours)] if i < len(runs) else "black"
        draw.line([(pad, y + 7), (pad + 30, y + 7)], fill=colour, width=3)
        draw.text((pad + 40, y), label, fill="black", font=font)
    img.save(args.out)
    print(f"wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("command", choices=("render", "baselines", "curve", "families", "plot"))
    ap.add_argument(
        "--families", nargs="+", default=["tabletop", "room", "clutter"], help="families: scenes"
    )
    ap.add_argument(
        "--no-inits10", action="store_true", help="families: skip colour k-means' 10-init row"
    )
    ap.add_argument(
        "--no-baselines",
        action="store_true",
        help="families, curve: slot rows only (the baselines do not depend on the seed: score them in "
        "one of the processes that share a family)",
    )
    ap.add_argument("--chosen-on", default="room", help="families: the family settings came from")
    ap.add_argument("files", nargs="*", help="plot: the JSON files of finished curves")
    ap.add_argument("--labels", nargs="*", default=None, help="plot: one label per file")
    ap.add_argument(
        "--bar", default=None, help="plot: colour k-means' FG-ARI,mBO x100 (runs without baselines)"
    )
    ap.add_argument(
        "--masks",
        default="attention",
        choices=(
            "attention",
            "decoder",
            "attention_refined",
            "decoder_refined",
            "attention_split_refined",
        ),
        help="plot: which slot masks the curves show",
    )
    ap.add_argument("--encoder", default="oracle")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--videos", type=int, default=96, help="train videos (val/test: a quarter)")
    ap.add_argument(
        "--train-videos", type=int, default=None, help="curve: train on the first N train videos"
    )
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--scene", default="tabletop", help="scene family: tabletop | room | clutter")
    ap.add_argument(
        "--min-objects", type=int, default=None, help="default: 3 on tabletop, else the family's"
    )
    ap.add_argument("--max-objects", type=int, default=None, help="default: 5 on tabletop, ...")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--slots", type=int, default=6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="curve: JSON of the curves; plot: the PNG")
    ap.add_argument("--picture", default=None, help="PNG of masks on 3 eval videos (last seed)")
    ap.add_argument(
        "--save", default=None, help="curve, families: folder for each seed's final state dict"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.minutes is None and args.steps is None:
        args.minutes = 3.0
    lo, hi = args.min_objects, args.max_objects
    if args.scene == "tabletop":  # the bench's tabletop has always had 3-5 objects
        lo, hi = (3 if lo is None else lo), (5 if hi is None else hi)
    data = DataSpec(args.videos, args.frames, args.size, lo, hi, args.scene)
    commands = {"render": cmd_render, "baselines": cmd_baselines, "curve": cmd_curve}
    commands["plot"] = cmd_plot
    commands["families"] = cmd_families
    commands[args.command](args, data)


if __name__ == "__main__":
    main()
