"""Frozen encoders: silicon-menagerie and timm checkpoints load exactly, offline, safely.

Checkpoints are random ViTs the tests save in the published training layouts; the features
egoslots computes from them must equal the saved model's own block outputs.
"""

import argparse
import hashlib
import socket
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

from egoslots.pipeline import backbones, checkpoints
from egoslots.pipeline.backbones import BackboneError, PatchPixels, build_backbone, silicon_vit

REPO = Path(__file__).resolve().parents[1]
REG_MODEL = "vit_small_patch14_reg4_dinov2"


def random_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights in a fraction of timm's init time (the model may live on meta)."""
    gen = torch.Generator().manual_seed(seed)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.05, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model.eval()


def meta_random(build, seed=0):
    with torch.device("meta"):
        model = build()
    return random_weights(model, seed)


def block_output(vit: nn.Module, x: torch.Tensor, block: int) -> torch.Tensor:
    """Reference: tokens after ``blocks[block]`` with all prefix tokens, computed step by step."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    for blk in vit.blocks[: block + 1]:
        x = blk(x)
    return x


def normalise(images):
    mean = torch.tensor(backbones.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(backbones.IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def dino_checkpoint(vit: nn.Module, path: Path, head_dim: int = 32) -> Path:
    """silicon-menagerie's DINO layout: teacher/student under module.backbone., the DINO head,
    the loss centre, optimizer state and the argparse args."""
    gen = torch.Generator().manual_seed(1)
    head = {
        "mlp.0.weight": torch.randn(head_dim, vit.embed_dim, generator=gen),
        "mlp.0.bias": torch.zeros(head_dim),
        "last_layer.weight_g": torch.ones(64, 1),
        "last_layer.weight_v": torch.randn(64, head_dim, generator=gen),
    }
    teacher = {f"module.backbone.{k}": v for k, v in vit.state_dict().items()}
    teacher.update({f"module.head.{k}": v for k, v in head.items()})
    torch.save(
        {
            "teacher": teacher,
            "student": dict(teacher),
            "epoch": 100,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005, "params": [0, 1]}]},
            "dino_loss": {"center": torch.zeros(1, 64)},
            "args": argparse.Namespace(
                arch="vit_base",
                patch_size=14,
                out_dim=65536,
                lr=0.0005,
                data_path="/scratch/saycam",
                use_fp16=False,
                weight_decay=np.float64(0.04),
            ),
        },
        path,
    )
    return path


def mae_checkpoint(vit: nn.Module, path: Path) -> Path:
    """MAE's layout: everything under "model", with the decoder and the mask token."""
    dim = vit.embed_dim
    model = dict(vit.state_dict())
    model.update(
        {
            "mask_token": torch.zeros(1, 1, 16),
            "decoder_embed.weight": torch.randn(16, dim),
            "decoder_embed.bias": torch.zeros(16),
            "decoder_pos_embed": torch.zeros(1, 17, 16),
            "decoder_blocks.0.norm1.weight": torch.ones(16),
            "decoder_norm.weight": torch.ones(16),
            "decoder_pred.weight": torch.randn(768, 16),
        }
    )
    torch.save(
        {
            "model": model,
            "epoch": 1,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "optimizer": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(
                model="mae_vit_small_patch16", mask_ratio=0.75, norm_pix_loss=True
            ),
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vitb14(tmp_path_factory):
    """A random ViT-B/14 at 56 px (4x4 patches), saved as dino_say_vitb14.pth in DINO layout."""
    vit = meta_random(partial(silicon_vit, "vitb14", 56))
    path = dino_checkpoint(vit, tmp_path_factory.mktemp("weights") / "dino_say_vitb14.pth")
    return vit, path


@pytest.fixture(scope="module")
def vits16():
    """A random ViT-S/16 at 224 px (the resolution silicon-menagerie models were trained at)."""
    return meta_random(partial(silicon_vit, "vits16", 224), seed=3)


@pytest.fixture(scope="module")
def reg_weights(tmp_path_factory):
    """A random timm DINOv2 ViT-S/14 with 4 registers at 56 px, saved as safetensors."""
    from safetensors.torch import save_file

    vit = meta_random(
        lambda: timm.create_model(REG_MODEL, pretrained=False, img_size=56, num_classes=0), seed=5
    )
    path = tmp_path_factory.mktemp("timm") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return vit, path


@pytest.fixture(autouse=True)
def no_weights_dir(monkeypatch, tmp_path):
    """No $EGOSLOTS_WEIGHTS and an empty Hugging Face cache, whatever the machine has."""
    import huggingface_hub

    monkeypatch.delenv("EGOSLOTS_WEIGHTS", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))


# ------------------------------------------------------------------------------ silicon ViTs


def test_dino_vitb14_checkpoint_gives_the_saved_models_patch_features(vitb14, images):
    vit, path = vitb14
    enc = build_backbone({"name": "dino_say_vitb14", "checkpoint": str(path), "input_size": 56})
    feats = enc(images)
    assert feats.shape == (2, 16, 768) and enc.grid == (4, 4) and enc.feature_dim == 768
    with torch.no_grad():
        expected = block_output(vit, normalise(images), 11)[:, 1:]  # last block, before the norm
    assert torch.equal(feats, expected)
    assert enc.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    desc = enc.describe()
    assert desc["block"] == 11 and desc["final_norm"] is False and desc["grid"] == [4, 4]
    assert (
        desc["patch_size"] == 14
        and desc["input_size"] == 56
        and desc["checkpoint_sha256"] == enc.checkpoint_sha256
    )
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training


def test_block_selection_and_final_norm(vitb14, images):
    vit, path = vitb14
    cfg = {"name": "dino_say_vitb14", "checkpoint": str(path), "input_size": 56}
    enc = build_backbone({**cfg, "block": 5})
    assert len(enc.vit.blocks) == 6  # later blocks are dropped, never run
    with torch.no_grad():
        assert torch.equal(enc(images), block_output(vit, normalise(images), 5)[:, 1:])
        normed = build_backbone({**cfg, "final_norm": True})(images)
        assert torch.equal(normed, vit.forward_features(normalise(images))[:, 1:])
    with pytest.raises(BackboneError, match=r"backbone.block=12 .*0..11.*vit_block12 is block 11"):
        build_backbone({**cfg, "block": 12})
    with pytest.raises(BackboneError, match=r"backbone.block=-13 is out of range"):
        build_backbone({"name": REG_MODEL, "input_size": 56, "block": -13})
    assert backbones.ViTEncoder(backbones.tiny_test_vit(64), "t", block=-1).describe()["block"] == 1
    assert backbones.ViTEncoder(backbones.tiny_test_vit(64), "t", block=-2).describe()["block"] == 0


def test_weights_found_in_egoslots_weights_dir(vitb14, monkeypatch):
    vit, path = vitb14
    with pytest.raises(BackboneError) as err:
        build_backbone({"name": "dino_say_vitb14", "input_size": 56})
    assert "backbone.checkpoint" in str(err.value) and "EGOSLOTS_WEIGHTS" in str(err.value)
    monkeypatch.setenv("EGOSLOTS_WEIGHTS", str(path.parent))
    assert build_backbone(
        {"name": "dino_say_vitb14", "input_size": 56}
    ).checkpoint_sha256 == checkpoints.sha256_file(path)
    empty = path.parent / "empty"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("EGOSLOTS_WEIGHTS", str(empty))
    with pytest.raises(
        BackboneError, match=r"backbone.checkpoint \(not set\).*empty/dino_say_vitb14.pth"
    ):
        build_backbone({"name": "dino_say_vitb14", "input_size": 56})
    with pytest.raises(BackboneError, match=r"backbone.checkpoint=.*nope.pth: no such file"):
        build_backbone(
            {"name": "dino_say_vitb14", "input_size": 56, "checkpoint": str(empty / "nope.pth")}
        )


def test_mae_checkpoint_with_decoder_loads(vits16, tmp_path):
    path = mae_checkpoint(vits16, tmp_path / "mae_say_vits16.pth")
    enc = build_backbone(
        {"name": "mae_say_vits16", "checkpoint": str(path), "input_size": 224, "block": 1}
    )
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(enc(x), block_output(vits16, normalise(x), 1)[:, 1:])
    assert enc(x).shape == (1, 196, 384)


def test_mugs_heads_are_training_only(vits16, tmp_path):
    state = {
        f"module.backbone.encoder.{k}": v for k, v in vits16.state_dict().items()
    }  # any prefix order
    state.update(
        {
            "module.instance_head.mlp.0.weight": torch.zeros(4, 384),
            "module.group_head.last_layer.weight": torch.zeros(8, 4),
            "module.local_group_head.relation_blocks.0.norm1.weight": torch.zeros(4),
        }
    )
    torch.save({"teacher": state}, tmp_path / "m.pth")
    enc = build_backbone(
        {"name": "mugs_say_vits16", "checkpoint": str(tmp_path / "m.pth"), "input_size": 64}
    )
    assert enc.grid == (4, 4)


def test_missing_and_unexpected_keys_are_listed(vits16, tmp_path):
    state = dict(vits16.state_dict())
    del state["blocks.3.mlp.fc1.weight"]
    torch.save(
        {"teacher": {f"backbone.{k}": v for k, v in state.items()}}, tmp_path / "missing.pth"
    )
    with pytest.raises(
        BackboneError, match=r"missing.pth lacks backbone keys: blocks.3.mlp.fc1.weight"
    ):
        build_backbone(
            {
                "name": "dino_say_vits16",
                "checkpoint": str(tmp_path / "missing.pth"),
                "input_size": 64,
            }
        )

    state = {
        **vits16.state_dict(),
        "blocks.0.attn.q_norm.weight": torch.ones(64),
        "head.mlp.0.bias": torch.ones(3),
    }
    torch.save({"teacher": state}, tmp_path / "extra.pth")
    with pytest.raises(BackboneError, match=r"unexpected keys: blocks.0.attn.q_norm.weight \("):
        build_backbone(
            {"name": "dino_say_vits16", "checkpoint": str(tmp_path / "extra.pth"), "input_size": 64}
        )
    # MAE's decoder is not a training-only part of a DINO model: the wrong file is caught.
    path = mae_checkpoint(vits16, tmp_path / "mae.pth")
    with pytest.raises(BackboneError, match=r"unexpected keys: decoder_.*mask_token"):
        build_backbone({"name": "dino_say_vits16", "checkpoint": str(path), "input_size": 64})
    with pytest.raises(
        BackboneError, match=r"wrong shape: blocks.0.attn.proj.bias \(384,\) vs \(768,\)"
    ):
        build_backbone({"name": "mae_say_vitb16", "checkpoint": str(path), "input_size": 64})


UNPICKLED = []


def record_unpickle(value):
    UNPICKLED.append(value)


class Payload:
    def __reduce__(self):
        return (record_unpickle, ("ran",))


def test_checkpoint_with_disallowed_global_is_refused(vits16, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"teacher": vits16.state_dict(), "payload": Payload()}, path)
    with pytest.raises(BackboneError, match=r"refused to load.*weights_only=True") as err:
        build_backbone({"name": "dino_say_vits16", "checkpoint": str(path), "input_size": 64})
    assert "unsupported global test_backbones.record_unpickle" in str(
        err.value
    )  # names what it refused
    assert UNPICKLED == []
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match=r"evil.pth is not a readable PyTorch checkpoint"):
        build_backbone({"name": "dino_say_vits16", "checkpoint": str(path), "input_size": 64})


