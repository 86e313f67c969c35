"""bench/nested_vs_grid.py --smoke runs end to end and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
HEADER = "| task | k | ranks | nested rank | grid rank | same? | regret (nats) |"


def test_nested_vs_grid_smoke():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "nested_vs_grid.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert HEADER in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| planted-k2 | 2 |")]
    assert len(rows) == 1, proc.stdout[-3000:]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[5] in ("yes", "NO")
    assert float(cells[7]) > 0  # nested + final tokens ÷ one r_max trial
    curves = [line for line in proc.stdout.splitlines() if line.startswith("| planted-k2 | ")]
    assert any("| nested | r=1,2,4:" in c for c in curves)
    assert any("| grid | r=1,2,4:" in c for c in curves)
