"""Stage 0 (stages/pretrain_encoder.py, pipeline/dino.py): DINO maths against DINO's own code,
the exported encoder in silicon-menagerie's layout, resume, SIGTERM, bad settings, and the
pipeline end to end through the CLI (encoder -> extract-features -> train-slots)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from egoslots.pipeline.config import ConfigError, load_config
from egoslots.pipeline.multicrop import IMAGENET
from tests.test_extract import write_frame_folder

REPO = Path(__file__).resolve().parents[1]

# A 2-block, 32-wide ViT on 32 px frames (4x4 patches of 8 px), 2 local crops of 16 px.
TINY_ENCODER = {
    "run_name": "encoder",  # the schema default (the demo names its own encoder-demo)
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "image_size": 32,
    "local_size": 16,
    "num_local_crops": 2,
    "out_dim": 64,
    "hidden_dim": 32,
    "bottleneck_dim": 16,
    "blur_sigma": [0.1, 0.3],
    "batch_size": 4,
    "max_steps": 6,
    "warmup_steps": 2,
    "freeze_last_layer_steps": 1,
    "ckpt_every": 2,
    "log_every": 1,
    "image_every": 3,
    "num_workers": 0,
    "accelerator": "cpu",
    "precision": "32",
}


def write_config(root: Path, data: Path, **encoder) -> Path:
    cfg = {
        "defaults": [str(REPO / "configs" / "demo.yaml")],
        "work_dir": str(root / "work"),
        "dataset": {"source": "frames", "path": str(data), "num_workers": 0},
        "globals": {"IMAGE_SIZE": 32, "FRAME_SIZE": 32, "BACKBONE": "self"},
        "backbone": {"patch_size": None, "checkpoint": None},  # the demo's shipped one: off
        "pretrain_encoder": {**TINY_ENCODER, **encoder},
    }
    path = root / "encoder.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_frame_folder(tmp_path_factory.mktemp("enc") / "frames", 6, 8, (40, 48), seed=3)


def config(root: Path, data: Path, *overrides: str, **encoder):
    root.mkdir(parents=True, exist_ok=True)
    return load_config(write_config(root, data, **encoder), overrides)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished 6-step run (in this process); tests read it, never change it."""
    from egoslots.stages.pretrain_encoder import pretrain

    cfg = config(tmp_path_factory.mktemp("trained"), data)
    return cfg, pretrain(cfg)


# --------------------------------------------------------------------------------------------
# The maths, against DINO's code (facebookresearch/dino main_dino.py / utils.py)
# --------------------------------------------------------------------------------------------
def test_schedules_are_dinos_cosine_scheduler():
    """utils.cosine_scheduler: np.linspace warm-up, then final + (base-final)(1+cos(pi i/n))/2."""
    from egoslots.pipeline.dino import cosine_schedule, teacher_temperature

    base, final, total, warmup = 0.5, 0.01, 50, 10
    warm = np.linspace(0, base, warmup)
    iters = np.arange(total - warmup)
    dino = np.concatenate(
        [warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))]
    )
    ours = [cosine_schedule(i, total, base, final, warmup) for i in range(total)]
    np.testing.assert_allclose(ours, dino, rtol=1e-12)
    temps = np.concatenate([np.linspace(0.02, 0.06, 7), np.full(5, 0.06)])
    np.testing.assert_allclose([teacher_temperature(i, 0.02, 0.06, 7) for i in range(12)], temps)


def test_dino_loss_is_dinos_loss_and_centre_update():
    """The loss DINO's DINOLoss.forward computes with its loops, and its EMA centre."""
    from egoslots.pipeline.dino import DINO, DinoArch

    torch.manual_seed(0)
    model = DINO(DinoArch(8, 32, 1, 2, 4.0, 16, 24, 16, 8), center_momentum=0.8)
    model.loss.center.normal_()
    centre = model.loss.center.reshape(1, -1).clone()
    teacher = [torch.randn(5, 24) for _ in range(2)]
    student = [torch.randn(5, 24) for _ in range(4)]
    loss = model.loss(teacher, student, teacher_temp=0.05)

    q = [F.softmax((t - centre) / 0.05, dim=-1) for t in teacher]
    total, terms = 0.0, 0
    for iq, qq in enumerate(q):
        for v, s in enumerate(student):
            if v != iq:
                total += torch.sum(-qq * F.log_softmax(s / 0.1, dim=-1), dim=-1).mean()
                terms += 1
    torch.testing.assert_close(loss, total / terms)
    batch_centre = torch.cat(teacher).mean(0, keepdim=True)
    torch.testing.assert_close(model.loss.center.reshape(1, -1), 0.8 * centre + 0.2 * batch_centre)


