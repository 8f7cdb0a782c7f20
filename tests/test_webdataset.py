"""dataset.source=webdataset: SlotContrast's MOVi / YT-VIS tar shards, read in place.

The shards are written member for member as SlotContrast's data/save_movi.py and
save_ytvis2021.py write them (tests/helpers/shards.py); the last test runs `egoslots run` on them.
"""

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest

from egoslots.pipeline.config import load_config
from egoslots.pipeline.data import make_source
from egoslots.pipeline.data.base import SourceError
from egoslots.pipeline.data.webdataset import WebdatasetSource, expand_braces
from tests.helpers.runs import run_cli
from tests.helpers.shards import movi_like, write_shards, ytvis_like

REPO = Path(__file__).resolve().parents[1]
TRAIN = "movi_c/movi_c-train-{000000..000002}.tar"
VAL = "movi_c/movi_c-validation-{000000..000001}.tar"


@pytest.fixture(scope="module")
def movi(tmp_path_factory):
    """5 train videos in 3 shards, 3 validation videos in 2 (2 samples per shard)."""
    root = tmp_path_factory.mktemp("shards")
    train, val = movi_like(5, seed=0), movi_like(3, seed=1)
    write_shards(str(root / "movi_c/movi_c-train-%06d.tar"), train, maxcount=2)
    write_shards(str(root / "movi_c/movi_c-validation-%06d.tar"), val, maxcount=2)
    return root, train, val


