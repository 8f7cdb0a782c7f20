"""One prepared GPU benchmark (< 8 minutes on one GPU): run it whenever a GPU is available and
put its table in docs/benchmarks.md with the GPU's name.

    python bench/gpu.py               # on a GPU: ViT-B/14 @ 224, the integrated model, batch 16 x 4
    python bench/gpu.py --no-compile  # without the torch.compile variants (faster)
    python bench/gpu.py --tiny        # tiny sizes on the CPU in seconds (run by the test suite)

Sections, each on its own (one that fails prints its error and the rest go on):

1. extraction: ``egoslots extract-features`` frames/s (decode workers, preprocessing, fp16
   store written with fsync) next to the bare backbone (ViT-B/14 at 224 px on already
   preprocessed batches, same compute dtype and fp16 host copy).
2. the train-slots step of the integrated model (dino_say_vitb14-sized features 256 x 768, 7
   slots x 128, STEVE decoder over 32 x 32 tokens of vocab 4096, batch 16 clips x 4 frames):
   from the cache (stage 3 as egoslots runs it: DataLoader workers, bf16 autocast where
   native) vs the same model with the ViT online in fp32 (SlotContrast's way) and in bf16,
   each with ``torch.compile`` off and on. Per variant: s/step, peak GPU memory, and the
   projected wall time of 100k steps.

All weights are random (no network): speed does not depend on them.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
import traceback
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent


def _bench_module(name: str):
    """bench/<name>.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


extract_bench = _bench_module("extract")  # also puts the repository on sys.path
train_bench = _bench_module("train")

from egoslots.pipeline.config import load_config  # noqa: E402
from egoslots.stages.machinery.runtime import bf16_native  # noqa: E402

# Sizes: (full GPU run, --tiny CPU run)
SIZES = {
    "full": dict(
        vit="vit_base_patch14_dinov2",
        vit_kwargs={},
        size=224,
        tokens=256,
        dim=768,
        slots=7,
        slot_dim=128,
        vocab=4096,
        token_grid=(32, 32),
        batch=16,
        frames=4,
        steps=10,
        warmup=3,
        extract_frames=512,
        model_overrides=[],
    ),
    "tiny": dict(
        vit="vit_small_patch14_dinov2",
        vit_kwargs=dict(depth=1, embed_dim=32, num_heads=2),
        size=28,
        tokens=4,
        dim=32,
        slots=2,
        slot_dim=16,
        vocab=16,
        token_grid=(4, 4),
        batch=2,
        frames=2,
        steps=1,
        warmup=1,
        extract_frames=16,
        model_overrides=[
            "decoder.hidden_dims=[16]",
            "steve_decoder.num_blocks=1",
            "steve_decoder.d_model=16",
            "steve_decoder.num_heads=2",
            "predictor.num_heads=2",
        ],
    ),
}


def section(title: str, fn, *args):
    """Run one section; an error is printed and the next section still runs."""
    print(f"\n=== {title}", flush=True)
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - a benchmark section must not stop the others
        print(f"[section failed: {title}]")
        traceback.print_exc()
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return extract_bench.machine()


# ------------------------------------------------------------------------------ 1. extraction
def extraction(s: dict, device: torch.device) -> tuple[float, float]:
    args = argparse.Namespace(
        vit=s["vit"],
        vit_kwargs=s["vit_kwargs"],
        size=s["size"],
        frames=s["extract_frames"],
        videos=2,
        height=240 if s["size"] >= 224 else 36,
        width=320 if s["size"] >= 224 else 48,
        batch=64 if device.type == "cuda" else 4,
        chunk=64 if device.type == "cuda" else 8,
        workers=2 if device.type == "cuda" else 0,
        repeats=2 if device.type == "cuda" else 1,
    )
    return extract_bench.bench_extraction(args)


