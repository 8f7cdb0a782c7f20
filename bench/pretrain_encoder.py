"""Stage 0 speed: DINO training frames/s next to a bare forward+backward of the same ViT.

Three figures per setting, measured side by side in one process (their ratios are what to trust
on a shared machine):

- ``bare``: the student ViT alone, forward + backward + AdamW step on every crop of a batch
  (2 global + N local crops of the same sizes), no head, teacher, loss or augmentation: the
  floor for any training of this ViT;
- ``dino``: one DINO step on crops already in memory: teacher on the global crops, student and
  head on all crops, the loss, AdamW, per-parameter clipping and the EMA update
  (egoslots.pipeline.dino.DINO, as stages/pretrain_encoder.py runs it);
- ``crops``: the multi-crop augmentation alone, both implementations: lightly's per-image PIL
  pipeline (egoslots.pipeline.multicrop.MultiCrop, one process: what one DataLoader worker sustains) and
  the batched torch one (BatchMultiCrop, the default, run in the training step).

``frames/s`` counts source frames (each one gives 2 + N crops).

    python bench/pretrain_encoder.py                          # the demo ViT, fp32 and bf16
    python bench/pretrain_encoder.py --preset vits16 --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dvae import autocast, sync  # noqa: E402
from egoslots.pipeline.dino import DINO, DinoArch  # noqa: E402
from egoslots.pipeline.multicrop import BatchMultiCrop, CropRecipe, MultiCrop  # noqa: E402

# name: (patch, dim, depth, heads, image, local size, local crops, out_dim, hidden, bottleneck)
PRESETS = {
    "demo": (8, 128, 4, 4, 64, 32, 4, 1024, 512, 128),  # configs/encoder_demo.yaml
    "demo-p4": (4, 128, 4, 4, 64, 32, 4, 1024, 512, 128),  # 16x16 grid
    "vit-tiny64": (8, 192, 12, 3, 64, 32, 4, 4096, 1024, 256),
    "vits16": (16, 384, 12, 6, 224, 96, 8, 65536, 2048, 256),  # DINO's ViT-S/16
    "vitb16": (16, 768, 12, 12, 224, 96, 8, 65536, 2048, 256),
}


CPU_SECONDS: list[float] = []  # CPU time of each timed() call (one thread: what a free core gives)


def timed(step, steps: int, device: torch.device) -> float:
    """Wall seconds per call of ``step`` (after one warm-up call); its CPU seconds per call go to
    CPU_SECONDS (on a shared machine the CPU time is the steady figure)."""
    step()
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync(device)
    CPU_SECONDS.append((time.process_time() - cpu) / steps)
    return (time.perf_counter() - start) / steps


def model_figures(preset: str, batch: int, steps: int, device, precision: str) -> dict:
    patch, dim, depth, heads, image, local, n_local, out, hidden, bottleneck = PRESETS[preset]
    torch.manual_seed(0)
    arch = DinoArch(patch, dim, depth, heads, 4.0, image, out, hidden, bottleneck)
    model = DINO(arch, drop_path_rate=0.1).to(device)
    views = [torch.randn(batch, 3, image, image, device=device) for _ in range(2)]
    views += [torch.randn(batch, 3, local, local, device=device) for _ in range(n_local)]
    dino_opt = torch.optim.AdamW(model.param_groups())
    vit = model.student["backbone"]
    bare_opt = torch.optim.AdamW(vit.parameters())

    def dino_step():
        with autocast(device, precision):
            loss, _ = model(views, 0.04)
        dino_opt.zero_grad(set_to_none=True)
        loss.backward()
        model.clip_gradients(3.0)
        dino_opt.step()
        model.update_teacher(0.996)

    def bare_step():
        with autocast(device, precision):
            groups = [views[:2], views[2:]] if n_local else [views[:2]]  # one pass per crop size
            loss = sum(vit(torch.cat(g)).float().square().mean() for g in groups)
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()

    bare = timed(bare_step, steps, device)
    dino = timed(dino_step, steps, device)
    return {"bare": batch / bare, "dino": batch / dino, "dino_cpu": batch / CPU_SECONDS[-1]}


def crop_figures(preset: str, batch: int, frames: int, device) -> dict[str, float]:
    """frames/s of the two crop implementations: lightly's per-image PIL pipeline (one process,
    as one DataLoader worker runs it) and the batched torch one (as the training step runs it)."""
    patch, dim, depth, heads, image, local, n_local, *_ = PRESETS[preset]
    recipe = CropRecipe(image, local, n_local, blur_sigma=(0.1, 2.0 * image / 224))
    pil, batched = MultiCrop(recipe), BatchMultiCrop(recipe)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, image, image, 3), dtype=np.uint8)
    start = time.perf_counter()
    for i in range(frames):
        pil(images[i % batch], i)
    out = {"lightly": frames / (time.perf_counter() - start)}
    stacked = torch.from_numpy(images).to(device)

    def one_batch(offset=[0]):  # noqa: B006 - a counter: new positions every call
        offset[0] += batch
        params = torch.stack([batched.params(offset[0] + i, image) for i in range(batch)])
        batched(stacked, params)

    out["batched"] = batch / timed(one_batch, max(1, frames // batch), device)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", nargs="+", default=["demo"], choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--crop-frames", type=int, default=200)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device {device} ({name or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}")  # fmt: skip
    print(f"{'preset':>11} {'precision':>9} {'bare fwd+bwd':>14} {'DINO step':>11} {'ratio':>6} "
          f"{'DINO step per CPU-second':>25}")  # fmt: skip
    for preset in args.preset:
        for precision in args.precision:
            f = model_figures(preset, args.batch, args.steps, device, precision)
            print(
                f"{preset:>11} {precision:>9} {f['bare']:>8.1f} fr/s {f['dino']:>6.1f} fr/s "
                f"{f['dino'] / f['bare']:>6.2f} {f['dino_cpu']:>20.1f} fr/s",
                flush=True,
            )
        crops = crop_figures(preset, args.batch, args.crop_frames, device)
        print(f"{preset:>11} multi-crop alone: lightly (PIL, 1 process) {crops['lightly']:.1f} "
              f"fr/s, batched (torch) {crops['batched']:.1f} fr/s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
