"""The search core with fabricated results: no torch, milliseconds."""

from __future__ import annotations

import pytest

from rankwise.records import TrialResult
from rankwise.search import Grid, Ladder, rank_scores, recommend

RANKS = [1, 2, 4, 8, 16, 32, 64]


def result(rank, loss=None, status="complete", reason="", seed=0):
    return TrialResult(
        key=f"r{rank}-s{seed}",
        rank=rank,
        seed=seed,
        status=status,
        reason=reason,
        best_val_loss=loss,
    )


def drive(strategy, losses, status=None):
    """Run a strategy against a loss table; returns the ranks in the order tried."""
    tried = []
    while (p := strategy.ask()) is not None:
        tried.append(p.rank)
        st = (status or {}).get(p.rank)
        if st:
            strategy.tell(result(p.rank, None, "failed" if "memory" in st else "skipped", st))
        else:
            strategy.tell(result(p.rank, losses[p.rank], seed=p.seed))
    return tried


def curve(knee: int) -> dict[int, float]:
    """Loss falls 10% per doubling up to the knee, then flat."""
    return {r: 3.0 * 0.9 ** (min(r, knee).bit_length()) for r in RANKS}


def test_ladder_climbs_to_plateau_and_recommends_knee():
    ladder = Ladder(ranks=RANKS, start_rank=4, tolerance=0.01)
    assert drive(ladder, curve(16)) == [4, 8, 16, 32]
    assert "plateau" in ladder.stop_reason
    assert recommend(ladder.scores(), 0.01).rank == 16


def test_patience_waits_for_consecutive_flat_steps():
    losses = {1: 3, 2: 3, 4: 2.0, 8: 1.999, 16: 1.5, 32: 1.499, 64: 1.498}
    assert drive(Ladder(ranks=RANKS, start_rank=4, tolerance=0.01, patience=1), losses) == [4, 8, 2]
    assert drive(Ladder(ranks=RANKS, start_rank=4, tolerance=0.01, patience=2), losses) == [
        4,
        8,
        16,
        32,
        64,
    ]


def test_tolerance_decides_what_counts_as_gain():
    losses = {r: 2.0 - 0.02 * i for i, r in enumerate(RANKS)}  # ~1% per step
    assert len(drive(Ladder(ranks=RANKS, start_rank=4, tolerance=0.005), losses)) == 5
    loose = Ladder(ranks=RANKS, start_rank=4, tolerance=0.05)
    assert drive(loose, losses)[:2] == [4, 8]


def test_start_on_plateau_probes_down_to_smallest_good_rank():
    ladder = Ladder(ranks=RANKS, start_rank=8, tolerance=0.01)
    tried = drive(ladder, curve(2))
    assert tried == [8, 16, 4, 2, 1]
    assert "outside the 1% tolerance" in ladder.stop_reason
    assert recommend(ladder.scores(), 0.01).rank == 2


def test_probe_down_stops_at_the_smallest_rank_in_list():
    ladder = Ladder(ranks=RANKS, start_rank=4, tolerance=0.01)
    assert drive(ladder, {r: 1.0 for r in RANKS}) == [4, 8, 2, 1]
    assert "smallest rank r=1" in ladder.stop_reason


def test_out_of_memory_stops_climbing_and_says_so():
    ladder = Ladder(ranks=RANKS, start_rank=4, tolerance=0.01)
    tried = drive(ladder, curve(64), status={16: "out of memory (peak 1 bytes)"})
    assert tried == [4, 8, 16]
    assert "resource limit at r=16" in ladder.stop_reason
    assert recommend(ladder.scores(), 0.01).rank == 8


def test_budget_skip_ends_the_climb():
    ladder = Ladder(ranks=RANKS, start_rank=4, tolerance=0.01)
    tried = drive(ladder, curve(64), status={32: "r=32 > --max-rank 16"})
    assert tried == [4, 8, 16, 32]
    assert "--max-rank" in ladder.stop_reason


def test_ordinary_failure_keeps_climbing_from_last_good_rank():
    ladder = Ladder(ranks=RANKS, start_rank=4, tolerance=0.01)
    tried = []
    while (p := ladder.ask()) is not None:
        tried.append(p.rank)
        if p.rank == 8:
            ladder.tell(result(8, None, "failed", "RuntimeError: boom"))
        else:
            ladder.tell(result(p.rank, curve(16)[p.rank]))
    assert tried == [4, 8, 16, 32]


