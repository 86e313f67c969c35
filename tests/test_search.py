"""The search core with fabricated results: no torch, milliseconds."""

from __future__ import annotations

import pytest

from rankwise.core.criteria import Criterion, recommend
from rankwise.core.scores import improvement_share, rank_scores
from rankwise.core.strategies import Grid, Ladder, plan_ranks
from rankwise.errors import ConfigError
from rankwise.records import TrialResult

RANKS = [1, 2, 4, 8, 16, 32, 64]
REL = Criterion("relative", 0.01)
# A guarantee (--max-regret) that never binds, for tests of the criterion and the noise alone
# (tests/test_regret.py tests the guarantee).
LOOSE = Criterion("relative", 0.01, max_regret=0.5)


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
    ladder = Ladder(ranks=RANKS, start_rank=4, criterion=REL)
    assert drive(ladder, curve(16)) == [4, 8, 16, 32]
    assert "plateau" in ladder.stop_reason
    assert recommend(ladder.scores(), REL).rank == 16


def test_patience_waits_for_consecutive_flat_steps():
    losses = {1: 3, 2: 3, 4: 2.0, 8: 1.999, 16: 1.5, 32: 1.499, 64: 1.498}
    assert drive(Ladder(ranks=RANKS, start_rank=4, criterion=REL, patience=1), losses) == [4, 8, 2]
    assert drive(Ladder(ranks=RANKS, start_rank=4, criterion=REL, patience=2), losses) == [
        4,
        8,
        16,
        32,
        64,
    ]


def test_tolerance_decides_what_counts_as_gain():
    losses = {r: 2.0 - 0.02 * i for i, r in enumerate(RANKS)}  # ~1% per step
    assert (
        len(
            drive(Ladder(ranks=RANKS, start_rank=4, criterion=Criterion("relative", 0.005)), losses)
        )
        == 5
    )
    loose = Ladder(ranks=RANKS, start_rank=4, criterion=Criterion("relative", 0.05))
    assert drive(loose, losses)[:2] == [4, 8]


def test_start_on_plateau_probes_down_to_smallest_good_rank():
    ladder = Ladder(ranks=RANKS, start_rank=8, criterion=REL)
    tried = drive(ladder, curve(2))
    assert tried == [8, 16, 4, 2, 1]
    assert "probed down to r=1, which is not within 1%" in ladder.stop_reason
    assert recommend(ladder.scores(), REL).rank == 2


def test_probe_down_stops_at_the_smallest_rank_in_list():
    ladder = Ladder(ranks=RANKS, start_rank=4, criterion=REL)
    assert drive(ladder, {r: 1.0 for r in RANKS}) == [4, 8, 2, 1]
    assert "smallest allowed rank r=1" in ladder.stop_reason


def test_out_of_memory_stops_climbing_and_says_so():
    ladder = Ladder(ranks=RANKS, start_rank=4, criterion=REL)
    tried = drive(ladder, curve(64), status={16: "out of memory (peak 1 bytes)"})
    assert tried == [4, 8, 16]
    assert "resource limit at r=16" in ladder.stop_reason
    assert recommend(ladder.scores(), REL).rank == 8


def test_budget_skip_ends_the_climb():
    ladder = Ladder(ranks=RANKS, start_rank=4, criterion=REL)
    tried = drive(ladder, curve(64), status={32: "r=32 > --max-rank 16"})
    assert tried == [4, 8, 16, 32]
    assert "--max-rank" in ladder.stop_reason


def test_ordinary_failure_keeps_climbing_from_last_good_rank():
    ladder = Ladder(ranks=RANKS, start_rank=4, criterion=REL)
    tried = []
    while (p := ladder.ask()) is not None:
        tried.append(p.rank)
        if p.rank == 8:
            ladder.tell(result(8, None, "failed", "RuntimeError: boom"))
        else:
            ladder.tell(result(p.rank, curve(16)[p.rank]))
    assert tried == [4, 8, 16, 32]


def test_climb_ends_at_largest_rank():
    ladder = Ladder(ranks=[4, 8, 16], start_rank=4, criterion=REL)
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
    rec = recommend(scores, REL, "plateau after r=64")
    assert rec.rank == 16 and rec.best_rank == 64
    assert rec.reason.startswith("r=16: val loss 2.3120, within 1% of the best (2.3010 at r=64)")
    assert "4x fewer trainable parameters" in rec.reason and "stopped: plateau" in rec.reason