def test_per_parameter_clipping_ema_and_weight_decay_groups():
    from egoslots.pipeline.dino import DINO, DinoArch

    torch.manual_seed(0)
    model = DINO(DinoArch(8, 32, 1, 2, 4.0, 16, 24, 16, 8))
    for p in model.student.parameters():
        p.grad = torch.randn_like(p) * 10
    model.clip_gradients(3.0)
    norms = [float(p.grad.norm()) for p in model.student.parameters() if p.grad is not None]
    assert max(norms) <= 3.0 + 1e-4 and min(norms) > 0
    decay, no_decay = model.param_groups()
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert not model.student["head"].last_layer.weight_g.requires_grad  # norm_last_layer
    t0 = model.teacher["backbone"].pos_embed.clone()
    s = model.student["backbone"].pos_embed
    with torch.no_grad():
        s.add_(1.0)
    model.update_teacher(0.9)
    torch.testing.assert_close(model.teacher["backbone"].pos_embed, 0.9 * t0 + 0.1 * s)


def test_attention_maps_are_the_last_blocks_cls_attention():
    """cls_attention against timm's own (unfused) attention matrix of the last block."""
    from egoslots.pipeline.backbones import dino_vit
    from egoslots.pipeline.dino import cls_attention

    torch.manual_seed(0)
    vit = dino_vit(32, 8, 32, 2, 2).eval()
    attn = vit.blocks[-1].attn
    attn.fused_attn = False
    seen = []
    attn.attn_drop.register_forward_hook(lambda m, inputs, out: seen.append(out))
    images = torch.randn(3, 3, 32, 32)
    vit(images)
    expected = seen[0][:, :, 0, 1:].reshape(3, 2, 4, 4)  # CLS row, patch columns
    torch.testing.assert_close(cls_attention(vit, images), expected)


def test_multicrop_depends_only_on_the_sample_position():
    from egoslots.pipeline.multicrop import CropRecipe, MultiCrop

    crops = MultiCrop(CropRecipe(32, 16, 2, blur_sigma=(0.1, 0.3)), seed=4)
    frame = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    state = torch.get_rng_state()
    a, b, c = crops(frame, 7), crops(frame, 7), crops(frame, 8)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
    assert [tuple(v.shape) for v in a] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_batched_crops_draw_per_position_and_compute_torchvisions_colour_ops():
    from torchvision.transforms.v2 import functional as TF

    from egoslots.pipeline.multicrop import BatchMultiCrop, CropRecipe, _adjust_hue, _jitter_op

    x = torch.rand(4, 3, 8, 8)
    x[1, 0] = x[1, 1]  # ties between channels
    torch.testing.assert_close(_adjust_hue(x, torch.full((4,), -0.07)), TF.adjust_hue(x, -0.07))
    for op, adjust in enumerate((TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)):
        torch.testing.assert_close(_jitter_op(x, op, torch.full((4,), 0.7)), adjust(x, 0.7))

    frames = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    )
    crops = BatchMultiCrop(CropRecipe(32, 16, 2, blur_sigma=(0.1, 0.3)), seed=4)
    params = torch.stack([crops.params(100 + i, 32) for i in range(6)])
    views = crops(frames, params)
    assert [tuple(v.shape) for v in views] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * 2
    alone = crops(frames[2:3], crops.params(102, 32)[None])  # the same frame, batched alone
    assert all(torch.allclose(v[2:3], a, atol=1e-5) for v, a in zip(views, alone))
    assert not torch.equal(crops.params(102, 32), crops.params(103, 32))

    plain = BatchMultiCrop(CropRecipe(32, 16, 0, global_scale=(1, 1), hflip=0, color_jitter=0,
                                      grayscale=0, blur=(0, 0, 0), solarize=0))  # fmt: skip
    first = plain(frames, torch.stack([plain.params(i, 32) for i in range(6)]))[0]
    mean, std = (
        torch.tensor(IMAGENET["mean"]).view(1, 3, 1, 1),
        torch.tensor(IMAGENET["std"]).view(1, 3, 1, 1),
    )
    torch.testing.assert_close(first, (frames.permute(0, 3, 1, 2) / 255 - mean) / std)


