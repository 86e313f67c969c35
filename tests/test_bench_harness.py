"""bench/harness.py: results kept as JSON with their environment, tables rendered from them."""

from __future__ import annotations

import doctest

from bench import harness


def test_the_examples():
    assert doctest.testmod(harness).failed == 0


def test_results_round_trip_with_their_environment(tmp_path):
    rows = [{"rank": 1, "loss": 3.75}, {"rank": 2, "loss": 3.68}]
    path = harness.write_results("demo", rows, tmp_path, {"steps": 10})
    assert path == tmp_path / "demo.json"
    doc = harness.read_results("demo", tmp_path)
    assert doc["benchmark"] == "demo" and doc["results"] == rows and doc["settings"]["steps"] == 10
    env = doc["environment"]
    assert {"date", "torch", "transformers", "peft", "cpu", "cores"} <= set(env)
    assert env["torch"] and env["cpu"]
    table = harness.table(["rank", "loss"], ([r["rank"], r["loss"]] for r in doc["results"]))
    assert table.splitlines() == ["| rank | loss |", "|---|---|", "| 1 | 3.75 |", "| 2 | 3.68 |"]