def test_recommend_without_results():
    rec = recommend(rank_scores([result(4, None, "failed", "x")]), REL)
    assert rec.rank is None and "no trial completed" in rec.reason


def test_search_core_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, rankwise.core, rankwise.storage.store, rankwise.records, rankwise.config; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def seeded(losses_by_rank: dict[int, list[float]]):
    return [result(r, v, seed=i) for r, vs in losses_by_rank.items() for i, v in enumerate(vs)]


def test_gain_inside_the_noise_is_not_a_gain():
    # r=8 is 2% better on average, but the seeds scatter by ±5%: not a real gain.
    noisy = {4: [2.0, 2.2, 1.8], 8: [1.96, 2.16, 1.76]}
    ladder = Ladder(ranks=[4, 8, 16], start_rank=4, criterion=LOOSE, seeds=3)
    while (p := ladder.ask()) is not None:
        ladder.tell(result(p.rank, noisy.get(p.rank, [1.9] * 3)[p.seed], seed=p.seed))
    assert "or the noise" in ladder.stop_reason
    rec = recommend(ladder.scores(), LOOSE)
    assert rec.rank == 4 and rec.confidence.startswith("medium: r=4 is the smallest rank tried")
    assert rec.undecided  # the gain inside the noise is said to be open: not high
    # Under the default 1% guarantee r=4 is not *shown* within 1% of r=8 (the noise allows
    # 5% and more), so the answer is the rank that is: the best.
    assert recommend(ladder.scores(), REL).rank == recommend(ladder.scores(), REL).best_rank


def test_clear_gap_beyond_the_noise_is_a_gain():
    clear = {4: [2.0, 2.01, 1.99], 8: [1.80, 1.81, 1.79], 16: [1.799, 1.80, 1.801]}
    ladder = Ladder(ranks=[4, 8, 16], start_rank=4, criterion=REL, seeds=3)
    while (p := ladder.ask()) is not None:
        ladder.tell(result(p.rank, clear[p.rank][p.seed], seed=p.seed))
    rec = recommend(ladder.scores(), REL)
    assert rec.rank == 8 and rec.confidence.startswith("high: r=4 is worse by 0.2000")
    assert "±" in rec.reason


def test_confidence_low_when_the_decision_is_inside_the_noise():
    scores = rank_scores(seeded({2: [2.3, 2.5, 2.4], 4: [2.0, 2.4, 2.2], 8: [2.0, 2.01, 2.0]}))
    rec = recommend(scores, LOOSE)
    assert rec.rank == 4 and rec.confidence.startswith("low: r=2")
    assert rec.confidence.endswith("more seeds of r=2 and r=4 (3 each now) would settle it")


def test_single_seed_confidence_is_unmeasured():
    rec = recommend(rank_scores([result(4, 2.0), result(8, 1.5)]), REL)
    assert rec.confidence.startswith("unmeasured")


# -- the ladder's edges (issue 11) ----------------------------------------------------------


def test_climb_to_the_top_probes_down():
    # --ranks 1,2,4 --start-rank 4: the climb ends at once, and r=4 is the smallest tried
    ladder = Ladder([1, 2, 4], start_rank=4, criterion=REL)
    assert drive(ladder, {1: 1.0, 2: 1.0, 4: 1.0}) == [4, 2, 1]
    assert "largest allowed rank r=4" in ladder.stop_reason
    assert recommend(ladder.scores(), REL).rank == 1


def test_start_skipped_at_run_time_leads_to_smaller_ranks():
    # a budget found at run time (e.g. measured memory) skips r=4: r=2 and r=1 still run
    ladder = Ladder(RANKS, start_rank=4, criterion=REL)
    skips = {r: f"r={r} over budget" for r in (4, 8, 16, 32, 64)}
    assert drive(ladder, curve(2), status=skips) == [4, 2, 1]
    assert "resource limit at r=4" in ladder.stop_reason
    assert recommend(ladder.scores(), REL).rank == 2


