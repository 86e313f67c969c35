"""bench/archive/data_prep.py --smoke: today's streaming preparation packs the same 3,000
records into the same token blocks as the list-based one of commit 9887486 did, whose output
is committed (bench/archive/data_prep.reference.json): no git history needed."""

from __future__ import annotations

from bench import harness
from bench.archive import data_prep


def test_data_prep_smoke(bench_main, tmp_path):
    out = bench_main(data_prep, "--results", str(tmp_path))
    before, after = harness.read_results("data_prep", tmp_path)["results"]
    assert before["implementation"] == f"before ({data_prep.BEFORE}, committed reference)"
    assert after["implementation"].startswith("after")
    assert before["records"] == after["records"] == data_prep.SMOKE_RECORDS
    # The same tokens in the same blocks: the counts and the digest of the blocks agree.
    for key in ("tokens", "blocks", "digest"):
        assert before[key] == after[key], key
    assert harness.table(data_prep.HEADER, [data_prep.cells(before), data_prep.cells(after)]) in out