def test_pos_embed_interpolated_bicubic_for_another_input_size(vits16, tmp_path):
    path = dino_checkpoint(
        vits16, tmp_path / "dino_a_vits16.pth"
    )  # trained at 224: 14x14 positions
    enc = build_backbone({"name": "dino_a_vits16", "checkpoint": str(path), "input_size": 64})
    x = torch.rand(2, 3, 64, 64)
    assert enc.grid == (4, 4) and enc(x).shape == (2, 16, 384)
    old = vits16.pos_embed.detach()
    grid = old[:, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
    new = (
        F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
        .permute(0, 2, 3, 1)
        .reshape(1, 16, 384)
    )
    assert torch.allclose(enc.vit.pos_embed, torch.cat([old[:, :1], new], 1), atol=1e-6)
    ref = meta_random(partial(silicon_vit, "vits16", 64))
    ref.load_state_dict({**vits16.state_dict(), "pos_embed": torch.cat([old[:, :1], new], 1)})
    with torch.no_grad():
        assert torch.allclose(enc(x), block_output(ref, normalise(x), 11)[:, 1:], atol=1e-5)


# ------------------------------------------------------------------------------ timm ViTs


def fake_hf_cache(
    root: Path, repo_id: str, weights: Path, filename: str = "model.safetensors"
) -> Path:
    """The on-disk layout huggingface_hub's cache uses for one file."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / filename).symlink_to(weights)
    return root


def forbid_network(monkeypatch):
    """Every download entry point timm or egoslots could reach raises; hf_hub_download may only
    read the cache (``local_files_only=True``, what egoslots passes under HF_HUB_OFFLINE=1)."""
    import huggingface_hub
    import timm.models._builder
    import timm.models._hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args} {kwargs}")

    real = huggingface_hub.file_download.hf_hub_download

    def cache_only(*args, **kwargs):
        if not kwargs.get("local_files_only"):
            refuse(*args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", cache_only)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", refuse)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("where", ["hf-cache", "weights-dir", "checkpoint"])
def test_timm_register_model_drops_registers_offline(
    reg_weights, images, tmp_path, monkeypatch, where
):
    import huggingface_hub

    vit, path = reg_weights
    forbid_network(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = {"name": REG_MODEL, "input_size": 56, "final_norm": True}
    if where == "hf-cache":
        fake_hf_cache(tmp_path / "hub", "timm/vit_small_patch14_reg4_dinov2.lvd142m", path)
    elif where == "weights-dir":
        (tmp_path / f"{REG_MODEL}.safetensors").symlink_to(path)
        monkeypatch.setenv("EGOSLOTS_WEIGHTS", str(tmp_path))
    else:
        cfg["checkpoint"] = str(path)
    enc = build_backbone(cfg)
    assert enc.num_prefix_tokens == 5  # CLS + 4 registers, all dropped
    feats = enc(images)
    with torch.no_grad():
        assert torch.equal(feats, vit.forward_features(normalise(images))[:, 5:])
    assert feats.shape == (2, 16, 384) and enc.checkpoint_sha256 == checkpoints.sha256_file(path)


def test_timm_model_without_local_weights_is_an_error(tmp_path, monkeypatch):
    import huggingface_hub

    forbid_network(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        BackboneError,
        match=r"no weights for backbone.name=vit_small_patch14_dinov2.*"
        r"Hugging Face cache timm/vit_small_patch14_dinov2.lvd142m",
    ):
        build_backbone({"name": "vit_small_patch14_dinov2", "input_size": 56})


def test_timm_mean_std_from_pretrained_cfg_unless_overridden(reg_weights):
    _, path = reg_weights
    cfg = {"name": REG_MODEL, "input_size": 56, "checkpoint": str(path)}
    enc = build_backbone(cfg)
    expected = timm.models.get_pretrained_cfg(REG_MODEL).mean
    assert enc.describe()["mean"] == pytest.approx(list(expected))
    enc = build_backbone({**cfg, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    assert enc.describe()["std"] == [0.25, 0.25, 0.25]


# ------------------------------------------------------------------------------ names and knobs


def test_bad_names_and_sizes_name_the_config_key():
    with pytest.raises(
        BackboneError, match=r"unknown backbone.name=mae_say_vitb14.*did you mean: mae_say_vitb16"
    ):
        build_backbone({"name": "mae_say_vitb14", "input_size": 224})
    with pytest.raises(BackboneError, match=r"did you mean: vit_small_patch14_dinov2"):
        build_backbone({"name": "vit_smal_patch14_dinov2", "input_size": 224})
    with pytest.raises(BackboneError, match=r"dino_say_resnext50 is a silicon-menagerie ResNeXt"):
        build_backbone({"name": "dino_say_resnext50", "input_size": 224})
    with pytest.raises(
        BackboneError, match=r"backbone.input_size=60 is not a multiple of .* 14 \(e.g. 56 or 70\)"
    ):
        build_backbone({"name": "dino_say_vitb14", "input_size": 60})
    with pytest.raises(
        BackboneError, match=r"backbone.patch_size=8, but dino_say_vitb14 has patch size 14"
    ):
        build_backbone({"name": "dino_say_vitb14", "input_size": 56, "patch_size": 8})
    with pytest.raises(
        BackboneError, match=r"backbone.name=resnet18 is a timm model but not a ViT"
    ):
        build_backbone({"name": "resnet18", "input_size": 64})


def test_every_silicon_name_has_the_published_shape():
    names = backbones.SILICON_MODELS
    assert (
        len(names) == 11 + 36
        and {"dino_ego4d-200h_vitb14", "mugs_y_vitl16", "mae_say_vits16"} <= names
    )
    assert not any(
        n.startswith("mae") and n.endswith("14") for n in names
    )  # MAE models are patch 16
    for arch in {n.split("_")[2] for n in names}:
        patch, dim, depth, heads = backbones.SILICON_ARCHS[arch]
        assert int(arch[-2:]) == patch
        with torch.device("meta"):
            vit = silicon_vit(arch, 224)
        assert (len(vit.blocks), vit.embed_dim, vit.blocks[0].attn.num_heads) == (depth, dim, heads)
        assert vit.blocks[0].attn.qkv.bias is not None and vit.norm.eps == 1e-6
        assert vit.blocks[0].mlp.fc1.out_features == 4 * dim
        assert vit.cls_token is not None and vit.pos_embed.shape == (
            1,
            1 + (224 // patch) ** 2,
            dim,
        )


def test_tiny_test_vit_is_a_deterministic_real_vit():
    from egoslots.pipeline.config import load_config

    cfg = load_config(
        REPO / "configs" / "demo.yaml", ["globals.BACKBONE=vit-tiny-test", "globals.IMAGE_SIZE=64"]
    )
    a, b = build_backbone(cfg.backbone), build_backbone(cfg.backbone)
    x = torch.rand(3, 3, 64, 64)
    assert torch.equal(a(x), b(x)) and a(x).shape == (3, 64, 32)
    assert a.grid == (8, 8) and a.describe()["name"] == "vit-tiny-test"
    ref = backbones.tiny_test_vit(64)
    with torch.no_grad():
        assert torch.equal(a(x), block_output(ref, normalise(x), 1)[:, 1:])
    with pytest.raises(ValueError, match="expects images of 64x64"):
        a(torch.rand(1, 3, 56, 56))


def test_patch_pixels_shapes_and_determinism():
    x = torch.rand(2, 3, 32, 32)
    raw = build_backbone({"name": "patch-pixels", "input_size": 32, "patch_size": 8})
    feats = raw(x)
    assert feats.shape == (2, 16, 192) and raw.grid == (4, 4)
    # token 1 is the patch at row 0, column 1: its pixels, normalised, channel-major
    assert torch.allclose(feats[0, 1], normalise(x)[0, :, 0:8, 8:16].reshape(-1))
    proj = [
        build_backbone({"name": "patch-pixels", "input_size": 32, "patch_size": 8, "proj_dim": 24})
        for _ in range(2)
    ]
    assert proj[0](x).shape == (2, 16, 24) and torch.equal(proj[0](x), proj[1](x))
    assert proj[0].describe()["proj_dim"] == 24 and list(raw.parameters()) == []
    with pytest.raises(
        BackboneError, match="backbone.input_size=30 is not divisible by backbone.patch_size=8"
    ):
        PatchPixels(30, 8)


# ------------------------------------------------------------------------------ weights by name


@pytest.fixture(scope="module")
def vits16_file(vits16, tmp_path_factory):
    """dino_say_vits16.pth as silicon-menagerie hosts it (DINO layout, teacher only here)."""
    path = tmp_path_factory.mktemp("served") / "dino_say_vits16.pth"
    torch.save(
        {"teacher": {f"module.backbone.{k}": v for k, v in vits16.state_dict().items()}}, path
    )
    return path


def test_silicon_weights_by_name_from_a_prefilled_hf_cache_offline(
    vits16, vits16_file, tmp_path, monkeypatch
):
    """dino_say_vits16 with no file given: eminorhan/dino_say_vits16 from the Hugging Face cache
    (HF_HUB_OFFLINE=1, no network); $EGOSLOTS_WEIGHTS and backbone.checkpoint still win."""
    import huggingface_hub

    forbid_network(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hf_cache(tmp_path / "hub", "eminorhan/dino_say_vits16", vits16_file, "dino_say_vits16.pth")
    enc = build_backbone({"name": "dino_say_vits16", "input_size": 224})
    assert enc.checkpoint_sha256 == checkpoints.sha256_file(vits16_file)  # feeds the fingerprint
    images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(enc(images), block_output(vits16, normalise(images), 11)[:, 1:])

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "dino_say_vits16.pth").write_bytes(b"another file")
    monkeypatch.setenv("EGOSLOTS_WEIGHTS", str(tmp_path / "weights"))
    assert (
        checkpoints.locate("dino_say_vits16", None) == tmp_path / "weights" / "dino_say_vits16.pth"
    )
    assert checkpoints.locate("dino_say_vits16", str(vits16_file)) == vits16_file


def test_offline_and_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    forbid_network(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(BackboneError) as err:
        build_backbone({"name": "mae_say_vits16", "input_size": 32})
    message = str(err.value)
    assert "\n" not in message
    assert (
        "no weights for backbone.name=mae_say_vits16: HF_HUB_OFFLINE=1 and it is not in the cache"
        in message
    )
    assert "`hf download eminorhan/mae_say_vits16 mae_say_vits16.pth`" in message
    assert (
        "$EGOSLOTS_WEIGHTS/mae_say_vits16.pth" in message and "backbone.checkpoint=PATH" in message
    )
    with pytest.raises(
        BackboneError, match=r"hf download timm/test_vit.r160_in1k model.safetensors"
    ):
        build_backbone({"name": "test_vit", "input_size": 32})


def test_hub_sources_follow_silicon_menagerie_and_timm():
    assert checkpoints.hub_sources("dino_say_vitb14", None) == [
        ("eminorhan/dino_say_vitb14", "dino_say_vitb14.pth")
    ]
    timm_cfg = timm.models.get_pretrained_cfg("vit_small_patch14_dinov2").to_dict()
    assert checkpoints.hub_sources("vit_small_patch14_dinov2", timm_cfg) == [
        ("timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors"),
        ("timm/vit_small_patch14_dinov2.lvd142m", "pytorch_model.bin"),
    ]
    assert checkpoints.hub_sources("x", {"url": "http://h/x.pth"}) == [("url", "http://h/x.pth")]


class HubStandIn:
    """The two Hugging Face hub requests hf_hub_download makes (HEAD, then GET of
    /<repo>/resolve/<revision>/<file>), served from local files on loopback."""

    COMMIT = "c" * 40

    def __init__(self, files: dict[str, Path]):
        import http.server
        import threading

        self.files, self.requests = files, []
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self, body: bool):
                stand_in.requests.append((self.command, self.path))
                repo, _, rest = self.path.lstrip("/").partition("/resolve/")
                path = stand_in.files.get(f"{repo}/{rest.partition('/')[2]}")
                if path is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", stand_in.COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self.answer(False)

            def do_GET(self):
                self.answer(True)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def downloads(self) -> list[str]:
        return [p for method, p in self.requests if method == "GET" and "/resolve/" in p]


def test_weights_by_name_download_into_the_hf_cache_from_a_hub_stand_in(
    tmp_path, vits16_file, monkeypatch
):
    """First use downloads eminorhan/<name>/<name>.pth (and a timm name's model.safetensors)
    into the Hugging Face cache; later uses read the cache, offline too."""
    import huggingface_hub
    from safetensors.torch import save_file

    silicon = vits16_file
    tiny = meta_random(lambda: timm.create_model("test_vit", pretrained=False, num_classes=0), 2)
    timm_file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(timm_file))
    hub = HubStandIn(
        {
            "eminorhan/dino_say_vits16/dino_say_vits16.pth": silicon,
            "timm/test_vit.r160_in1k/model.safetensors": timm_file,
        }
    )
    # huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE once, at import: point it here
    constants = huggingface_hub.constants
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    silicon_cfg = {"name": "dino_say_vits16", "input_size": 32}
    timm_cfg = {"name": "test_vit", "input_size": 32}
    try:
        first = build_backbone(silicon_cfg)
        assert first.checkpoint_sha256 == checkpoints.sha256_file(silicon)
        assert build_backbone(timm_cfg).checkpoint_sha256 == checkpoints.sha256_file(timm_file)
        assert hub.downloads() == [
            "/eminorhan/dino_say_vits16/resolve/main/dino_say_vits16.pth",
            "/timm/test_vit.r160_in1k/resolve/main/model.safetensors",
        ]
        cached = list((tmp_path / "hub").glob("models--eminorhan--dino_say_vits16/snapshots/*/*"))
        assert [p.name for p in cached] == ["dino_say_vits16.pth"]
    finally:
        hub.server.shutdown()
    forbid_network(monkeypatch)  # the hub is gone: offline, the cache alone serves both
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = build_backbone(silicon_cfg)
    assert again.checkpoint_sha256 == first.checkpoint_sha256
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(images), first(images))
    assert build_backbone(timm_cfg).checkpoint_sha256 == checkpoints.sha256_file(timm_file)
