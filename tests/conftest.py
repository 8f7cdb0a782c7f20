"""Shared test settings (small thread counts keep the suite fast and steady on 2 cores) and the
fixtures several test modules use."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may download anything
# One thread: small convs and matmuls run several times faster than with two on a busy 2-core box
# (EGOSLOTS_NUM_THREADS: also in the stages and the egoslots subprocesses the tests start).
torch.set_num_threads(1)
os.environ.setdefault("EGOSLOTS_NUM_THREADS", "1")
# precision: auto measures into a cache of this test session, never the user's own.
_PRECISION_DIR = tempfile.mkdtemp(prefix="egoslots-test-precision-")
atexit.register(shutil.rmtree, _PRECISION_DIR, True)
os.environ.setdefault("EGOSLOTS_PRECISION_CACHE", os.path.join(_PRECISION_DIR, "precision.json"))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests (and the egoslots subprocesses they start) import the installed package `egoslots`:
# it must be this checkout, or they would test another one.
import egoslots  # noqa: E402

if os.path.dirname(os.path.abspath(egoslots.__file__)) != REPO_ROOT:
    pytest.exit(
        f"egoslots is installed from {os.path.dirname(egoslots.__file__)}, not this checkout "
        f"({REPO_ROOT}): run `pip install -e .` here first",
        returncode=4,
    )


@pytest.fixture
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Frame folder, config, and the store of one uninterrupted single-process extract-features."""
    from tests.helpers.crashkit import extract_cli, run_to_end
    from tests.helpers.data import write_extract_config, write_frame_folder
    from tests.helpers.stores import only_store

    root = tmp_path_factory.mktemp("extract")
    data = write_frame_folder(root / "frames", videos=6, frames=20, size=(48, 64))
    config = write_extract_config(root, data)
    output = run_to_end(extract_cli(config, root / "reference"))
    store = only_store(root / "reference")
    assert f"store={store.stem}" in output
    return data, config, store


@pytest.fixture(scope="module")
def trained_dvae(tmp_path_factory):
    """A finished 6-step dVAE run on a small store, not yet tokenized (tests copy it with
    :func:`tests.helpers.runs.copy_dvae_run`); returns (root, run dir)."""
    import egoslots.stages.pretrain_dvae as stage
    from tests.helpers.runs import dvae_cfg
    from tests.helpers.stores import frames_store

    root = tmp_path_factory.mktemp("trained")
    frames_store(root / "store.zarr")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        cfg = dvae_cfg(root, root / "store.zarr", "dvae.max_steps=6", "dvae.ckpt_every=3")
        run_dir = stage.pretrain(cfg, tokenize=False)
    return root, run_dir
