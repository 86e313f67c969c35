"""bench/criteria.py and bench/rank_curves.py still run end to end (--smoke)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("criteria.py", "| criterion | how | k=2 | k=8 | within 2x of k | = k | ladder trials |"),
        ("rank_curves.py", "planted-k2: base "),
    ],
)
def test_bench_criteria_smoke(script, expected):
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout
