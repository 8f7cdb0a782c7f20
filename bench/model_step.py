"""Time one slot-model training step (forward + backward) at SlotContrast's MOVi-C setting.

Compares the MLP broadcast decoder with its factored first layer (the default) against the naive
broadcast-then-Linear form, in fp32 and under bf16 autocast. Runs are interleaved so that a busy
machine slows both variants alike; the ratio is the robust figure.

    python bench/model_step.py                       # CPU, MOVi-C: 256 tokens x 384, 11 x 64, 4 x 4
    python bench/model_step.py --device cuda --steps 50
    python bench/model_step.py --steve --vocab 4096 --grid 32   # with the STEVE decoder
    python bench/model_step.py --decoder-only --batch 1         # the feature decoder alone
    python bench/model_step.py --invariant --batch 8 --feature-dim 128 --slots 12 --threads 1
        # Invariant Slot Attention (grouper.invariant) against slot attention, attention mixing,
        # decoder 64: the room setting of docs/discovery.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egoslots.pipeline.model import SlotModel, SlotModelConfig  # noqa: E402


def build(args, naive: bool, invariant: bool = False) -> SlotModel:
    torch.manual_seed(0)
    extra = {}
    if args.invariant:  # the comparison runs both with the discovery benchmark's decoder
        extra = {
            "invariant": invariant,
            "decoder_mixing": "attention",
            "decoder_hidden_dims": (64,),
        }
    config = SlotModelConfig(
        feature_dim=args.feature_dim,
        num_tokens=args.tokens,
        num_slots=args.slots,
        slot_dim=args.slot_dim,
        steve=args.steve,
        vocab_size=args.vocab,
        token_grid=(args.grid, args.grid) if args.steve else None,
        **extra,
    )
    model = SlotModel(config).to(args.device)
    if naive:
        model.decoder.forward = model.decoder.forward_naive
    return model


def step(model, features, tokens, dtype, decoder_only=False):
    ctx = torch.autocast(features.device.type, dtype=dtype) if dtype else nullcontext()
    with ctx:
        if decoder_only:  # the MLP broadcast decoder alone, on random slots (B, T, K, D)
            B, T = features.shape[:2]
            slots = torch.randn(B, T, model.num_slots, model.slot_dim, device=features.device)
            recon, _ = model.decoder(slots.requires_grad_())
            loss = (recon.float() - features).square().mean()
        else:
            loss = model.losses(model(features, tokens))["loss"]
    loss.backward()
    model.zero_grad(set_to_none=True)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--feature-dim", type=int, default=384)
    p.add_argument("--slots", type=int, default=11)
    p.add_argument("--slot-dim", type=int, default=64)
    p.add_argument("--steve", action="store_true")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--grid", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--decoder-only", action="store_true", help="time the feature decoder alone")
    p.add_argument(
        "--invariant",
        action="store_true",
        help="compare Invariant Slot Attention with slot attention instead of the decoder forms",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    features = torch.randn(args.batch, args.frames, args.tokens, args.feature_dim, generator=g)
    tokens = torch.randint(
        0, args.vocab, (args.batch, args.frames, args.grid, args.grid), generator=g
    )
    features = features.to(args.device)
    tokens = tokens.to(args.device) if args.steve else None

    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(
        f"B={args.batch} T={args.frames} N={args.tokens} F={args.feature_dim} "
        f"K={args.slots} D={args.slot_dim} steve={args.steve} decoder_only={args.decoder_only}"
    )
    for label, dtype in (("fp32", None), ("bf16-autocast", torch.bfloat16)):
        if args.invariant:
            models = {"slot attention": build(args, False), "invariant": build(args, False, True)}
        else:
            models = {"factored": build(args, False), "naive": build(args, True)}
        times = {name: [] for name in models}
        for model in models.values():
            for _ in range(args.warmup):
                step(model, features, tokens, dtype, args.decoder_only)
        for _ in range(args.steps):
            for name, model in models.items():  # interleaved
                sync(args.device)
                t0 = time.perf_counter()
                step(model, features, tokens, dtype, args.decoder_only)
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        if args.invariant:
            a, b = med["slot attention"], med["invariant"]
            print(
                f"{label:14s} slot attention {a * 1e3:8.1f} ms/step   invariant {b * 1e3:8.1f} "
                f"ms/step   invariant/slot attention {b / a:.2f}x"
            )
            continue
        print(
            f"{label:14s} factored {med['factored'] * 1e3:8.1f} ms/step   "
            f"naive {med['naive'] * 1e3:8.1f} ms/step   naive/factored {med['naive'] / med['factored']:.2f}x"
        )


if __name__ == "__main__":
    main()
