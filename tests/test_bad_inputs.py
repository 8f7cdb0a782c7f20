"""Bad inputs not covered elsewhere (see docs/bad-inputs.md for the whole sweep)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from cache.store import FeatureStore, StoreError
from pipeline.data.base import SourceError
from pipeline.data.frames import FrameFolderSource
from stages.common import StageError
from test_train_slots import make_dvae_run, make_store, tiny_cfg


def test_empty_and_16bit_png(tmp_path):
    (tmp_path / "v").mkdir()
    Image.fromarray(np.full((12, 16), 65535, np.uint16)).save(tmp_path / "v" / "frame0.png")
    (tmp_path / "v" / "frame1.png").write_bytes(b"")
    frames = FrameFolderSource(tmp_path).read_frames("v", 0, 1)
    rgb = next(iter(frames)).rgb
    assert rgb.dtype == np.uint8 and rgb.shape == (12, 16, 3) and rgb.max() == 255
    with pytest.raises(SourceError, match=r"frame1\.png: frame 1 of video 'v': cannot decode image"):
        list(FrameFolderSource(tmp_path).read_frames("v", 1, 2))


def test_zarr_group_that_is_not_an_egoslots_store(tmp_path):
    (tmp_path / "stores").mkdir()
    zarr.open_group(str(tmp_path / "stores" / "abc.zarr"), mode="w").create_array("x", shape=(3,), dtype="f4")
    with pytest.raises(StoreError, match=r"abc\.zarr is a zarr group but not an egoslots feature store"):
        FeatureStore.open(tmp_path / "stores" / "abc.zarr")


def test_nan_features_stop_train_slots_naming_the_step(tmp_path):
    from stages.train_slots import train

    store = make_store(tmp_path)
    make_dvae_run(tmp_path)
    zarr.open_array(str(store.path) + "/features", mode="r+")[:] = np.nan
    with pytest.raises(StageError, match=r"NaN/inf at step \d+"):
        train(tiny_cfg(tmp_path, "trainer.max_steps=3", "trainer.val_every=100", "trainer.image_every=100"))
    assert not (tmp_path / "runs" / "t" / "checkpoints" / "last.ckpt").exists()
