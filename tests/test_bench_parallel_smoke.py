"""bench/parallel.py --smoke runs end to end on a local Ray and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
HEADER = "| search | trials (decided + speculative) | local s | ray 2 workers s | speed-up |"


def test_parallel_smoke():
    pytest.importorskip("ray")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "parallel.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert HEADER in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    rows = {line.split("|")[1].strip(): line for line in lines}
    for search in ("grid", "ladder"):
        cells = [c.strip() for c in rows[search].strip("|").split("|")]
        assert cells[6].startswith("yes") and cells[7] == "yes"  # same decisions, same losses
