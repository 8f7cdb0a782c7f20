"""Compute budgets of the released settings (docs/reproduce.md): counted FLOPs, store sizes and
the GPU hours they predict.

Nothing here is timed. For each released config the script builds the real modules on the meta
device (no memory, no weights) and counts the matmul / convolution / attention FLOPs of

- extraction: one frame through the frozen encoder, cut after its feature block;
- the dVAE (configs with one): one training step (forward + backward) on a batch of frames;
- train-slots: one training step (forward, losses, backward) on a batch of cached clips,

with ``torch.utils.flop_counter.FlopCounterMode`` (elementwise work, normalisation and the
optimizer are not counted: they add little FLOPs but, for small models, much of the time; that
is what the utilisation assumption below absorbs). GPU hours = FLOPs / (peak x utilisation).

    python bench/reproduce.py                      # the table in docs/reproduce.md
    python bench/reproduce.py --peak 989e12        # another GPU's dense bf16 peak (H100 SXM)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from egoslots.pipeline.config import load_config  # noqa: E402
from egoslots.pipeline.dvae import DVAE, reconstruction_loss  # noqa: E402
from egoslots.pipeline.model import SlotModel  # noqa: E402

# Videos and frames per video of the data sets as SlotContrast's shard scripts write them
# (MOVi: tfds movi_c / movi_e 128x128, 24 frames; YT-VIS 2021: SlotContrast keeps the last 300
# train videos for validation; its frame count per video varies, ~30 is an assumption).
DATASETS = {
    "movi_c": {"train": 9737, "val": 250, "frames": 24},
    "movi_e": {"train": 9749, "val": 250, "frames": 24},
    "ytvis2021": {"train": 2685, "val": 300, "frames": 30},
}
SETTINGS = [
    ("SlotContrast MOVi-C", "slotcontrast_movi_c.yaml", "movi_c"),
    ("SlotContrast MOVi-E", "slotcontrast_movi_e.yaml", "movi_e"),
    ("SlotContrast YT-VIS 2021", "slotcontrast_ytvis2021.yaml", "ytvis2021"),
    ("STEVE MOVi-C", "steve_movi_c.yaml", "movi_c"),
]


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def encoder_on_meta(cfg):
    """(encoder module or None for patch-pixels, tokens N, feature dim D) of the config."""
    b = cfg.backbone
    size = int(b.input_size)
    if b.name == "patch-pixels":
        p = int(b.patch_size)
        return None, (size // p) ** 2, 3 * p * p
    import timm

    with torch.device("meta"):
        vit = timm.create_model(str(b.name), pretrained=False, img_size=size, num_classes=0)
    p = int(vit.patch_embed.patch_size[0])
    return vit, (size // p) ** 2, int(vit.embed_dim)


def extraction_flops(cfg, vit) -> int:
    if vit is None:
        return 0
    size = int(cfg.backbone.input_size)
    x = torch.empty(1, 3, size, size, device="meta")
    return count(
        lambda: vit.forward_intermediates(
            x, indices=[len(vit.blocks) - 1], intermediates_only=True, stop_early=True
        )
    )


def dvae_step_flops(cfg) -> int:
    d = cfg.dvae
    size = int(cfg.globals.FRAME_SIZE)
    with torch.device("meta"):
        model = DVAE(int(d.vocab_size), int(d.hidden), arch=str(d.arch))
    frames = torch.empty(int(d.batch_size), 3, size, size, device="meta")

    def step():
        reconstruction_loss(model(frames, 1.0).recon, frames).backward()

    return count(step)


def slots_step_flops(cfg, tokens: int, dim: int) -> int:
    b, t = int(cfg.dataset.batch_size), int(cfg.dataset.ep_length)
    grid = None
    if cfg.globals.USE_STEVE_DECODER:
        side = int(cfg.globals.FRAME_SIZE) // 4
        grid = (side, side)
    with torch.device("meta"):
        model = SlotModel.from_config(cfg, dim, tokens, grid)
    feats = torch.empty(b, t, tokens, dim, device="meta")
    ids = None if grid is None else torch.zeros(b, t, *grid, dtype=torch.long, device="meta")

    def step():
        out = model(feats, ids)
        model.losses(out)["loss"].backward()

    return count(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak", type=float, default=312e12, help="dense bf16 FLOP/s (A100)")
    parser.add_argument(
        "--utilisation", type=float, nargs=2, default=(0.4, 0.1), metavar=("HIGH", "LOW")
    )
    args = parser.parse_args()
    hi, lo = args.utilisation
    print(
        f"GPU hours at {args.peak / 1e12:.0f} TFLOP/s dense bf16 peak, {hi:.0%} .. {lo:.0%} "
        "utilisation (counted matmul/conv/attention FLOPs; not measured)\n"
    )
    print(
        "| setting | extraction GFLOP/frame | frames cached | store (fp16 features) | "
        "dVAE step TFLOP | slots step TFLOP | steps | total PFLOP | GPU hours |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, name, data in SETTINGS:
        cfg = load_config(ROOT / "configs" / name)
        vit, tokens, dim = encoder_on_meta(cfg)
        ds = DATASETS[data]
        flips = 2 if cfg.augment.hflip == "cache" else 1
        frames = (ds["train"] * flips + ds["val"]) * ds["frames"]
        per_frame = extraction_flops(cfg, vit)
        fs = int(cfg.globals.FRAME_SIZE)
        store_bytes = frames * (tokens * dim * 2 + fs * fs * 3 + fs * fs)
        dvae = dvae_step_flops(cfg) if cfg.globals.USE_DVAE else 0
        dvae_steps = int(cfg.dvae.max_steps) if cfg.globals.USE_DVAE else 0
        slots = slots_step_flops(cfg, tokens, dim)
        steps = int(cfg.trainer.max_steps)
        total = per_frame * frames + dvae * dvae_steps + slots * steps
        hours = [total / (args.peak * u) / 3600 for u in (hi, lo)]
        print(
            f"| {label} | {per_frame / 1e9:.1f} | {frames:,} | {store_bytes / 1e9:.0f} GB | "
            f"{dvae / 1e12:.2f} | {slots / 1e12:.2f} | {steps // 1000}k | {total / 1e15:.0f} | "
            f"{hours[0]:.1f} .. {hours[1]:.1f} |"
        )


if __name__ == "__main__":
    main()
