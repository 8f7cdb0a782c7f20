"""The encoder shipped for the demo (configs/encoders/synthetic-p8): the file is the one
docs/discovery.md says how to reproduce, small, and it loads through the demo's config."""

import hashlib
import json
from pathlib import Path

import torch

from egoslots.pipeline.backbones import build_backbone
from egoslots.pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "encoders" / "synthetic-p8"
# sha256 of encoder.safetensors as exported by `egoslots pretrain-encoder ... --export-safetensors`
SHA256 = "2d6389eabbd2e96f162258e65c8921939a47b71f14abff106f1e75bd30c45502"


def test_shipped_weights_are_the_documented_file():
    weights = SHIPPED / "encoder.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == SHA256
    assert json.loads((SHIPPED / "encoder.json").read_text())["sha256"] == SHA256
    assert SHA256 in (REPO / "docs" / "discovery.md").read_text()


def test_demo_config_loads_the_shipped_encoder_at_16x16_tokens():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert Path(cfg.backbone.checkpoint) == SHIPPED / "encoder.safetensors"
    encoder = build_backbone(cfg.backbone)
    assert encoder.describe()["checkpoint_sha256"] == SHA256
    with torch.no_grad():
        feats = encoder(torch.rand(2, 3, 128, 128))
    assert feats.shape == (2, 256, 128) and torch.isfinite(feats).all()
    assert feats.std() > 0.01  # trained weights, not an all-constant map