def test_lightly_crops_train_too(data, tmp_path):
    from egoslots.stages.pretrain_encoder import pretrain

    run_dir = pretrain(config(tmp_path, data, crops="lightly", max_steps=2, image_every=0))
    assert json.loads((run_dir / "encoder.json").read_text())["steps"] == 2


# --------------------------------------------------------------------------------------------
# The run and its exported encoder
# --------------------------------------------------------------------------------------------
def test_run_directory_holds_checkpoints_tensorboard_and_the_encoder(trained):
    _, run_dir = trained
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {
        "step=2.ckpt", "step=4.ckpt", "step=6.ckpt", "last.ckpt"
    }  # fmt: skip
    info = json.loads((run_dir / "encoder.json").read_text())
    assert info["steps"] == 6 and info["arch"]["embed_dim"] == 32
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    for name in ("loss", "teacher_entropy", "teacher_batch_entropy", "lr", "momentum"):
        assert f"train/{name}" in tags["scalars"]
    assert "train/attention" in tags["images"]


def test_exported_encoder_loads_in_silicon_layout_and_gives_the_teachers_features(trained):
    from egoslots.pipeline.backbones import ViTEncoder, build_backbone, dino_vit
    from egoslots.stages.machinery.encoder_task import EncoderTask

    cfg, run_dir = trained
    saved = torch.load(run_dir / "encoder.pth", map_location="cpu", weights_only=True)
    assert list(saved) == ["teacher"]  # args-free
    assert {k.split(".")[0] for k in saved["teacher"]} == {"backbone", "head"}

    # silicon-menagerie's own recipe: take "teacher", strip module./backbone., load non-strictly
    state = {
        k.replace("module.", "").replace("backbone.", ""): v for k, v in saved["teacher"].items()
    }
    vit = dino_vit(32, 8, 32, 2, 2)
    missing, unexpected = vit.load_state_dict(state, strict=False)
    assert not missing and all(k.startswith("head.") for k in unexpected)

    # the run's teacher, from its last checkpoint
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    task = EncoderTask(**ckpt["hyper_parameters"])
    task.load_state_dict(ckpt["state_dict"])
    teacher = ViTEncoder(task.model.teacher["backbone"], "teacher").freeze()

    encoder = build_backbone(cfg.backbone)  # backbone.name=self: what extract-features builds
    silicon = ViTEncoder(vit, "silicon").freeze()
    frames = torch.rand(3, 3, 32, 32)
    expected = teacher(frames)
    assert expected.shape == (3, 16, 32)
    assert torch.equal(encoder(frames), expected)
    assert torch.equal(silicon(frames), expected)
    described = encoder.describe()
    assert (
        described["checkpoint_sha256"]
        == json.loads((run_dir / "encoder.json").read_text())["sha256"]
    )


def test_safetensors_export_holds_the_backbone_and_loads_to_the_same_features(trained, tmp_path):
    import hashlib

    from safetensors.torch import load_file

    from egoslots.pipeline.backbones import build_backbone
    from egoslots.stages.pretrain_encoder import export_encoder_safetensors

    cfg, run_dir = trained
    path = export_encoder_safetensors(run_dir, tmp_path / "shipped")
    tensors = load_file(str(path))
    assert tensors and all(k.startswith("backbone.") for k in tensors)  # no DINO head
    info = json.loads((tmp_path / "shipped" / "encoder.json").read_text())
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["arch"] == json.loads((run_dir / "encoder.json").read_text())["arch"]
    frames = torch.rand(2, 3, 32, 32)
    from_pth = build_backbone(cfg.backbone)
    backbone = {**dict(cfg.backbone), "checkpoint": str(path)}
    assert torch.equal(build_backbone(backbone)(frames), from_pth(frames))


