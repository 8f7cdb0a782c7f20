"""Shared test settings: small thread counts keep the suite fast and steady on 2 cores."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may download anything
# One thread: small convs and matmuls run several times faster than with two on a busy 2-core box.
torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def repo_root() -> str:
    return REPO_ROOT
