"""bench/eta.py --smoke: a tiny real search, its time-left estimates replayed against the
time it then took, written as JSON (bench/harness.py)."""

from __future__ import annotations

from bench import eta, harness


def test_eta_smoke(bench_main, tmp_path):
    out = bench_main(eta, "--results", str(tmp_path))
    doc = harness.read_results("eta", tmp_path)
    assert doc["benchmark"] == "eta" and doc["environment"]["torch"]
    [row] = doc["results"]
    # After every trial but the last the search still ran, and an estimate was made (the
    # ladder's bound on r=1,2,4 with racing is never used up by its few trials).
    [trials] = row["trials"]
    assert row["estimates"] == trials - 1 == len(row["per_trial"][0])
    for e in row["per_trial"][0]:
        assert e["estimate"] > 0 and e["actual"] > 0
    ratios = [e["estimate"] / e["actual"] for e in row["per_trial"][0]]
    assert row["held"] == sum(r >= 1 for r in ratios) and row["min_ratio"] == min(ratios)
    # The table is rendered from those rows.
    assert eta.table(doc["results"]) in out