def test_safetensors_export_of_an_unfinished_run_is_refused(tmp_path):
    from egoslots.stages.machinery.common import StageError
    from egoslots.stages.pretrain_encoder import export_encoder_safetensors

    with pytest.raises(StageError, match="no finished encoder"):
        export_encoder_safetensors(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_finished_run_returns_at_once(trained):
    from egoslots.stages.pretrain_encoder import pretrain

    cfg, run_dir = trained
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert pretrain(cfg) == run_dir
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_run_directory_of_another_vit_or_other_frames_is_refused(trained, data, tmp_path):
    from egoslots.stages.pretrain_encoder import pretrain

    cfg, _ = trained
    wider = load_config(
        None, [f"{k}={v}" for k, v in _flat(cfg)] + ["pretrain_encoder.embed_dim=64"]
    )
    with pytest.raises(ConfigError, match="holds another ViT: embed_dim=32"):
        pretrain(wider)
    other = write_frame_folder(tmp_path / "other", 3, 8, (40, 48), seed=9)
    moved = load_config(None, [f"{k}={v}" for k, v in _flat(cfg)] + [f"dataset.path={other}"])
    with pytest.raises(ConfigError, match="trained on other frames"):
        pretrain(moved)


def _flat(cfg) -> list[tuple[str, object]]:
    """The config's work_dir, dataset and pretrain_encoder keys as dotted overrides."""
    from omegaconf import OmegaConf

    out = [
        ("work_dir", cfg.work_dir),
        ("dataset.source", "frames"),
        ("dataset.path", cfg.dataset.path),
    ]
    out += [("globals.IMAGE_SIZE", 32), ("globals.BACKBONE", "self")]
    for k, v in OmegaConf.to_container(cfg.pretrain_encoder, resolve=True).items():
        out.append((f"pretrain_encoder.{k}", json.dumps(v) if isinstance(v, list) else v))
    return out


@pytest.mark.parametrize(
    "override, message",
    [
        ("pretrain_encoder.local_size=48", "local_size=48 is larger than the global crops"),
        ("pretrain_encoder.image_size=36", "image_size=36 is not a multiple of patch_size=8"),
        ("pretrain_encoder.num_heads=3", "embed_dim=32 is not divisible by num_heads=3"),
        ("pretrain_encoder.local_scale=[0.5,0.1]", "local_scale=[0.5, 0.1] must be"),
    ],
)
def test_bad_settings_are_one_line_errors(data, tmp_path, override, message):
    from click.testing import CliRunner

    from egoslots.cli import main

    result = CliRunner().invoke(
        main, ["pretrain-encoder", str(write_config(tmp_path, data)), override]
    )
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "work").exists()  # nothing written


def test_extracting_with_self_before_training_says_what_to_run(data, tmp_path):
    from egoslots.pipeline.backbones import BackboneError, build_backbone

    cfg = config(tmp_path, data)
    with pytest.raises(BackboneError, match="run `egoslots pretrain-encoder CONFIG` first"):
        build_backbone(cfg.backbone)


# --------------------------------------------------------------------------------------------
# Resume: interrupted early, resumed, bit-identical (the kill -9 version is in test_crash.py's
# style below, marked slow)
# --------------------------------------------------------------------------------------------
def test_resumed_early_ends_bit_identical_to_uninterrupted(data, tmp_path, monkeypatch):
    from egoslots.stages import pretrain_encoder as stage
    from tests.test_crash import assert_resumed_like_uninterrupted, leave_kill_debris

    class Crash(RuntimeError):
        pass

    real_step = stage.EncoderTask.training_step

    def crashing_step(self, batch, batch_idx):
        if self.global_step == 5:
            raise Crash("step 5")
        return real_step(self, batch, batch_idx)

    cfgs = {
        name: config(tmp_path / name, data, max_steps=12, image_every=0)
        for name in ("full", "resumed")
    }
    stage.pretrain(cfgs["full"])
    with monkeypatch.context() as patch:
        patch.setattr(stage.EncoderTask, "training_step", crashing_step)
        with pytest.raises(Crash):
            stage.pretrain(cfgs["resumed"])
    runs = {name: tmp_path / name / "work" / "runs" / "encoder" for name in cfgs}
    stale, live = leave_kill_debris(runs["resumed"] / "checkpoints")
    stage.pretrain(cfgs["resumed"])
    assert not stale.exists()
    assert_resumed_like_uninterrupted(
        runs["full"] / "checkpoints", runs["resumed"] / "checkpoints", live
    )
    shas = [json.loads((runs[n] / "encoder.json").read_text())["sha256"] for n in cfgs]
    assert shas[0] == shas[1]  # encoder.pth: the same teacher, bit for bit


