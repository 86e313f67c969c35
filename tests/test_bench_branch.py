"""bench/branch.py: its smoke mode (a tiny pool, trunks and branches at both shares) and its
table, rendered from the results JSON alone."""

from __future__ import annotations

import json
from pathlib import Path

from bench import branch


def test_smoke_measures_branches_against_the_pool_and_renders_from_json(bench_main):
    out = bench_main(branch)
    assert "| planted-k2 (k=2) | 0.25 (2) | 0.0e+00 |" in out  # the trunk is the pool's trial
    assert "| planted-k2 (k=2) | 0.5 (3) | 0.0e+00 |" in out
    results = Path(out.rsplit("results: ", 1)[1].split()[0])
    doc = json.loads((results / "branch.json").read_text())
    assert (results / "branch.md").read_text() == branch.render(doc)
    (task,) = doc["tasks"]
    assert task["trunk_rank"] == 2 and [s["share"] for s in task["shares"]] == [0.25, 0.5]
    for s in task["shares"]:
        assert set(s["ranks"]) == {"1"} and len(s["ranks"]["1"]["branch"]) == 2
        assert s["tokens_per_trial"] == 1 + (1 - s["step"] / 6)  # trunk + one branch


def test_render_needs_only_the_json():
    share = {
        "share": 0.5, "step": 250, "trunk_check": 0.0,
        "ranks": {"8": {"branch": [3.60, 3.61], "fresh": [3.59, 3.60],
                        "minus_fresh": [0.01, 0.01], "fresh_sd6": 0.002}},
        "minus_fresh": {"mean": 0.01, "min": 0.01, "max": 0.01, "mean_abs": 0.01},
        "spread": {"branch_sd": 0.007, "fresh_sd": 0.007, "fresh_sd6": 0.002,
                   "branch_paired_sd": 0.001, "fresh_paired_sd": None},
        "tokens_per_trial": 3.5, "grid_tokens_per_trial": 6.0,
        "answers": {"branched, each seed": ["8", "8"], "fresh, each seed": ["8", "4?"],
                    "branched, seeds together": "8", "fresh, the same seeds": "8",
                    "fresh grid, 6 seeds": "8"},
    }  # fmt: skip
    doc = {"tasks": [{"task": "t", "k": 8, "seeds": [0, 1], "trunk_rank": 4, "shares": [share]}]}
    table = branch.render(json.loads(json.dumps(doc)))
    assert "| t (k=8) | 0.5 (250) | 0.0e+00 | r=8: +0.0100 +0.0100 |" in table
    assert "0.0070 / 0.0070 / 0.0020 | 0.0010 / - | 3.50 (6) | 8 8 / 8 4? / 8 / 8 / 8 |" in table
