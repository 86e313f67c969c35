"""bench/alpha_policies.py --smoke: fixed and ratio alpha on planted-k2, each with its own
learning-rate calibration."""

from __future__ import annotations

from bench import alpha_policies

from .conftest import table_rows


def test_alpha_policies_smoke(bench_main, tmp_path):
    from rankwise.storage.store import RunStore

    out = bench_main(alpha_policies, "--out", str(tmp_path))
    assert "| task | k | policy | calibrated lr |" in out
    rows = {r[2]: r for r in table_rows(out, "planted-k2")}
    assert set(rows) == {"fixed", "ratio"}

    def results(policy):
        store = RunStore(tmp_path / f"planted-k2-{policy}", readonly=True)
        try:
            return {r.key: r for r in store.results()}
        finally:
            store.close()

    fixed, ratio = results("fixed"), results("ratio")
    # The policies set lora_alpha per rank: fixed 8 everywhere, ratio 2r (alpha_ratio 2).
    for rank in (1, 2, 4):
        assert fixed[f"r{rank}-s0"].lora_alpha == 8.0
        assert ratio[f"r{rank}-s0"].lora_alpha == 2.0 * rank
    # At r=4 the two agree (2·4 = 8): the calibration there and the r=4 trial are the same
    # trials, so they score the same and calibrate the same rate.
    cal = [k for k in fixed if fixed[k].kind == "calibration"]
    assert cal and all(fixed[k].best_val_loss == ratio[k].best_val_loss for k in cal)
    assert fixed["r4-s0"].best_val_loss == ratio["r4-s0"].best_val_loss
    assert rows["fixed"][3] == rows["ratio"][3]
    # The calibrated rate is the candidate with the lowest loss.
    best = min(cal, key=lambda k: fixed[k].best_val_loss)
    assert best.startswith(f"lr-{rows['fixed'][3]}/")
    # A stricter tolerance never recommends a smaller rank.
    for cells in rows.values():
        at_1, at_05, at_025 = map(int, cells[5:8])
        assert at_1 <= at_05 <= at_025
