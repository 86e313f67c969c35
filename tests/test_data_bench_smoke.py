"""bench/data_prep.py --smoke: today's streaming preparation and the list-based one of
commit 9887486 pack the same 3,000 records into the same token blocks."""

from __future__ import annotations

from bench import data_prep

from .conftest import table_rows


def test_data_prep_smoke(bench_main):
    # .ci/run fetches the full history of a shallow clone: the old commit is there to compare.
    assert data_prep._git_has(data_prep.BEFORE), (
        f"commit {data_prep.BEFORE} is not in this checkout: git fetch --unshallow"
    )
    out = bench_main(data_prep)
    before, after = table_rows(out)[1:]  # the header, then one row per arm
    assert before[0] == f"before ({data_prep.BEFORE})" and after[0].startswith("after")
    assert before[1] == after[1] == "3,000"
    # The same tokens in the same blocks: the counts and the digest of the blocks agree.
    assert before[2] == after[2] and before[-1] == after[-1], out
