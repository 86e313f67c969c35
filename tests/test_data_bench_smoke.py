"""bench/data_prep.py --smoke runs both implementations offline and they pack the same blocks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "data_prep.py"


def test_data_prep_smoke():
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| implementation | records | tokens (blocks) | time |" in proc.stdout
    rows = [
        line
        for line in proc.stdout.splitlines()
        if line.startswith("| before") or line.startswith("| after")
    ]
    assert rows and rows[-1].startswith("| after")
    digests = {row.rstrip(" |").rsplit("| ", 1)[-1] for row in rows}
    assert len(digests) == 1, proc.stdout  # before and after packed identical blocks
