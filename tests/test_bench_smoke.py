"""The benchmarks' --smoke modes still run end to end, and what they compute still holds.

Each runs the benchmark's ``main()`` in this process (the ``bench_main`` fixture) and checks
a number the benchmark derives that could come out wrong: the rank it finds on a planted
task, a token count that must equal a trial count, two arms that must train alike.
"""

from __future__ import annotations

import json

import pytest

from bench import criteria, harness, rank_curves, search_efficiency, throughput


def test_search_efficiency_ladder_and_grid_agree_on_planted_k2(bench_main, tmp_path):
    out = bench_main(search_efficiency, "--out", str(tmp_path))
    assert "| task | k | ranks | ladder trials (ranks) |" in out
    row = json.loads((tmp_path / "results" / "planted-k2.json").read_text())
    ladder, grid = row["ladder"], row["grid"]
    # The ladder's recommendation is the grid's (on this curve), so it costs no loss.
    assert ladder["rank"] == grid["rank"] and row["same_rank"]
    assert row["regret"] == pytest.approx(0, abs=1e-12)
    # Every trial trains the same tokens (steps × batch × seq_len): the token ratios are
    # trial counts.
    assert row["tokens_ratio"] == pytest.approx(ladder["trials"] / grid["trials"])
    assert row["ladder_vs_one_trial_tokens"] == pytest.approx(ladder["trials"])
    # The planted update has rank 2: the grid's curve is lowest there, and at tolerance
    # 0.5% both the ladder and the grid recommend it.
    curve = {int(r): v for r, v in row["grid_curve"].items()}
    assert min(curve, key=curve.get) == 2, curve
    assert search_efficiency.ranks_at(curve, row["start_rank"], 0.005) == (2, 2)


def test_throughput_arms_train_alike(bench_main, tmp_path):
    bench_main(throughput, "--out", str(tmp_path))
    [row] = json.loads((tmp_path / "throughput.json").read_text())
    s = row["settings"]
    assert (s["steps"], s["batch"], s["seq_len"]) == (5, 4, 64)  # the smoke settings
    # Same adapter init, blocks, order and schedule: the two arms' mean train losses agree
    # within 0.2% (measured: 4.8341 / 4.8384 here, 4.6048 / 4.6065 over 100 steps).
    ours = row["median"]["rankwise"]["mean_train_loss"]
    trainer = row["median"]["baseline"]["mean_train_loss"]
    assert ours == pytest.approx(trainer, rel=2e-3)


def test_criteria_replay_on_made_up_curves(bench_main, tmp_path):
    out = bench_main(criteria, "--results", str(tmp_path))
    rows = harness.read_results("criteria", tmp_path)["results"]
    ranks = {(r["criterion"], r["how"]): r["ranks"] for r in rows}
    assert len(ranks) == 2 * len(criteria.CANDIDATES)
    # The curves fall to k and are flat after it: the ladder, climbing from r=4, reaches the
    # grid's answer under every criterion ...
    for c in criteria.CANDIDATES:
        name = f"{c.kind} {c.threshold:g}"
        assert ranks[name, "ladder"] == ranks[name, "grid"], name
    # ... and the strictest relative rule and the 1% knee recommend exactly k (2 and 8).
    for name in ("relative 0.005", "knee 0.01"):
        assert ranks[name, "grid"] == [2, 8], name
    assert "grid: meets the target" in out and "relative 0.005, " in out


def test_rank_curves_fall_below_the_base_model(bench_main, tmp_path):
    out = bench_main(rank_curves, "--out", str(tmp_path))
    assert out.startswith("planted-k2: base ")
    body = json.loads((tmp_path / "planted-k2.json").read_text())
    curve, base = body["curve"], body["base_loss"]
    assert set(curve) == {"1", "2"} and max(curve.values()) < base - 0.1
    assert curve["2"] < curve["1"]  # the planted update has rank 2
    # Trainable parameters grow exactly linearly in r; every rank trains the same tokens.
    params = body["trainable_params"]
    assert params["2"] == 2 * params["1"]
    assert body["train_tokens"]["1"] == body["train_tokens"]["2"]