def test_resource_limit_mid_climb_still_probes_down():
    ladder = Ladder(RANKS, start_rank=8, criterion=REL)
    tried = drive(ladder, curve(2), status={16: "out of memory (peak 1 bytes)"})
    assert tried == [8, 16, 4, 2, 1]
    assert recommend(ladder.scores(), REL).rank == 2


def test_failures_below_the_start_are_passed_over_until_a_rank_completes():
    ladder = Ladder([1, 2, 4], start_rank=4, criterion=REL)
    tried = drive(ladder, curve(2), status={4: "out of memory (x)", 2: "out of memory (y)"})
    assert tried == [4, 2, 1] and recommend(ladder.scores(), REL).rank == 1


def test_plan_ranks_excludes_and_clamps():
    allowed, start, notes = plan_ranks(
        RANKS, 16, {16: "r=16 > --max-rank 8"} | {r: f"r={r} > --max-rank 8" for r in (32, 64)}
    )
    assert allowed == [1, 2, 4, 8] and start == 8
    assert "r=16 > --max-rank 8; r=32 > --max-rank 8" in notes[0]
    assert "starting at r=8, the largest allowed rank below it" in notes[1]
    allowed, start, notes = plan_ranks([2, 4, 8], 1, {})
    assert (allowed, start) == ([2, 4, 8], 2) and "smallest allowed rank" in notes[0]
    assert plan_ranks([4, 8], 4, {}) == ([4, 8], 4, [])
    allowed, _, notes = plan_ranks([4, 8], 4, {4: "a", 8: "b"})
    assert allowed == [] and "no rank in --ranks fits the budgets" in notes[-1]


def test_max_rank_below_start_answers_from_the_allowed_ranks():
    # a model under 1B parameters (start 4) with --max-rank 2: r=1 and r=2 are tried
    allowed, start, _ = plan_ranks(RANKS, 4, {r: "> --max-rank 2" for r in RANKS if r > 2})
    ladder = Ladder(allowed, start, REL)
    assert drive(ladder, curve(64)) == [2, 1]
    assert recommend(ladder.scores(), REL).rank == 2


# -- criteria -------------------------------------------------------------------------------


def test_criterion_defaults_and_validation():
    assert Criterion("relative").threshold == 0.01
    assert Criterion("share", 1).threshold == 1.0
    with pytest.raises(ConfigError, match=r"^--criterion: expected one of relative, share, knee"):
        Criterion("elbow")
    for kind, bad in (("share", 0), ("share", 1.5), ("relative", 1), ("knee", -0.1)):
        with pytest.raises(ConfigError, match=rf"^--threshold: the {kind} criterion takes"):
            Criterion(kind, bad)


def test_share_tracks_the_improvement_not_the_loss():
    # base 6.25: r=1 of a q,v adapter gets 6.19, all-linear 6.14 (issue 11). Relative 1%
    # calls them equal; as a share of the improvement r=1 reaches 55%.
    scores = rank_scores([result(1, 6.1910), result(2, 6.1407)])
    assert recommend(scores, REL).rank == 1
    rec = recommend(scores, Criterion("share", 0.95), base_loss=6.25)
    assert rec.rank == 2 and rec.base_loss == 6.25 and rec.share == 1.0
    assert "r=1 reaches 53.9% of that improvement" in rec.reason


def test_reason_reads_as_a_share_of_the_improvement():
    losses = {8: 3.0 + 0.02, 16: 3.01, 32: 3.005, 64: 3.0}
    scores = rank_scores([result(r, v) for r, v in losses.items()])
    rec = recommend(scores, Criterion("share", 0.95), "plateau", base_loss=4.0)
    assert rec.rank == 8 and rec.share == pytest.approx(0.98)
    assert rec.reason.startswith(
        "r=8 reaches 98% of the improvement over the base model that the best rank (r=64) "
        "reached, with 8x fewer trainable parameters"
    )
    assert (
        "with 4x fewer"
        in recommend(
            scores, Criterion("share", 0.95), base_loss=4.0, params={8: 100, 64: 400}
        ).reason
    )


