"""bench/gpu.py, the prepared GPU benchmark, runs in its tiny CPU mode so that it cannot rot
before the next GPU is available."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_benchmark_runs_in_tiny_mode():
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "gpu.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "section failed" not in text, text[-3000:]
    assert "median: bare" in text and "extraction" in text  # section 1 printed its ratio
    for variant in ("cache (egoslots)", "online ViT fp32 (SlotContrast)", "online ViT bf16"):
        assert f"| {variant} | " in text, text[-3000:]