def test_expand_braces_as_webdataset_shard_lists():
    assert expand_braces("a-{000000..000002}.tar") == [f"a-00000{i}.tar" for i in range(3)]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("{09..11}") == ["09", "10", "11"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert expand_braces("x{a,{b,c}}") == ["xa", "xb", "xc"]
    assert expand_braces("plain.tar") == ["plain.tar"] and expand_braces("{x}") == ["{x}"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_braces("a-{0..3.tar")


def test_lists_videos_splits_and_reads_frames_and_masks(movi):
    root, train, val = movi
    source = WebdatasetSource(root, {"train": TRAIN, "val": VAL})
    videos = source.videos()
    assert [v.video_id for v in videos] == [
        "movi_c/movi_c-train-000000/0",
        "movi_c/movi_c-train-000000/1",
        "movi_c/movi_c-train-000001/2",
        "movi_c/movi_c-train-000001/3",
        "movi_c/movi_c-train-000002/4",
        "movi_c/movi_c-validation-000000/0",
        "movi_c/movi_c-validation-000000/1",
        "movi_c/movi_c-validation-000001/2",
    ]
    assert [v.split for v in videos] == ["train"] * 5 + ["val"] * 3
    assert all(v.num_frames == 6 for v in videos) and source.has_masks
    shard = root / "movi_c/movi_c-train-000001.tar"
    assert videos[3].files[0].path == "movi_c/movi_c-train-000001.tar"
    assert videos[3].files[0].size == shard.stat().st_size
    assert videos[3].files[0].content == 0  # never the mtime (a touched shard keeps its store)
    frames = list(source.read_frames("movi_c/movi_c-train-000001/3", 2, 5))
    assert [f.index for f in frames] == [2, 3, 4]
    for f in frames:
        assert np.array_equal(f.rgb, train[3]["video.npy"][f.index])
        assert np.array_equal(f.mask, train[3]["segmentations.npy"][f.index, :, :, 0])
        assert f.mask.dtype == np.uint8 and f.rgb.dtype == np.uint8
    whole = list(source.read_frames("movi_c/movi_c-validation-000001/2"))
    assert np.array_equal(np.stack([f.rgb for f in whole]), val[2]["video.npy"])
    with pytest.raises(SourceError, match=r"frames 4..9 out of range \(it has 6\)"):
        list(source.read_frames("movi_c/movi_c-train-000000/0", 4, 9))


def test_a_frame_range_is_one_byte_range_read_not_the_shard(movi, monkeypatch):
    root, train, _ = movi
    source = WebdatasetSource(root, {"train": TRAIN})
    source.videos()
    fs = fsspec.filesystem("file")
    reads = []
    real = type(fs).cat_file

    def counting(self, path, start=None, end=None, **kw):
        reads.append((path, start, end))
        return real(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(type(fs), "cat_file", counting)
    list(source.read_frames("movi_c/movi_c-train-000002/4", 1, 3))
    video_bytes, mask_bytes = 2 * 32 * 32 * 3, 2 * 32 * 32  # 2 frames of uint8 (H, W, 3), (H, W, 1)
    assert sorted(end - start for _, start, end in reads) == [mask_bytes, video_bytes]
    assert all(p.endswith("movi_c-train-000002.tar") for p, _, _ in reads)


def test_ytvis_instance_channels_become_labels(tmp_path):
    samples = ytvis_like([11, 40, 7], seed=3)
    seg = np.zeros((5, 24, 40, 2), np.uint8)  # two overlapping instances, category ids 17 and 3
    seg[:, 2:10, 2:10, 0] = 17
    seg[:, 6:14, 6:14, 1] = 3
    samples[1]["segmentations.npy"] = seg
    write_shards(str(tmp_path / "ytvis2021/ytvis-validation-%06d.tar"), samples)
    source = WebdatasetSource(tmp_path, {"val": "ytvis2021/ytvis-validation-{000000..000000}.tar"})
    assert [v.video_id for v in source.videos()] == [
        f"ytvis2021/ytvis-validation-000000/{k}" for k in (11, 40, 7)
    ]
    frame = next(source.read_frames("ytvis2021/ytvis-validation-000000/40"))
    assert frame.rgb.shape == (24, 40, 3)  # non-square: extraction resizes and centre-crops
    assert frame.mask[3, 3] == 1 and frame.mask[12, 12] == 2 and frame.mask[0, 0] == 0
    assert frame.mask[7, 7] == 2  # overlap: the later instance wins
    assert set(np.unique(frame.mask)) == {0, 1, 2}


def test_urls_through_fsspec(movi):
    """A URL root (here fsspec's in-memory filesystem) is read with range reads, like a path."""
    root, train, _ = movi
    mem = fsspec.filesystem("memory")
    for shard in (root / "movi_c").glob("movi_c-train-*.tar"):
        mem.pipe(f"/bucket/data/movi_c/{shard.name}", shard.read_bytes())
    source = WebdatasetSource("memory://bucket/data", {"train": TRAIN})
    assert str(source.root) == "memory://bucket/data" and len(source.videos()) == 5
    frame = list(source.read_frames("movi_c/movi_c-train-000001/2", 5, 6))[0]
    assert np.array_equal(frame.rgb, train[2]["video.npy"][5])


def test_bad_shards_give_one_clear_error_or_are_skipped(movi, tmp_path):
    root, _, _ = movi
    with pytest.raises(SourceError, match=r"shard .*movi_c-train-000003.tar does not exist"):
        WebdatasetSource(root, {"train": "movi_c/movi_c-train-{000000..000003}.tar"}).videos()
    skipping = WebdatasetSource(
        root, {"train": "movi_c/movi_c-train-{000000..000003}.tar"}, skip_bad=True
    )
    assert len(skipping.videos()) == 5 and skipping.skipped[0][0] == "movi_c/movi_c-train-000003"
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(SourceError, match=r"broken.tar: not a readable uncompressed tar shard"):
        WebdatasetSource(tmp_path, {"train": "broken.tar"}).videos()
    masks_only = {"__key__": "0", "segmentations.npy": np.zeros((2, 4, 4, 1), np.uint8)}
    write_shards(str(tmp_path / "novideo-%06d.tar"), [masks_only])
    with pytest.raises(SourceError, match=r"novideo-000000.tar: sample 0 has no video.npy member"):
        WebdatasetSource(tmp_path, {"train": "novideo-000000.tar"}).videos()
    with pytest.raises(SourceError, match=r"needs shard patterns: set dataset.webdataset"):
        WebdatasetSource(root, {"train": None})
    with pytest.raises(SourceError, match=r"in both dataset.webdataset.train_shards and .val"):
        WebdatasetSource(root, {"train": TRAIN, "val": "movi_c/movi_c-train-000000.tar"}).videos()


def test_shards_without_masks(movi, tmp_path):
    """SlotContrast's --only-video shards, or dataset.webdataset.mask_key=null: no masks."""
    samples = [{"__key__": str(i), "video.npy": s["video.npy"]} for i, s in enumerate(movi[1])]
    write_shards(str(tmp_path / "only-video-%06d.tar"), samples)
    source = WebdatasetSource(tmp_path, {"train": "only-video-000000.tar"})
    assert len(source.videos()) == 5 and not source.has_masks
    assert next(source.read_frames("only-video-000000/0")).mask is None
    root = movi[0]
    assert not WebdatasetSource(root, {"train": TRAIN}, mask_key=None).has_masks


def test_make_source_from_config(movi):
    root, _, _ = movi
    released = load_config(REPO / "configs" / "slotcontrast_movi_c.yaml")
    assert released.dataset.webdataset.val_shards == "movi_c/movi_c-validation-{000000..000007}.tar"
    cfg = load_config(
        REPO / "configs" / "slotcontrast_movi_c.yaml",
        [
            f"dataset.path={root}",
            f"dataset.webdataset.train_shards={TRAIN}",
            f"dataset.webdataset.val_shards={VAL}",
        ],
    )
    source = make_source(cfg)
    assert isinstance(source, WebdatasetSource) and source.root == root
    assert [v.split for v in source.videos()] == ["train"] * 5 + ["val"] * 3


def test_egoslots_run_end_to_end_on_shards(movi, tmp_path):
    """`egoslots run` on webdataset shards: extract, dVAE, slots, evaluate on the val shards."""
    root, _, _ = movi
    work = tmp_path / "work"
    done = run_cli(
        work,
        "dataset.source=webdataset",
        f"dataset.path={root}",
        f"dataset.webdataset.train_shards={TRAIN}",
        f"dataset.webdataset.val_shards={VAL}",
        "evaluate.split=val",
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((work / "runs" / "demo" / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["num_videos"] == 3
    assert metrics["video_ids"] == [
        "movi_c/movi_c-validation-000000/0",
        "movi_c/movi_c-validation-000000/1",
        "movi_c/movi_c-validation-000001/2",
    ]
    # a score, not NaN; adjusted Rand index lies in [-1, 1] (slightly negative below chance)
    assert -1 <= metrics["methods"]["model_decoder"]["video_fg_ari"]["mean"] <= 1
    assert metrics["methods"]["model_decoder"]["frame_fg_ari"]["n"] == 3 * 6
    assert (work / "runs" / "dvae" / "dvae.json").is_file()
    assert json.loads((work / "runs" / "dvae" / "dvae.json").read_text())["arch"] == "steve"
