"""bench/nested_vs_grid.py --smoke: one nested run beside the grid on planted-k2, and what
the benchmark charges it."""

from __future__ import annotations

import json

import pytest

from bench import nested_vs_grid


def test_nested_vs_grid_smoke(bench_main, tmp_path):
    out = bench_main(nested_vs_grid, "--out", str(tmp_path))
    assert nested_vs_grid.HEADER in out
    row = json.loads((tmp_path / "results" / "planted-k2.json").read_text())
    ranks = [1, 2, 4]
    assert row["ranks"] == ranks and sorted(map(int, row["nested_curve"])) == ranks
    # The regret is the grid's loss at the nested rank minus at the grid's: zero when they
    # agree, never below zero (the grid's rank is its best by the same rule).
    assert (row["regret"] == 0) == row["same_rank"]
    assert row["regret"] >= 0 or row["nested_rank"] > row["grid_rank"]
    # Tokens: the nested run trains one r_max trial's worth (each step trains one drawn
    # rank), the final trial one more; the grid trains one per trial.
    tokens = row["tokens"]
    assert tokens["nested"] == tokens["one_trial_r_max"] == tokens["final"]
    assert row["tokens_vs_one_trial"] == pytest.approx(2.0)
    assert row["tokens_vs_grid"] == pytest.approx(2 / row["grid_trials"])
    # The tables are rendered from that row: both curves, the same numbers.
    assert nested_vs_grid.table([row]) in out