def test_climb_ends_at_largest_rank():
    ladder = Ladder(ranks=[4, 8, 16], start_rank=4, tolerance=0.01)
    assert drive(ladder, curve(64)) == [4, 8, 16]
    assert "largest allowed rank r=16" in ladder.stop_reason


def test_grid_runs_every_rank_and_every_seed():
    grid = Grid(ranks=[1, 4, 16], seeds=2)
    seen = []
    while (p := grid.ask()) is not None:
        seen.append((p.rank, p.seed))
        grid.tell(result(p.rank, 1.0 / p.rank + 0.01 * p.seed, seed=p.seed))
    assert seen == [(1, 0), (1, 1), (4, 0), (4, 1), (16, 0), (16, 1)]
    assert grid.stop_reason == "grid complete"


def test_rank_scores_pool_seeds_with_standard_error():
    scores = rank_scores([result(4, 2.0, seed=0), result(4, 2.2, seed=1), result(8, 1.0)])
    s4 = scores[0]
    assert s4.n == 2 and s4.mean == pytest.approx(2.1) and s4.se == pytest.approx(0.1)
    assert scores[1].se == 0.0


def test_recommend_smallest_within_tolerance_and_reason():
    scores = rank_scores([result(4, 2.35), result(16, 2.312), result(32, 2.305), result(64, 2.301)])
    rec = recommend(scores, 0.01, "plateau after r=64")
    assert rec.rank == 16 and rec.best_rank == 64
    assert rec.reason.startswith("r=16: val loss 2.3120 (best 2.3010 at r=64, within 1%)")
    assert "4.0x fewer trainable params" in rec.reason and "stopped: plateau" in rec.reason


def test_recommend_without_results():
    rec = recommend(rank_scores([result(4, None, "failed", "x")]), 0.01)
    assert rec.rank is None and "no trial completed" in rec.reason


def test_search_core_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, rankwise.search, rankwise.store, rankwise.records, rankwise.config; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def seeded(losses_by_rank: dict[int, list[float]]):
    return [result(r, v, seed=i) for r, vs in losses_by_rank.items() for i, v in enumerate(vs)]


def test_gain_inside_the_noise_is_not_a_gain():
    # r=8 is 2% better on average, but the seeds scatter by ±5%: not a real gain.
    noisy = {4: [2.0, 2.2, 1.8], 8: [1.96, 2.16, 1.76]}
    ladder = Ladder(ranks=[4, 8, 16], start_rank=4, tolerance=0.01, seeds=3)
    while (p := ladder.ask()) is not None:
        ladder.tell(result(p.rank, noisy.get(p.rank, [1.9] * 3)[p.seed], seed=p.seed))
    assert "within the noise" in ladder.stop_reason
    rec = recommend(ladder.scores(), 0.01)
    assert rec.rank == 4 and rec.confidence.startswith("high for the upper side")


def test_clear_gap_beyond_the_noise_is_a_gain():
    clear = {4: [2.0, 2.01, 1.99], 8: [1.80, 1.81, 1.79], 16: [1.799, 1.80, 1.801]}
    ladder = Ladder(ranks=[4, 8, 16], start_rank=4, tolerance=0.01, seeds=3)
    while (p := ladder.ask()) is not None:
        ladder.tell(result(p.rank, clear[p.rank][p.seed], seed=p.seed))
    rec = recommend(ladder.scores(), 0.01)
    assert rec.rank == 8 and rec.confidence.startswith("high: r=4 is worse by 0.2000")
    assert "±" in rec.reason


def test_confidence_low_when_the_decision_is_inside_the_noise():
    scores = rank_scores(seeded({2: [2.3, 2.5], 4: [2.0, 2.4], 8: [2.0, 2.01]}))
    rec = recommend(scores, 0.01)
    assert rec.rank == 4 and rec.confidence.startswith("low: r=2")


def test_single_seed_confidence_is_unmeasured():
    rec = recommend(rank_scores([result(4, 2.0), result(8, 1.5)]), 0.01)
    assert rec.confidence.startswith("unmeasured")
