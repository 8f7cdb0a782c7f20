"""Stage 3 training speed, measured side by side in one run (ratios are what count).

    python bench/train.py                 # MOVi-C setting + STEVE path, a few steps each
    python bench/train.py --steps 8 --equal-steps 40
    python bench/train.py --stage-defaults  # train-slots / pretrain-dvae defaults vs fp32

MOVi-C setting (SlotContrast's own): ViT-S/14 at 224 px -> 256 tokens x 384, 11 slots x 64,
batch 4 clips x 4 frames, no STEVE decoder. Three ways to run the same SlotModel step:

  online-fp32   frames -> random-init timm vit_small_patch14_dinov2 (no grad) -> slot model, fp32,
                loss.item() every step (the SlotContrast way)
  cache-fp32    features read from a feature store by a DataLoader in the main process, fp32,
                loss.item() every step
  cache-fast    stage 3 as egoslots runs it: store -> DataLoader workers (read-ahead, pinned),
                bf16 autocast where native (else fp32), no host-device sync in the step

Then: the share of step time per component (forward hooks on the model's parts; backward and
optimizer timed as a whole), the share spent waiting for data, and the losses after N steps in
fp32 vs the fast path (same init, same batches). Finally the STEVE path alone (128 px frames ->
32x32 = 1024 tokens, 15 slots, batch 4 clips x 3 frames, vocab 4096): egoslots' decoder reading
cached token ids vs STEVE's own step (dVAE encoder on the frames every step, Gumbel one-hot
4096-wide tokens, one-hot @ embedding matmul) in front of the same decoder.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egoslots.cache.reader import ClipDataset  # noqa: E402
from egoslots.cache.store import FeatureStore, VideoRecord  # noqa: E402
from egoslots.pipeline.config import load_config  # noqa: E402
from egoslots.stages.machinery.datamodules import collate_clips  # noqa: E402
from egoslots.stages.machinery.runtime import bf16_native  # noqa: E402
from egoslots.stages.machinery.slot_task import build_param_groups  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ data
def make_store(
    path: Path,
    videos: int,
    frames: int,
    tokens: int,
    dim: int,
    frame_size: int,
    token_grid=None,
    vocab: int = 0,
    seed: int = 0,
) -> FeatureStore:
    rng = np.random.default_rng(seed)
    recs = [VideoRecord(f"v{i}", i * frames, frames, "train") for i in range(videos)]
    side = int(math.isqrt(tokens))
    st = FeatureStore.create(
        path,
        fingerprint="bench",
        videos=recs,
        num_tokens=tokens,
        feature_dim=dim,
        grid=(side, side),
        frame_size=frame_size,
        feature_dtype="float16",
        chunk_len=frames,
    )
    for c in range(videos):
        st.write_chunk(
            c,
            {
                "features": rng.standard_normal((frames, tokens, dim), dtype=np.float32).astype(
                    np.float16
                ),
                "frames": rng.integers(0, 255, (frames, frame_size, frame_size, 3), dtype=np.uint8),
            },
        )
    st.mark_complete_if_done()
    if token_grid:
        sub = st.create_tokens("bench", token_grid, {})
        sub["ids"][:] = rng.integers(0, vocab, (st.num_frames, *token_grid)).astype(np.uint16)
        sub["done"][:] = 1
        sub.attrs["complete"] = True
    return FeatureStore.open(path)


def loader(store, cfg, fields, tokens, workers: int, seed: int = 0):
    ds = ClipDataset(store, "train", cfg.dataset.ep_length, fields=fields, tokens=tokens)
    g = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10_000, generator=g)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.dataset.batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_clips,
    )


# ------------------------------------------------------------------------------ model + step
def build(cfg, feature_dim, num_tokens, token_grid=None, seed=0):
    from egoslots.pipeline.model import SlotModel

    torch.manual_seed(seed)
    model = SlotModel.from_config(cfg, feature_dim, num_tokens, token_grid)
    groups = build_param_groups(
        model.named_parameters(), cfg.optimizer.param_groups, cfg.optimizer.lr
    )
    opt = torch.optim.Adam(groups, lr=cfg.optimizer.lr)
    return model, opt


COMPONENTS = {  # report name -> class names of the SlotModel parts (pipeline/slots.py, ...)
    "feature MLP": ("FeatureMLP",),
    "slot attention": ("SlotAttention",),
    "predictor": ("SlotPredictor",),
    "feature decoder": ("MLPBroadcastDecoder",),
    "STEVE decoder": ("SteveDecoder",),
}
TIMED_METHODS = ("forward", "iterate", "project_inputs")  # slot attention is run via iterate()


def _get(module, path):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, torch.nn.Module) else None


class ComponentTimer:
    """Forward time of each part of the model: its forward (and iterate/project_inputs) methods
    are wrapped on the instance with timers (synchronised on GPUs), summed over calls."""

    def __init__(self, model):
        self.times = defaultdict(float)
        self.wrapped = []
        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        self.depth = 0
        for name, classes in COMPONENTS.items():
            for mod in model.modules():
                if type(mod).__name__ in classes:
                    for method in TIMED_METHODS:
                        if hasattr(type(mod), method):
                            self._wrap(mod, method, name)

    def _wrap(self, mod, method, name):
        real = getattr(mod, method)

        def timed(*a, **k):
            if self.depth:  # nested (e.g. forward calling iterate): count once, at the outside
                return real(*a, **k)
            self.depth += 1
            self.sync()
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self.sync()
                self.times[name] += time.perf_counter() - t0
                self.depth -= 1

        setattr(mod, method, timed)
        self.wrapped.append((mod, method))

    def remove(self):
        for mod, method in self.wrapped:
            delattr(mod, method)


def run_variant(
    name,
    cfg,
    model,
    opt,
    batches,
    steps,
    *,
    vit=None,
    autocast=False,
    sync_each_step=True,
    timer=None,
    warmup=2,
):
    """Run warmup + steps training steps; returns a dict of timings and the losses."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    device = next(model.parameters()).device
    ctx = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if autocast
        else contextlib.nullcontext
    )
    model.train()
    t_data = t_fwd = t_bwd = t_opt = 0.0
    losses = []
    it = iter(batches)
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            t_data = t_fwd = t_bwd = t_opt = 0.0
            if timer:
                timer.times.clear()
            start = time.perf_counter()
        t0 = time.perf_counter()
        batch = next(it)
        feats = batch["features"].to(device, non_blocking=True) if "features" in batch else None
        tokens = batch["tokens"].to(device, non_blocking=True) if "tokens" in batch else None
        t1 = time.perf_counter()
        with ctx():
            if vit is not None:  # the SlotContrast way: the frozen ViT runs inside the step
                frames = batch["frames"].to(device)
                b, t = frames.shape[:2]
                x = frames.flatten(0, 1).permute(0, 3, 1, 2).float() / 255.0
                with torch.no_grad():
                    f = vit.forward_features(x)[:, vit.num_prefix_tokens :]
                feats = f.reshape(b, t, *f.shape[1:])
            out = model(feats, tokens)
            loss_dict = model.losses(out)
        sync()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_dict["loss"].backward()
        sync()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        opt.step()
        if sync_each_step:
            losses.append({k: v.item() for k, v in loss_dict.items()})
        else:
            losses.append({k: v.detach() for k, v in loss_dict.items()})
        sync()
        t4 = time.perf_counter()
        t_data += t1 - t0
        t_fwd += t2 - t1
        t_bwd += t3 - t2
        t_opt += t4 - t3
    total = time.perf_counter() - start
    losses = [{k: float(v) for k, v in d.items()} for d in losses]
    b = cfg.dataset.batch_size
    return {
        "name": name,
        "step_s": total / steps,
        "steps_per_s": steps / total,
        "clips_per_s": steps * b / total,
        "data": t_data / total,
        "forward": t_fwd / total,
        "backward": t_bwd / total,
        "optimizer": t_opt / total,
        "components": {k: v / total for k, v in (timer.times.items() if timer else [])},
        "losses": losses,
    }


