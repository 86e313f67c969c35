"""bench/forgetting.py --smoke: a tiny model's grid with forgetting measured per rank, each
adapter measured again on held-back text, and the cached KL checked against the exact one."""

from __future__ import annotations

from bench import forgetting

from .conftest import table_rows


def test_forgetting_smoke(bench_main, tmp_path):
    out = bench_main(forgetting, "--out", str(tmp_path))
    per_rank, totals = out.split("| task | r |")[1].split("\n\n")
    rows = table_rows(per_rank, "smollm2-docstrings")
    assert [r[1].split()[0] for r in rows] == ["1", "4", "16"]
    for cells in rows:
        forgot, cached_kl, exact_kl, held = cells[3:7]
        # The tiny vocabulary (128) is inside the top-256 the base keeps: the cached KL is
        # the exact KL, not only a lower bound of it.
        assert abs(float(cached_kl) - float(exact_kl)) < 1e-4
        assert forgot != "-" and held != "-"
    (summary,) = table_rows(totals, "smollm2-docstrings")
    share = float(summary[3].split("%")[0])
    assert 0 < share < 100  # the retain evaluation's share of the search's wall time
    # The recommended rank's forgetting is quoted as the table has it.
    rec = next(r for r in rows if "(rec.)" in r[1])
    assert summary[5].startswith(f"r={rec[1].split()[0]} ({rec[3]})")
