"""Stage 2 speed: dVAE training steps/s and tokenization frames/s (fp32 vs bf16 autocast).

Measures the model work only (random frames in memory, no store I/O): one training step is
forward, STEVE's reconstruction loss, backward and an Adam step at the default vocabulary (4096)
and batch (32); tokenization is ``encode_ids`` on uint8 frames as ``tokenize`` feeds it.
Both precisions run side by side in one process, so their ratio is the figure to trust on a
shared machine.

    python bench/dvae.py                       # 64 and 128 px, fp32 and bf16, this machine
    python bench/dvae.py --sizes 128 --steps 10 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egoslots.pipeline.dvae import DVAE, reconstruction_loss  # noqa: E402
from egoslots.stages.tokenize import encode_frames  # noqa: E402


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps_per_s(
    size: int, vocab: int, batch: int, steps: int, device: torch.device, precision: str
) -> float:
    torch.manual_seed(0)
    model = DVAE(vocab).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    frames = torch.rand(batch, 3, size, size, device=device)

    def step():
        with autocast(device, precision):
            out = model(frames, tau=1.0)
        loss = reconstruction_loss(out.recon, frames)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocations, kernel selection)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps / (time.perf_counter() - start)


def tokenize_frames_per_s(
    size: int, vocab: int, frames: int, batch: int, device: torch.device, precision: str
) -> float:
    torch.manual_seed(0)
    model = DVAE(vocab).to(device).eval()
    data = torch.randint(0, 256, (frames, size, size, 3), dtype=torch.uint8).numpy()
    with autocast(device, precision):
        encode_frames(model, data[:batch], batch, device)  # warm-up
        sync(device)
        start = time.perf_counter()
        encode_frames(model, data, batch, device)
        sync(device)
    return frames / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per setting")
    parser.add_argument("--frames", type=int, default=256, help="frames tokenized per setting")
    parser.add_argument("--tokenize-batch", type=int, default=64)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"vocab {args.vocab}, batch {args.batch}"
    )
    print("| frame px | tokens | precision | train steps/s | train frames/s | tokenize frames/s |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for precision in args.precisions:
            steps = train_steps_per_s(size, args.vocab, args.batch, args.steps, device, precision)
            tokens = tokenize_frames_per_s(
                size, args.vocab, args.frames, args.tokenize_batch, device, precision
            )
            print(
                f"| {size} | {(size // 4) ** 2} | {precision} | {steps:.3g} | {steps * args.batch:.3g} | "
                f"{tokens:.3g} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