# ------------------------------------------------------------------------------ MOVi-C
def movi_c(args, tmp: Path):
    cfg = load_config(
        ROOT / "configs" / "slotcontrast_movi_c.yaml",
        [
            f"work_dir={tmp}",
            "globals.BATCH_SIZE_PER_GPU=4",
            "globals.NUM_FRAMES=4",
            "trainer.precision=auto",
        ],
    )
    tokens, dim = 256, 384
    store = make_store(
        tmp / "movi.zarr", videos=8, frames=8, tokens=tokens, dim=dim, frame_size=224
    )
    native = bf16_native("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"# MOVi-C setting: {tokens} tokens x {dim}, {cfg.model.num_slots} slots x {cfg.model.slot_dim}, "
        f"batch {cfg.dataset.batch_size} clips x {cfg.dataset.ep_length} frames; device {device}, "
        f"threads {torch.get_num_threads()}, native bf16: {native}"
    )
    import timm

    vit = (
        timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=0)
        .to(device)
        .eval()
    )
    for p in vit.parameters():
        p.requires_grad_(False)

    results = []
    model, opt = build(cfg, dim, tokens)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device)
    online = loader(store, cfg, ("frames",), None, workers=0)
    timer = ComponentTimer(model)
    results.append(
        run_variant("online-fp32", cfg, model, opt, online, args.steps, vit=vit, timer=timer)
    )
    timer.remove()

    model.load_state_dict(init)
    opt = torch.optim.Adam(
        build_param_groups(model.named_parameters(), [], cfg.optimizer.lr), lr=cfg.optimizer.lr
    )
    timer = ComponentTimer(model)
    results.append(
        run_variant(
            "cache-fp32",
            cfg,
            model,
            opt,
            loader(store, cfg, ("features",), None, 0),
            args.steps,
            timer=timer,
        )
    )
    timer.remove()

    model.load_state_dict(init)
    opt = torch.optim.Adam(
        build_param_groups(model.named_parameters(), [], cfg.optimizer.lr),
        lr=cfg.optimizer.lr,
        fused=True if device.type == "cuda" else None,
    )
    timer = ComponentTimer(model)
    fast = run_variant(
        "cache-fast",
        cfg,
        model,
        opt,
        loader(store, cfg, ("features",), None, args.workers),
        args.steps,
        autocast=native,
        sync_each_step=False,
        timer=timer,
    )
    timer.remove()
    fast["name"] += " (bf16)" if native else " (fp32: no native bf16)"
    results.append(fast)

    base = results[0]["step_s"]
    print("\n| variant | s/step | steps/s | clips/s | speed-up vs online-fp32 | data wait |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['name']} | {r['step_s']:.2f} | {r['steps_per_s']:.3f} | {r['clips_per_s']:.2f} | "
            f"{base / r['step_s']:.2f}x | {100 * r['data']:.1f}% |"
        )
    print("\nShare of step time (forward parts from hooks; backward and optimizer as a whole):")
    names = list(COMPONENTS) + ["backward (all)", "optimizer + clip", "data wait"]
    print("| part | " + " | ".join(r["name"] for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for n in names:
        cells = []
        for r in results:
            v = {
                "backward (all)": r["backward"],
                "optimizer + clip": r["optimizer"],
                "data wait": r["data"],
            }.get(n, r["components"].get(n))
            cells.append("-" if v is None else f"{100 * v:.1f}%")
        print(f"| {n} | " + " | ".join(cells) + " |")
    if results[0]["components"]:
        vit_share = results[0]["forward"] - sum(results[0]["components"].values())
        print(f"(online-fp32: ViT + loss forward = {100 * vit_share:.1f}% of the step)")

    # ---------------------------------------------------------------- losses after N steps
    if args.equal_steps:
        print(
            f"\nLosses after {args.equal_steps} steps on the same batches (cache); the noise reference is "
            "fp32 from another init seed. Mean over the last 5 steps:"
        )
        curves = {}
        for label, ac, seed in (
            ("fp32", False, 0),
            ("fast", native, 0),
            ("fp32 (seed 1)", False, 1),
        ):
            if seed == 0:
                model.load_state_dict(init)
            else:
                torch.manual_seed(seed)
                model.load_state_dict(build(cfg, dim, tokens, seed=seed)[0].state_dict())
            opt = torch.optim.Adam(
                build_param_groups(model.named_parameters(), [], cfg.optimizer.lr),
                lr=cfg.optimizer.lr,
            )
            torch.manual_seed(1)
            r = run_variant(
                label,
                cfg,
                model,
                opt,
                loader(store, cfg, ("features",), None, 0, seed=5),
                args.equal_steps,
                autocast=ac,
                sync_each_step=False,
                warmup=0,
            )
            curves[label] = r["losses"]
        for key in ("loss_featrec", "loss_ss", "loss"):
            last = {k: float(np.mean([d[key] for d in v[-5:]])) for k, v in curves.items()}
            print(
                f"  {key}: fp32 {last['fp32']:.4f}  fast {last['fast']:.4f}  "
                f"|fast - fp32| {abs(last['fast'] - last['fp32']):.4f}  "
                f"(noise: |fp32 seed 1 - fp32| {abs(last['fp32 (seed 1)'] - last['fp32']):.4f}; "
                f"start {curves['fp32'][0][key]:.4f})"
            )
    return results


# ------------------------------------------------------------------------------ stage defaults
def step_timer():
    """A Lightning callback: wall time between the ends of consecutive training steps, and the
    precision the trainer ran in."""
    import lightning as L

    class Timer(L.Callback):
        def __init__(self):
            self.ends: list[float] = []
            self.precision = "?"

        def on_train_start(self, trainer, *args):
            self.precision = str(trainer.precision)

        def on_train_batch_end(self, trainer, *args):
            self.ends.append(time.perf_counter())

        def step_s(self, skip: int) -> float:
            gaps = np.diff(self.ends)[skip:]  # the first steps pay for warm-up
            return float(np.median(gaps))

    return Timer()


def stage_runs(store: Path, work: Path, overrides: list[str], run: str, steps: int, stage: str):
    """One real train-slots / pretrain-dvae run of ``steps`` steps (the stage's own code, its
    precision and thread defaults); returns (median s/step after 2 warm-up steps, precision)."""
    from egoslots.stages import pretrain_dvae, train_slots

    timer = step_timer()
    if stage == "dvae":
        run_keys = [f"dvae.run_name={run}", f"dvae.max_steps={steps}", "dvae.ckpt_every=1000000"]
    else:
        run_keys = [f"run_name={run}", f"trainer.max_steps={steps}"]
    cfg = load_config(
        ROOT / "configs" / "slotcontrast_movi_c.yaml",
        [f"work_dir={work}", f"store={store}", *overrides, *run_keys],
    )
    if stage == "dvae":
        pretrain_dvae.pretrain(cfg, callbacks=[timer], tokenize=False)
    else:
        real = train_slots.make_trainer
        train_slots.make_trainer = lambda *a, callbacks, **k: real(
            *a, callbacks=[*callbacks, timer], **k
        )
        try:
            train_slots.train(cfg)
        finally:
            train_slots.make_trainer = real
    return timer.step_s(2), timer.precision


def stage_defaults(args, tmp: Path):
    """Done-when of issue 15, side by side in one process, rounds interleaved (A B C A B C):
    `train-slots` with its defaults vs trainer.precision=32 vs the same model with the ViT
    online in fp32 (SlotContrast's way), at the MOVi-C setting; then the dVAE stage with its
    defaults vs dvae.precision=32."""
    import lightning as L  # noqa: F401 - the timers are Lightning callbacks

    from egoslots.stages.machinery.common import setup_logging
    from egoslots.stages.machinery.runtime import configure_threads

    setup_logging()  # the stages' own lines: "precision auto -> ...", "torch threads: ..."
    tokens, dim = 256, 384
    store = make_store(
        tmp / "movi.zarr", videos=8, frames=8, tokens=tokens, dim=dim, frame_size=224
    )
    common = [
        "globals.BATCH_SIZE_PER_GPU=4",
        "globals.NUM_FRAMES=4",
        "trainer.val_batches=0",
        "trainer.log_every=1",
        "trainer.image_every=1000000",
        "trainer.ckpt_every=1000000",
        "optimizer.warmup_steps=0",
    ]
    cfg = load_config(ROOT / "configs" / "slotcontrast_movi_c.yaml", [f"work_dir={tmp}", *common])
    print(
        f"# stage defaults, MOVi-C setting: {tokens} tokens x {dim}, {cfg.model.num_slots} slots x "
        f"{cfg.model.slot_dim}, batch 4 clips x 4 frames; {args.default_steps} steps per run, "
        f"median step after 2; {args.rounds} rounds interleaved"
    )
    import timm

    vit = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=0
    ).eval()
    vit.requires_grad_(False)
    times: dict[str, list[float]] = defaultdict(list)
    chosen = {}
    for r in range(args.rounds):
        for name, extra in (
            ("train-slots default", []),
            ("train-slots trainer.precision=32", ["trainer.precision=32"]),
        ):
            s, precision = stage_runs(
                tmp / "movi.zarr",
                tmp,
                [*common, *extra],
                f"r{r}-{len(extra)}",
                args.default_steps,
                "slots",
            )
            times[name].append(s)
            chosen[name] = precision
            print(
                f"  round {r}: {name}: {s:.3f} s/step ({precision}, {torch.get_num_threads()} threads)",
                flush=True,
            )
        configure_threads(0)  # the same thread default as the stage runs
        model, opt = build(cfg, dim, tokens)
        online = run_variant(
            "online-fp32",
            cfg,
            model,
            opt,
            loader(store, cfg, ("frames",), None, 0),
            args.default_steps - 2,
            vit=vit,
            warmup=2,
        )
        times["online fp32 (SlotContrast's way)"].append(online["step_s"])
        print(f"  round {r}: online fp32: {online['step_s']:.3f} s/step", flush=True)
    base = float(np.median(times["online fp32 (SlotContrast's way)"]))
    print("\n| run | precision | s/step (median of rounds) | ratio to the online fp32 step |")
    print("|---|---|---|---|")
    for name, values in times.items():
        m = float(np.median(values))
        print(f"| {name} | {chosen.get(name, '32-true')} | {m:.3f} | {base / m:.2f} |")

    if args.dvae_batch:
        frames_store = tmp / "frames.zarr"
        make_store(frames_store, videos=8, frames=16, tokens=16, dim=8, frame_size=args.dvae_size)
        dv = [
            f"dvae.batch_size={args.dvae_batch}",
            "dvae.log_every=1",
            "dvae.image_every=1000000",
            "dvae.num_workers=2",
        ]
        print(
            f"\n# dVAE stage: {args.dvae_size} px frames, vocab {cfg.dvae.vocab_size}, "
            f"hidden {cfg.dvae.hidden}, batch {args.dvae_batch}"
        )
        dtimes: dict[str, list[float]] = defaultdict(list)
        for r in range(args.rounds):
            for name, extra in (
                ("pretrain-dvae default", []),
                ("pretrain-dvae dvae.precision=32", ["dvae.precision=32"]),
            ):
                s, precision = stage_runs(
                    frames_store,
                    tmp,
                    [*dv, *extra],
                    f"d{r}-{len(extra)}",
                    args.default_steps,
                    "dvae",
                )
                dtimes[name].append(s)
                chosen[name] = precision
                print(f"  round {r}: {name}: {s:.3f} s/step ({precision})", flush=True)
        base = float(np.median(dtimes["pretrain-dvae dvae.precision=32"]))
        print(
            "\n| run | precision | s/step (median of rounds) | ratio to fp32 |\n|---|---|---|---|"
        )
        for name, values in dtimes.items():
            m = float(np.median(values))
            print(f"| {name} | {chosen[name]} | {m:.3f} | {base / m:.2f} |")


# ------------------------------------------------------------------------------ STEVE path
class SteveDVAEEncoder(torch.nn.Module):
    """STEVE's dVAE encoder (4x down-sampling conv stack -> vocab logits), as in its code."""

    def __init__(self, vocab: int, hidden: int = 64):
        super().__init__()
        c = hidden
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, c, 4, 4),
            torch.nn.ReLU(),
            torch.nn.Conv2d(c, c, 1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(c, c, 1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(c, c, 1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(c, c, 1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(c, vocab, 1),
        )

    def forward(self, x):
        return self.net(x)


def steve_path(args, tmp: Path):
    """Ours: cached ids -> embedding lookup. STEVE's: frames -> dVAE encoder -> Gumbel one-hot ->
    one-hot @ W. Both feed the same decoder; only the decoder's input side differs."""
    from egoslots.pipeline.model import SlotModel

    vocab, grid, slots, batch, t = 4096, (32, 32), 15, 4, 3
    cfg = load_config(
        None,
        [
            "globals.NUM_SLOTS=15",
            "globals.SLOT_DIM=192",
            "globals.VOCAB_SIZE=4096",
            "globals.NUM_FRAMES=3",
            "globals.BATCH_SIZE_PER_GPU=4",
            "steve_decoder.enabled=true",
            "decoder.hidden_dims=[64]",
        ],
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens, dim = 16, 32  # a tiny feature side (and decoder): this measures the STEVE decoder path
    torch.manual_seed(0)
    model = SlotModel.from_config(cfg, dim, tokens, grid).to(device)
    steve = next((m for m in model.modules() if type(m).__name__ == "SteveDecoder"), None)
    embed = (
        None
        if steve is None
        else next(
            (
                m
                for m in steve.modules()
                if isinstance(m, torch.nn.Embedding) and m.num_embeddings >= vocab
            ),
            None,
        )
    )
    feats = torch.randn(batch, t, tokens, dim, device=device)
    ids = torch.randint(0, vocab, (batch, t, *grid), device=device)
    frames = torch.rand(batch * t, 3, 128, 128, device=device)
    dvae = SteveDVAEEncoder(vocab).to(device)
    opt = torch.optim.Adam(list(model.parameters()) + list(dvae.parameters()), lr=1e-4)
    print(
        f"\n# STEVE path: 128 px frames -> {grid[0]}x{grid[1]} = {grid[0] * grid[1]} tokens, {slots} slots, "
        f"batch {batch} clips x {t} frames, vocab {vocab}"
    )
    if embed is None:
        print("  (the STEVE decoder has no token nn.Embedding to swap: skipped)")
        return None

    def ours():
        out = model(feats, ids)
        return model.losses(out)["loss"]

    def theirs():
        # STEVE's own step: the dVAE encoder runs on every frame, tokens are Gumbel one-hots
        # (4096 wide), and the decoder's input is one_hot @ W instead of an embedding lookup.
        logits = dvae(frames)  # (B*T, V, 32, 32)
        z = F.gumbel_softmax(logits.float(), tau=0.1, hard=True, dim=1)
        hard_ids = z.argmax(1).reshape(batch, t, *grid)
        one_hot = z.flatten(2).transpose(1, 2)  # (B*T, 1024, V)
        emb = one_hot @ embed.weight[:vocab]  # (B*T, 1024, d): the 4096-wide matmul STEVE does

        def swap(m, a, o):  # the decoder's input becomes [BOS, one_hot @ W][:-1], as in STEVE
            if o.shape[:-1].numel() != emb.shape[0] * emb.shape[1]:
                return o
            o = o.reshape(emb.shape)
            return torch.cat([o[:, :1], emb[:, :-1]], dim=1).reshape(a[0].shape + (-1,))

        handle = embed.register_forward_hook(swap)
        try:
            out = model(feats, hard_ids)
            loss = model.losses(out)["loss"]
        finally:
            handle.remove()
        return loss

    res = {}
    # interleaved twice (A B A B), best of the two, so a load change on a shared machine
    # does not favour whichever variant ran first
    for _ in range(2):
        for name, fn in (
            ("egoslots (cached ids)", ours),
            ("STEVE's step (dVAE + one-hot)", theirs),
        ):
            for i in range(1 + args.steps):
                if i == 1:
                    start = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                fn().backward()
                opt.step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            res[name] = min(res.get(name, math.inf), (time.perf_counter() - start) / args.steps)
    base = res["STEVE's step (dVAE + one-hot)"]
    print("| variant | s/step | speed-up |\n|---|---|---|")
    for name, s in res.items():
        print(f"| {name} | {s:.3f} | {base / s:.2f}x |")
    return res


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--steps", type=int, default=4, help="timed steps per variant (after 2 warm-up steps)"
    )
    ap.add_argument(
        "--equal-steps",
        type=int,
        default=20,
        help="steps for the fp32-vs-fast loss comparison (0: skip)",
    )
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers for the fast path")
    ap.add_argument(
        "--stage-defaults",
        action="store_true",
        help="only the stages' defaults vs fp32 vs the online fp32 step (issue 15's done-when)",
    )
    ap.add_argument("--rounds", type=int, default=2, help="--stage-defaults: interleaved rounds")
    ap.add_argument("--default-steps", type=int, default=6, help="--stage-defaults: steps per run")
    ap.add_argument("--dvae-batch", type=int, default=8, help="--stage-defaults: 0 skips the dVAE")
    ap.add_argument("--dvae-size", type=int, default=128, help="--stage-defaults: dVAE frame px")
    ap.add_argument("--skip-steve", action="store_true")
    ap.add_argument("--skip-movi", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.stage_defaults:
            return stage_defaults(args, tmp)
        if not args.skip_movi:
            movi_c(args, tmp)
        if not args.skip_steve:
            steve_path(args, tmp)


if __name__ == "__main__":
    main()
