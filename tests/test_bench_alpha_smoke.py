"""bench/alpha_policies.py keeps working: its smoke mode runs end to end in seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_alpha_policies_smoke():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "alpha_policies.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| task | k | policy | calibrated lr |" in out.stdout
    assert "| planted-k2 | 2 | fixed |" in out.stdout and "| planted-k2 | 2 | ratio |" in out.stdout