def test_lora_that_does_not_help_is_said_not_recommended():
    scores = rank_scores([result(1, 3.1205), result(2, 3.1201), result(4, 3.1203)])
    for criterion in (Criterion("share"), Criterion("knee"), REL):
        rec = recommend(scores, criterion, base_loss=3.1210)
        assert rec.rank is None and rec.lora_helps is False and rec.best_rank == 2
        assert rec.reason.startswith("LoRA does not help this data at this budget")


def test_share_and_knee_fall_back_to_relative_without_a_base_score():
    scores = rank_scores([result(4, 2.35), result(16, 2.312), result(64, 2.301)])
    for kind in ("share", "knee"):  # the knee measured against the base gap
        rec = recommend(scores, Criterion(kind, scale="base"), base_loss=None)
        assert rec.rank == 16 and rec.criterion == "relative 0.01"
        assert f"the {kind} criterion fell back to relative 1%" in rec.reason


def test_knee_is_the_top_of_the_last_steep_step():
    # base 4.4; gains per doubling 0.30, 0.20, 0.10, then 0.005: the knee is r=8
    losses = {1: 4.0, 2: 3.7, 4: 3.5, 8: 3.4, 16: 3.395, 32: 3.392, 64: 3.390}
    scores = rank_scores([result(r, v) for r, v in losses.items()])
    rec = recommend(scores, Criterion("knee", 0.05), base_loss=4.4)
    assert rec.rank == 8 and rec.reason.startswith("r=8 is at the knee of the curve")
    loose = Criterion("knee", 0.4, scale="base", max_regret=0.2)
    assert recommend(scores, loose, base_loss=4.4).rank == 2
    # r=2 is 9% worse than the best: the default 1% guarantee raises the answer to r=8
    assert recommend(scores, Criterion("knee", 0.4, scale="base"), base_loss=4.4).rank == 8
    ladder = Ladder(RANKS, 4, Criterion("knee", 0.05), base_loss=4.4)
    assert drive(ladder, losses) == [4, 8, 16]
    assert recommend(ladder.scores(), ladder.criterion, base_loss=4.4).rank == 8


def test_ladder_climbs_until_another_step_could_not_change_the_answer():
    # At r=8, r=4 reaches 98% of the improvement so far, but would not if r=16 gained as
    # much again: the ladder climbs on, and finds r=8 as the grid does.
    losses = {1: 3.3, 2: 3.2, 4: 3.0, 8: 2.98, 16: 2.975, 32: 2.974, 64: 2.974}
    share = Criterion("share", 0.98)
    ladder = Ladder(RANKS, 4, share, base_loss=4.0)
    assert drive(ladder, losses) == [4, 8, 16]
    grid = rank_scores([result(r, v) for r, v in losses.items()])
    assert recommend(ladder.scores(), share, base_loss=4.0).rank == 8
    assert recommend(grid, share, base_loss=4.0).rank == 8


def test_improvement_share():
    assert improvement_share(3.5, 4.0, 3.0) == 0.5
    assert improvement_share(3.5, None, 3.0) is None
    assert improvement_share(3.5, 3.0, 3.0) is None


def test_a_bare_number_is_the_relative_threshold():
    scores = rank_scores([result(4, 2.35), result(16, 2.312), result(64, 2.301)])
    assert recommend(scores, 0.01) == recommend(scores, REL)
    assert Ladder(RANKS, 4, tolerance=0.02).criterion == Criterion("relative", 0.02)


def test_search_config_names_the_flag_on_bad_criterion_input():
    from rankwise.config import SearchConfig

    assert SearchConfig().search_criterion() == Criterion("knee", 0.005, "loss") == Criterion()
    assert SearchConfig(criterion="knee", threshold=0.05).search_criterion().threshold == 0.05
    cases = [
        ({"criterion": "elbow"}, "--criterion: expected one of relative, share, knee"),
        ({"threshold": 1.5}, "--threshold: the knee criterion takes a share per doubling"),
        ({"criterion": "share", "threshold": 0}, "--threshold: the share criterion takes"),
        ({"criterion": "relative", "threshold": -0.1}, "--threshold: the relative criterion"),
        ({"max_rank": 2, "ranks": [4, 8]}, "--max-rank: 2 is below the smallest rank in --ranks"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match="^" + message):
            SearchConfig(**options)
