"""What a refused command must look like: one ``Error:`` line, no traceback (docs/bad-inputs.md)."""

from __future__ import annotations

import subprocess


def one_error_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """The command failed with one ``Error:`` line holding ``expected``, and no traceback."""
    assert proc.returncode != 0, (proc.stdout or "")[-2000:] + (proc.stderr or "")[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]
