"""The benchmarks' --smoke modes still run end to end and print what they report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize(
    ("script", "expected", "table"),
    [
        ("search_efficiency.py", "| task | k | ranks | ladder trials (ranks) |", True),
        (
            "throughput.py",
            "| model | precision: rankwise / Trainer | steps × batch × seq | pairs |",
            True,
        ),
        (
            "criteria.py",
            "| criterion | how | k=2 | k=8 | within 2x of k | = k | ladder trials |",
            True,
        ),
        ("rank_curves.py", "planted-k2: base ", False),
        pytest.param("precision.py", "| planted-k2 | 1,2 |", True, marks=pytest.mark.slow),
        pytest.param(
            "search_cost.py",
            "| nested+warm½ | 1.50 | ",  # the summary row: a final trial on half the steps
            True,
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bench_smoke(script, expected, table):
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout
    if table:
        rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
        assert len(rows) >= 2  # the header and at least one row