# ------------------------------------------------------------------------------ 2. train-slots step
def train_step(s: dict, device: torch.device, compile_variants: bool, workers: int) -> list:
    import timm

    cfg = load_config(
        None,
        [
            f"globals.NUM_SLOTS={s['slots']}",
            f"globals.SLOT_DIM={s['slot_dim']}",
            f"globals.VOCAB_SIZE={s['vocab']}",
            f"globals.NUM_FRAMES={s['frames']}",
            f"globals.BATCH_SIZE_PER_GPU={s['batch']}",
            "steve_decoder.enabled=true",
            *s["model_overrides"],
        ],
    )
    native = bf16_native(device.type)
    print(
        f"features {s['tokens']} x {s['dim']}, {s['slots']} slots x {s['slot_dim']}, STEVE decoder "
        f"over {s['token_grid'][0]}x{s['token_grid'][1]} tokens (vocab {s['vocab']}), batch "
        f"{s['batch']} clips x {s['frames']} frames; {s['vit']} at {s['size']} px online; "
        f"native bf16: {native}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="egoslots-gpu-"))
    store = train_bench.make_store(
        tmp / "s.zarr",
        videos=8,
        frames=max(8, s["frames"] * 2),
        tokens=s["tokens"],
        dim=s["dim"],
        frame_size=s["size"],
        token_grid=s["token_grid"],
        vocab=s["vocab"],
    )
    vit = timm.create_model(
        s["vit"], pretrained=False, img_size=s["size"], num_classes=0, **s["vit_kwargs"]
    )
    vit = vit.to(device).eval().requires_grad_(False)
    model, _ = train_bench.build(cfg, s["dim"], s["tokens"], s["token_grid"])
    init = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device)
    variants = [  # name, fields read, ViT online, bf16 autocast
        ("cache (egoslots)", ("features", "tokens"), False, native),
        ("online ViT fp32 (SlotContrast)", ("frames", "tokens"), True, False),
        ("online ViT bf16", ("frames", "tokens"), True, True),
    ]
    rows = []
    for compiled in (False, True) if compile_variants else (False,):
        for name, fields, online, bf16 in variants:
            label = f"{name}{', compiled' if compiled else ''}"
            try:
                rows.append(
                    one_variant(
                        s,
                        cfg,
                        model,
                        init,
                        vit,
                        store,
                        label,
                        fields,
                        online,
                        bf16,
                        compiled,
                        workers,
                    )
                )
            except Exception as err:  # noqa: BLE001 - report and go on
                print(f"  {label}: failed ({type(err).__name__}: {err})")
            if compiled:
                torch._dynamo.reset()
    base = next((r for r in rows if r["name"] == variants[1][0]), None)
    print(
        "\n| variant | s/step | speed-up vs online fp32 | peak GPU memory | 100k steps |\n"
        "|---|---|---|---|---|"
    )
    for r in rows:
        speed = f"{base['step_s'] / r['step_s']:.2f}x" if base else "-"
        memory = f"{r['peak_gb']:.1f} GB" if r["peak_gb"] is not None else "-"
        print(
            f"| {r['name']} | {r['step_s']:.4f} | {speed} | {memory} | "
            f"{r['step_s'] * 100_000 / 3600:.1f} h |"
        )
    return rows


def one_variant(s, cfg, model, init, vit, store, label, fields, online, bf16, compiled, workers):
    device = next(model.parameters()).device
    model.load_state_dict(init)
    if compiled:
        model.compile()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    batches = train_bench.loader(store, cfg, fields, "bench", workers if not online else 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = train_bench.run_variant(
        label,
        cfg,
        model,
        opt,
        batches,
        s["steps"],
        vit=vit if online else None,
        autocast=bf16,
        sync_each_step=online,  # the SlotContrast way reads the loss every step
        warmup=s["warmup"],
    )
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    result["peak_gb"] = peak
    print(
        f"  {label}: {result['step_s']:.4f} s/step (with warm-up and compiling: "
        f"{time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    if compiled:  # back to the plain module for the next variant
        model._compiled_call_impl = None
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (seconds)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--skip-extraction", action="store_true")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers of the cache path")
    args = ap.parse_args()
    s = SIZES["tiny" if args.tiny else "full"]
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        print("no GPU here: the full sizes would take hours on a CPU; use --tiny")
        return
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    started = time.perf_counter()
    if not args.skip_extraction:
        section("1. extract-features vs the bare backbone", extraction, s, device)
    workers = 0 if args.tiny else args.workers
    section(
        "2. train-slots step: cache vs ViT online",
        train_step,
        s,
        device,
        not args.no_compile and not args.tiny,
        workers,
    )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
