"""ClipDataset returns the right clips: the cached values equal the backbone's features of the
source frames, under both fork and spawn DataLoader workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from egoslots.cache.reader import ClipDataset
from egoslots.cache.store import FeatureStore, StoreError
from egoslots.pipeline.backbones import build_backbone
from egoslots.pipeline.preprocess import preprocess_frame
from egoslots.stages.extract_features import extract
from tests.helpers.data import extract_cfg, memory_source


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A float32 store with flipped rows, plus the source and config it came from."""
    root = tmp_path_factory.mktemp("reader")
    source = memory_source(num_videos=3)
    cfg = extract_cfg(root, "extract.dtype=float32", "augment.hflip=cache")
    return extract(cfg, source=source), source, cfg


def expected_clip(source, cfg, video_id, start, length, step, hflip):
    """What a clip must hold, computed straight from the source frames."""
    backbone = build_backbone(cfg.backbone)
    frames = list(source.read_frames(video_id, start, start + (length - 1) * step + 1))[::step]
    out = [
        preprocess_frame(f.rgb, f.mask, cfg.backbone.input_size, cfg.extract.frame_size, hflip)
        for f in frames
    ]
    images = torch.stack([o[0] for o in out]).float() / 255.0
    with torch.inference_mode():
        feats = backbone(images)
    return feats, torch.stack([o[1] for o in out]), torch.stack([o[2] for o in out])


def test_clips_hold_the_features_frames_and_masks_of_their_source_frames(extracted):
    path, source, cfg = extracted
    for split in ("train", "val", "test"):
        ds = ClipDataset(
            path,
            split=split,
            clip_length=3,
            stride=2,
            frame_step=2,
            fields=("features", "frames", "masks"),
        )
        for index in range(0, len(ds), 3):
            item = ds[index]
            feats, frames, masks = expected_clip(
                source, cfg, item["video_id"], item["start"], 3, 2, item["hflip"]
            )
            assert item["features"].shape == feats.shape == (3, 16, 192)
            torch.testing.assert_close(item["features"], feats, rtol=1e-6, atol=1e-6)
            assert torch.equal(item["frames"], frames) and torch.equal(item["masks"], masks)
    whole = ClipDataset(path, split=None, clip_length=None, include_flipped=False)
    assert sorted(item["video_id"] for item in whole) == ["vid00", "vid01", "vid02"]
    assert [len(item["features"]) for item in whole] == [9, 10, 11]


def test_flipped_rows_are_mirrored_features(extracted):
    path, source, cfg = extracted
    ds = ClipDataset(path, split=None, clip_length=2, fields=("features",), video_ids=["vid01"])
    flips = [item for item in ds if item["hflip"]]
    plain = [item for item in ds if not item["hflip"]]
    assert len(flips) == len(plain) == 9
    feats, _, _ = expected_clip(source, cfg, "vid01", 4, 2, 1, True)
    torch.testing.assert_close(flips[4]["features"], feats, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(flips[4]["features"], plain[4]["features"])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_the_same_clips(extracted, context):
    path, _, _ = extracted
    ds = ClipDataset(path, split=None, clip_length=4, fields=("features", "frames", "masks"))
    direct = [ds[i] for i in range(len(ds))]
    loader = DataLoader(
        ds, batch_size=5, num_workers=2, multiprocessing_context=context, shuffle=False
    )
    batches = list(loader)
    feats = torch.cat([b["features"] for b in batches])
    frames = torch.cat([b["frames"] for b in batches])
    assert torch.equal(feats, torch.stack([d["features"] for d in direct]))
    assert torch.equal(frames, torch.stack([d["frames"] for d in direct]))
    assert sum((b["video_id"] for b in batches), []) == [d["video_id"] for d in direct]


def test_reader_refuses_incomplete_store_and_missing_fields(tmp_path):
    source = memory_source(num_videos=2, masks=False)
    path = extract(extract_cfg(tmp_path), source=source)
    with pytest.raises(StoreError, match="no ground-truth masks"):
        ClipDataset(path, fields=("features", "masks"))
    with pytest.raises(StoreError, match="no tokens of dVAE abc"):
        ClipDataset(path, fields=("tokens",), tokens="abc")
    FeatureStore.open(path, mode="r+").update_meta(complete=False)
    with pytest.raises(StoreError, match="incomplete"):
        ClipDataset(path)
    np.testing.assert_array_equal(
        FeatureStore.open(path, require_complete=False).done_chunks(), True
    )


@pytest.mark.parametrize(
    "dtype,torch_dtype",
    [("float16", torch.float16), ("bfloat16", torch.bfloat16), ("int8", torch.float32)],
)
def test_stored_feature_dtype_widens_to_the_float32_values(tmp_path, dtype, torch_dtype):
    path = extract(
        extract_cfg(tmp_path, f"extract.dtype={dtype}"), source=memory_source(num_videos=2)
    )
    wide = ClipDataset(path, split=None, clip_length=3, frame_step=2)
    narrow = ClipDataset(path, split=None, clip_length=3, frame_step=2, feature_dtype="stored")
    for i in range(len(wide)):
        a, b = wide[i]["features"], narrow[i]["features"]
        assert a.dtype == torch.float32 and b.dtype == torch_dtype
        assert torch.equal(a, b.float())


@pytest.mark.parametrize(
    "dtype,context", [("float16", "spawn"), ("bfloat16", "fork"), ("int8", "fork")]
)
def test_whole_batches_equal_stacked_clips(tmp_path, dtype, context):
    """ClipBatches (train-slots' loader: each batch read straight into one shared-memory
    tensor) gives what stacking ClipDataset's items gives, in DataLoader workers too; frames
    read whole by FrameDataset equal the frames read one by one."""
    from egoslots.cache.reader import ClipBatches
    from egoslots.stages.machinery.datamodules import FrameDataset, as_batch, collate_clips

    path = extract(
        extract_cfg(tmp_path, f"extract.dtype={dtype}"), source=memory_source(num_videos=2)
    )
    fields = ("features", "frames", "masks")
    kw = dict(split=None, clip_length=3, frame_step=2, fields=fields, feature_dtype="stored")
    items, batched = ClipDataset(path, **kw), ClipBatches(path, **kw)
    order = [int(i) for i in np.random.default_rng(0).permutation(len(items))]
    loader = DataLoader(
        batched,
        batch_size=3,
        sampler=order,
        num_workers=2,
        multiprocessing_context=context,
        collate_fn=collate_clips,
    )
    got = list(loader)
    for b, batch in enumerate(got):
        expected = collate_clips([items[i] for i in order[3 * b : 3 * b + 3]])
        assert batch.keys() == expected.keys()
        for key, value in expected.items():
            if torch.is_tensor(value):
                assert batch[key].dtype == value.dtype and torch.equal(batch[key], value), key
            else:
                assert batch[key] == value, key
    assert sum(len(b["video_id"]) for b in got) == len(order)

    store = FeatureStore.open(path)
    frames = FrameDataset(store, np.arange(store.num_frames))
    loader = DataLoader(
        frames, batch_size=4, sampler=order, num_workers=1, collate_fn=as_batch, drop_last=True
    )
    for b, batch in enumerate(loader):
        assert torch.equal(batch, torch.stack([frames[i] for i in order[4 * b : 4 * b + 4]]))
