"""bench/precision.py --smoke runs end to end (fp32 against auto precision on a tiny task)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_precision_bench_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "precision.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| planted-k2 | 1,2 |" in proc.stdout