# --------------------------------------------------------------------------------------------
# Through the CLI: SIGTERM, and the whole pipeline
# --------------------------------------------------------------------------------------------
def test_sigterm_saves_the_current_step_and_the_rerun_resumes(data, tmp_path):
    from tests.test_sigterm import sigterm_after, start, step_of

    config_path = write_config(
        tmp_path, data, max_steps=100, ckpt_every=20, log_every=10, image_every=0, num_workers=1
    )
    ckpts = tmp_path / "work" / "runs" / "encoder" / "checkpoints"
    proc = start(["pretrain-encoder", str(config_path)])
    _, err = sigterm_after(proc, ckpts / "step=20.ckpt", delay=0.7)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err, err[-3000:]
    step = step_of(ckpts / "last.ckpt")
    assert 20 < step < 100 and (ckpts / f"step={step}.ckpt").is_file()
    assert not (ckpts.parent / "encoder.pth").exists()  # not exported: not finished

    rerun = start(["pretrain-encoder", str(config_path)])
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert f"step={step}.ckpt" in err or "last.ckpt" in err  # "(resuming <checkpoint>)"
    assert json.loads((ckpts.parent / "encoder.json").read_text())["steps"] == 100


def test_cli_encoder_then_extract_then_train_slots(data, tmp_path):
    """Done-when of issue 11: a tiny encoder trained, exported, extracted with, slots trained."""
    from egoslots.cache.store import FeatureStore

    config_path = write_config(tmp_path, data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for command in ("pretrain-encoder", "extract-features", "train-slots"):
        done = subprocess.run(
            [sys.executable, "cli.py", command, str(config_path), *SLOTS],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, f"{command}:\n{done.stderr[-3000:]}"
    work = tmp_path / "work"
    (store_path,) = (work / "stores").glob("*.zarr")
    store = FeatureStore.open(store_path)
    info = json.loads((work / "runs" / "encoder" / "encoder.json").read_text())
    backbone = store.meta["backbone"]
    assert backbone["name"] == "self" and backbone["checkpoint_sha256"] == info["sha256"]
    assert tuple(store.group["features"].shape[1:]) == (16, 32)  # 4x4 patches of the 32-wide ViT
    assert (work / "runs" / "demo" / "checkpoints" / "last.ckpt").is_file()
    assert math.isfinite(float(np.asarray(store.read_features(0, 1)).sum()))


SLOTS = [
    "globals.USE_DVAE=false", "globals.USE_STEVE_DECODER=false", "globals.NUM_SLOTS=3",
    "globals.SLOT_DIM=16", "globals.NUM_FRAMES=3", "globals.BATCH_SIZE_PER_GPU=2",
    "decoder.hidden_dims=[32]", "predictor.num_heads=2", "trainer.max_steps=4",
    "trainer.ckpt_every=2", "trainer.val_every=100", "trainer.image_every=100",
    "trainer.precision=32", "optimizer.warmup_steps=1", "extract.num_workers=0",
    "extract.batch_size=8", "extract.frames_per_chunk=8", "extract.device=cpu",
    "evaluate.probe=false",
]  # fmt: skip


@pytest.mark.slow  # the whole pipeline twice: ~3 min on a shared 2-core machine
def test_egoslots_run_trains_the_encoder_first_and_skips_it_when_done(data, tmp_path):
    from egoslots.stages.run import trains_own_encoder

    config_path = write_config(tmp_path, data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "cli.py", "run", str(config_path), *SLOTS]
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stage 0: pretrain-encoder" in first.stdout
    run_dir = tmp_path / "work" / "runs" / "encoder"
    encoder = {p: p.stat().st_mtime_ns for p in run_dir.glob("encoder.*")}
    assert len(encoder) == 2
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already trained for 6 steps" in second.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("encoder.*")} == encoder

    # only the config's own encoder is trained by `run`: not one named by file or another run
    cfg = load_config(config_path)
    assert trains_own_encoder(cfg)
    assert not trains_own_encoder(load_config(config_path, ["backbone.checkpoint=/x/encoder.pth"]))
    assert not trains_own_encoder(load_config(config_path, ["backbone.encoder_run=/elsewhere"]))
    assert not trains_own_encoder(load_config(config_path, ["globals.BACKBONE=patch-pixels"]))


# --------------------------------------------------------------------------------------------
# kill -9 at seeded random points (tests/helpers/crashkit.py), rerun, compare with an uninterrupted run
# --------------------------------------------------------------------------------------------
KILL_STEPS, KILL_CKPT = 40, 4


@pytest.fixture(scope="module")
def reference_encoder(data, tmp_path_factory):
    from tests.helpers.crashkit import cli, run_to_end

    root = tmp_path_factory.mktemp("enc-ref")
    config_path = write_config(
        root, data, max_steps=KILL_STEPS, ckpt_every=KILL_CKPT, image_every=10
    )
    run_to_end(cli("pretrain-encoder", config_path), timeout=600)
    return root / "work" / "runs" / "encoder"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, None])
def test_killed_at_random_point_then_rerun_is_bit_identical(
    data, reference_encoder, tmp_path, seed
):
    """seed None: killed while the frames are being decoded (before any checkpoint)."""
    from tests.helpers.crashkit import KillPoint, cli, count_files, kill_mid_run, run_to_end
    from tests.test_crash import assert_same_checkpoints, check_resume, files_under, readable_steps

    config_path = write_config(
        tmp_path, data, max_steps=KILL_STEPS, ckpt_every=KILL_CKPT, image_every=10
    )
    run_dir = tmp_path / "work" / "runs" / "encoder"
    ckpt_dir = run_dir / "checkpoints"
    command = cli("pretrain-encoder", config_path)
    if seed is None:
        point, progress = (
            KillPoint.draw(0, 1, 1, max_delay=0.05),
            count_files(run_dir, "frames/*.json"),
        )
    else:  # after the 1st .. 7th of 10 step=N.ckpt files, then up to 0.2 s more
        point = KillPoint.draw(seed, 1, KILL_STEPS // KILL_CKPT - 3, max_delay=0.2)
        progress = count_files(ckpt_dir, "step=*.ckpt")
    kill_mid_run(command, progress, point, tmp_path / "killed.log", timeout=600)
    assert not (run_dir / "encoder.json").exists()  # killed before the end
    killed_steps = readable_steps(ckpt_dir) if ckpt_dir.exists() else {}

    rerun = run_to_end(command, tmp_path / "rerun.log", timeout=600)
    if killed_steps:
        check_resume(killed_steps, KILL_CKPT, rerun, ckpt_dir)
    assert_same_checkpoints(reference_encoder / "checkpoints", ckpt_dir)
    assert files_under(run_dir / "frames") == files_under(reference_encoder / "frames")
    assert (run_dir / "frames" / "frames.npy").read_bytes() == (
        reference_encoder / "frames" / "frames.npy"
    ).read_bytes()
    ours, theirs = (
        json.loads((d / "encoder.json").read_text()) for d in (run_dir, reference_encoder)
    )
    assert ours["sha256"] == theirs["sha256"]  # encoder.pth: bit-identical teacher


def test_precision_auto_probes_the_dino_step_and_records_its_choice(
    data, tmp_path, monkeypatch, caplog
):
    """pretrain-encoder's precision: auto times its own DINO step in both precisions (the real
    probe, not a stand-in) and its checkpoints record the choice for a resume."""
    import torch

    from egoslots.stages.machinery import runtime
    from egoslots.stages.pretrain_encoder import pretrain

    monkeypatch.setenv("EGOSLOTS_PRECISION_CACHE", "off")
    monkeypatch.setattr(runtime, "bf16_native", lambda device: True)
    with caplog.at_level("INFO", logger="egoslots"):
        run_dir = pretrain(config(tmp_path, data, precision="auto", max_steps=2, image_every=0))
    line = next(r.getMessage() for r in caplog.records if "precision auto" in r.getMessage())
    assert line.endswith("probe)") and "fp32 " in line and "bf16 " in line
    chosen = line.split("-> ")[1].split(" ")[0]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["egoslots_precision"] == chosen
