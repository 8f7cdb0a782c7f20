"""`export-slots` to zarr and npz: shapes, video table, fingerprint, the documented reader."""

import errno
import json

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from egoslots.stages import export_slots as export
from egoslots.stages.machinery.slot_files import ZarrWriter
from tests.helpers.runs import RUN_SLOT_DIM, RUN_SLOTS, RUN_STEPS, slot_run
from tests.helpers.stores import SQ_DVAE_HASH as DVAE_HASH
from tests.helpers.stores import SQ_FRAMES as FRAMES
from tests.helpers.stores import SQ_GRID as GRID
from tests.helpers.stores import SQ_TOKEN_GRID as TOKEN_GRID


@pytest.fixture
def run(tmp_path_factory, tmp_path):
    return slot_run(tmp_path_factory, tmp_path / "work")


def read_export(out: str):
    """The snippet from the module docstring."""
    if out.endswith(".npz"):
        data = np.load(out)
        meta = json.loads(str(data["meta"]))
    else:
        data = zarr.open_group(out, mode="r")
        meta = dict(data.attrs["egoslots_export"])
    ids = [str(v) for v in data["video_ids"][:]]
    first, length = data["video_first"][:], data["video_length"][:]
    v = ids.index("video_04")
    rows = slice(int(first[v]), int(first[v] + length[v]))
    return meta, ids, data["slots"][rows], data["masks"][rows], data["tokens"][rows], data


@pytest.mark.parametrize("name", ["slots.zarr", "slots.npz"])
def test_export_shapes_and_fingerprint(run, tmp_path, name):
    out = export.export_slots_run(run, "test", tmp_path / name)  # the Python entry point
    meta, ids, slots, masks, tokens, data = read_export(str(out))
    assert ids == ["video_03", "video_04", "video_05"]
    assert slots.shape == (FRAMES, RUN_SLOTS, RUN_SLOT_DIM) and slots.dtype == np.float32
    assert masks.shape == (FRAMES, RUN_SLOTS, GRID * GRID)
    np.testing.assert_allclose(
        masks.astype(np.float32).sum(1), 1.0, atol=1e-2
    )  # softmax over slots
    assert tokens.shape == (FRAMES, TOKEN_GRID, TOKEN_GRID) and tokens.dtype == np.uint16
    assert data["attention_masks"].shape == (3 * FRAMES, RUN_SLOTS, GRID * GRID)
    assert (
        meta["store"] == "tinyfp"
        and meta["tokens"] == DVAE_HASH
        and meta["checkpoint_step"] == RUN_STEPS
    )
    assert meta["grid"] == [GRID, GRID] and meta["num_frames"] == 3 * FRAMES
    # tokens are the store's cached ids
    from egoslots.cache.store import FeatureStore

    store = FeatureStore.open(tmp_path / "work" / "stores" / "tinyfp.zarr")
    v = store.videos_in("test")[1]
    np.testing.assert_array_equal(tokens, store.tokens(DVAE_HASH)[v.first : v.stop])


def test_export_is_idempotent_and_refuses_foreign_output(run, tmp_path):
    out = tmp_path / "slots.zarr"
    export.export_slots_run(run, "test", out)
    stamp = (out / "zarr.json").stat().st_mtime_ns
    export.export_slots_run(run, "test", out)  # same run and split: nothing rewritten
    assert (out / "zarr.json").stat().st_mtime_ns == stamp
    with pytest.raises(Exception, match="different export"):
        export.export_slots_run(run, "train", out)
    export.export_slots_run(run, "train", out, overwrite=True)
    assert dict(zarr.open_group(str(out), mode="r").attrs["egoslots_export"])["split"] == "train"


def test_failed_export_leaves_previous_output_intact(run, tmp_path, monkeypatch):
    out = tmp_path / "slots.npz"
    export.export_slots_run(run, "test", out)
    before = out.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError):
        export.export_slots_run(run, "train", out, overwrite=True)
    assert out.read_bytes() == before


