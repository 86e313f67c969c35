"""The benchmarks' --smoke modes still run end to end and print their tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize(
    ("script", "header"),
    [
        ("search_efficiency.py", "| task | k | ranks | ladder trials (ranks) |"),
        ("throughput.py", "| model | steps × batch × seq | pairs | tok/s rankwise |"),
    ],
)
def test_bench_smoke(script, header):
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert header in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) >= 2  # the header and at least one row
