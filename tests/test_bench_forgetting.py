"""bench/forgetting.py --smoke: a tiny model's grid with forgetting measured per rank, each
adapter measured again on held-back text, and the cached KL checked against the exact one."""

from __future__ import annotations

import json

from bench import forgetting


def test_forgetting_smoke(bench_main, tmp_path):
    out = bench_main(forgetting, "--out", str(tmp_path))
    [row] = json.loads((tmp_path / "forgetting.json").read_text())
    assert row["task"] == "smollm2-docstrings"
    assert sorted(map(int, row["ranks"])) == [1, 4, 16]
    for r, measured in row["ranks"].items():
        # The tiny vocabulary (128) is inside the top-256 the base keeps: the cached KL is
        # the exact KL, not only a lower bound of it.
        assert abs(measured["kl"] - row["exact_kl"][r]) < 1e-4
        assert measured["forgetting"] is not None and row["held"][r] is not None
    assert 0 < row["retain_share"] < 1  # the retain evaluation's share of the search's wall time
    assert str(row["rank"]) in row["ranks"]  # the recommended rank was measured
    # Both tables are rendered from that row.
    assert forgetting.table([row]) in out and forgetting.summary([row]) in out