def test_cli_export(run, tmp_path):
    from egoslots import cli

    out = tmp_path / "cli.npz"
    result = CliRunner().invoke(cli.main, ["export-slots", str(run), str(out), "--split", "test"])
    assert result.exit_code == 0, result.output
    assert np.load(out)["slots"].shape == (3 * FRAMES, RUN_SLOTS, RUN_SLOT_DIM)
    assert "Example" in CliRunner().invoke(cli.main, ["export-slots", "--help"]).output


def test_zarr_writer_buffers_whole_chunks(tmp_path):
    writer = ZarrWriter(tmp_path / "w.zarr", chunk_rows=4)
    rows = np.arange(11 * 2, dtype=np.float32).reshape(11, 2)
    row = 0
    for size in (3, 3, 1, 4):  # window sizes that do not line up with chunks
        writer.write(row, 11, {"slots": rows[row : row + size]})
        row += size
        assert writer.start % 4 == 0  # only whole chunks written so far
    writer.finish({"video_first": np.array([0])}, {"ok": True})
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "w.zarr"))["slots"][:], rows)


def test_export_restarts_are_recorded_and_change_the_first_slots(run, tmp_path, monkeypatch):
    """--restarts R: each video's first slots are the best of R draws (as evaluate's); the export
    records R, and an export with another R is a different export."""
    import torch

    from egoslots import cli
    from egoslots.pipeline.slots import GaussianInit

    real = export.load_trained

    def gaussian_run(*args, **kwargs):  # the tiny run with a Gaussian initializer of unit noise
        model, *rest = real(*args, **kwargs)
        model.initializer = GaussianInit(RUN_SLOTS, RUN_SLOT_DIM)
        with torch.no_grad():
            torch.nn.init.constant_(model.initializer.log_std, 0.0)
        return (model, *rest)

    monkeypatch.setattr(export, "load_trained", gaussian_run)
    one = export.export_slots_run(run, "test", tmp_path / "one.npz")
    assert json.loads(str(np.load(one)["meta"]))["restarts"] == 1  # the run's config
    out = tmp_path / "best.npz"
    args = ["export-slots", str(run), str(out), "--split", "test", "--restarts", "6"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(str(np.load(out)["meta"]))["restarts"] == 6
    assert not np.array_equal(np.load(one)["slots"], np.load(out)["slots"])
    with pytest.raises(Exception, match="different export"):
        export.export_slots_run(run, "test", out, restarts=2)


def test_export_segments_are_the_parts_evaluate_scores(run, tmp_path):
    """--segments writes each pixel's segment: the slots' connected parts, refined to pixels;
    scored against the masks they give evaluate's 'split into parts, colour-refined' figures."""
    import torch

    from egoslots.cache.store import FeatureStore
    from egoslots.pipeline import metrics
    from egoslots.stages.evaluate import evaluate_run

    out = export.export_slots_run(run, "test", tmp_path / "seg.npz", segments=True)
    data = np.load(out)
    assert "segments" in json.loads(str(data["meta"]))
    scores = evaluate_run(run, "test", probe=False)
    store = FeatureStore.open(tmp_path / "work" / "stores" / "tinyfp.zarr")
    size = store.frame_size
    for i, video in enumerate(store.videos_in("test")):
        rows = slice(int(data["video_first"][i]), int(data["video_first"][i] + FRAMES))
        seg = torch.from_numpy(data["segments"][rows].astype(np.int64))  # (T, S, S)
        assert seg.shape == (FRAMES, size, size) and data["segments"].dtype == np.uint16
        # each id names its slot (id % K); the slots' own first parts keep ids below K
        assert int(seg.max()) < RUN_SLOTS * 64 and int((seg % RUN_SLOTS).max()) < RUN_SLOTS
        ids = seg.unique()
        onehot = (seg.flatten(1)[:, None] == ids[None, :, None]).float()  # (T, segments, S*S)
        true = torch.from_numpy(store.read_rows("masks", video.first, video.stop)).long()
        got = metrics.evaluate_masks(onehot, true, (size, size))
        want = scores["per_video"]["model_decoder_parts_refined"]  # {metric: [per video]}
        assert got["video_fg_ari"] == pytest.approx(want["video_fg_ari"][i], abs=1e-6)
        assert got["video_mbo"] == pytest.approx(want["video_mbo"][i], abs=1e-6)
