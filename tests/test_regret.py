"""The guarantee (``--max-regret``) and the df-aware tests behind it, torch-free.

The decision protected: the rank a user takes home never loses more than the stated share of
the val loss to the best rank the search trained, *shown* beyond the noise, whatever the
criterion's yardstick says; and a noise measured on one degree of freedom is never read as a
known one."""

from __future__ import annotations

import random

import pytest

from rankwise.core.criteria import Criterion, recommend
from rankwise.core.scores import critical, half_width, rank_scores
from rankwise.core.stats import t_critical
from rankwise.core.strategies import Grid, Ladder
from rankwise.errors import ConfigError
from rankwise.records import TrialResult

KNEE_BASE = Criterion("knee", 0.01, scale="base")


def trial(rank, seed, loss, blocks=None):
    return TrialResult(
        key=f"r{rank}-s{seed}",
        rank=rank,
        seed=seed,
        status="complete",
        best_val_loss=loss,
        val_blocks=blocks,
    )


def table(losses: dict[tuple[int, int], float]):
    return rank_scores([trial(r, s, v) for (r, s), v in losses.items()])


def drive(strategy, loss):
    while (p := strategy.ask()) is not None:
        strategy.tell(trial(p.rank, p.seed, loss(p.rank, p.seed)))
    return strategy


# Task A of the issue, in numbers: a far-off base (9.6 nats, the best adapter ~3.5), so 1% of
# the base gap per doubling is 0.061 nats, the bar. Two seeds per rank (seed 1 draws a worse data
# order); r=8 beats r=4 on both seeds, by 0.0705 and 0.0508 (1.7% of the loss).
_A = {1: 3.80, 2: 3.66, 4: 3.5705, 8: 3.5000, 16: 3.4950, 32: 3.4940}
_JITTER = {1: 0.004, 2: -0.003, 4: -0.0197, 8: 0.0, 16: 0.002, 32: -0.001}
TASK_A = {(r, 0): v for r, v in _A.items()} | {(r, 1): v + 0.03 + _JITTER[r] for r, v in _A.items()}


def test_the_base_gap_knee_alone_gives_up_two_percent_on_a_far_off_base():
    loose = Criterion("knee", 0.01, scale="base", max_regret=0.5)
    assert recommend(table(TASK_A), loose, base_loss=9.6).rank == 4


def test_the_guarantee_raises_the_answer_to_a_rank_shown_within_it():
    rec = recommend(table(TASK_A), KNEE_BASE, base_loss=9.6)
    assert rec.criterion_rank == 4 and rec.rank == 8
    assert rec.regret_bound <= rec.max_regret == 0.01
    assert "is not shown within 1% of the best" in rec.reason


def test_undecided_goes_to_the_smaller_rank_only_when_it_is_shown_within():
    """r=2 is 0.5% worse than r=4 on average. With seeds that scatter the paired gap, the
    guarantee cannot show r=2 within 1%: the answer is r=4. With seeds that agree, it can."""
    criterion = Criterion("relative", 0.01)
    scatter = {(2, s): 3.015 + 0.02 * (s == 1) for s in (0, 1)} | {(4, 0): 3.0, (4, 1): 3.0}
    agree = {(2, s): 3.015 + 0.0004 * (s == 1) for s in (0, 1)} | {(4, 0): 3.0, (4, 1): 3.0}
    assert recommend(table(scatter), criterion).rank == 4
    assert recommend(table(agree), criterion).rank == 2


def test_every_answer_is_within_its_guarantee_on_random_curves():
    """Whatever the criterion picks, the answer's loss plus its half-width is within the
    guarantee of the best rank's (the best rank itself always is)."""
    rng = random.Random(0)
    for case in range(300):
        ranks = [1, 2, 4, 8, 16, 32]
        base = rng.uniform(3.5, 9.0)
        best = rng.uniform(2.5, 3.4)
        k = rng.choice(ranks)
        seeds = rng.choice([1, 2, 3])
        losses = {
            (r, s): best + 0.3 * max(0.0, 1 - r / k) + rng.gauss(0, 0.01) + 0.02 * s
            for r in ranks
            for s in range(seeds if r in (4, 8) else 1)
        }
        g = rng.choice([0.002, 0.01, 0.05])
        criterion = Criterion(rng.choice(["knee", "share", "relative"]), max_regret=g)
        rec = recommend(table(losses), criterion, base_loss=base)
        if rec.rank is None:
            continue
        scores = {s.rank: s for s in table(losses)}
        pick, top = scores[rec.rank], scores[rec.best_rank]
        gap = pick.mean - top.mean + half_width(pick, top)
        assert gap <= g * abs(top.mean) + 1e-12, (case, rec.rank, rec.best_rank)


def test_the_ladder_climbs_until_the_step_above_the_answer_is_shown_to_gain_less():
    """A curve that still falls 1.5% per doubling at r=8 (the knee at 1% of a 5-nat base gap
    calls that flat): the ladder goes on until a step gains less than the guarantee."""
    curve = {1: 3.60, 2: 3.45, 4: 3.40, 8: 3.35, 16: 3.345, 32: 3.344, 64: 3.3435}
    base = 8.5
    loose = Ladder(
        [1, 2, 4, 8, 16, 32, 64],
        start_rank=4,
        criterion=Criterion("knee", 0.01, scale="base", max_regret=0.5),
        base_loss=base,
    )
    drive(loose, lambda r, s: curve[r])
    strict = Ladder([1, 2, 4, 8, 16, 32, 64], start_rank=4, criterion=KNEE_BASE, base_loss=base)
    drive(strict, lambda r, s: curve[r])
    loose_answer = recommend(loose.scores(), loose.criterion, base_loss=base).rank
    strict_answer = recommend(strict.scores(), KNEE_BASE, base_loss=base).rank
    assert loose_answer < 8 <= strict_answer
    assert max(s.rank for s in strict.scores()) > strict_answer  # the step above was trained


def test_the_grid_and_the_ladder_agree_under_the_guarantee():
    curve = {1: 3.60, 2: 3.45, 4: 3.40, 8: 3.35, 16: 3.345, 32: 3.344}
    grid = drive(
        Grid([1, 2, 4, 8, 16, 32], criterion=KNEE_BASE, base_loss=9.6), lambda r, s: curve[r]
    )
    ladder = drive(
        Ladder([1, 2, 4, 8, 16, 32], start_rank=4, criterion=KNEE_BASE, base_loss=9.6),
        lambda r, s: curve[r],
    )
    assert (
        recommend(grid.scores(), KNEE_BASE, base_loss=9.6).rank
        == recommend(ladder.scores(), KNEE_BASE, base_loss=9.6).rank
    )


# -- df-aware statistics --------------------------------------------------------------------
def test_t_critical_values_for_few_degrees_of_freedom():
    assert [round(t_critical(d), 1) for d in (1, 2, 3)] == [12.7, 4.3, 3.2]
    assert abs(t_critical(10**6) - 1.96) < 1e-3


def test_one_degree_of_freedom_is_one_t_of_twelve_point_seven():
    """The start rank with two seeds, the others with one: the only noise is the spread of one
    rank (1 df), so a difference needs 12.7 of its standard errors, not 2."""
    scores = table({(2, 0): 3.005, (4, 0): 3.000, (4, 1): 3.001})
    two, four = scores
    assert round(critical(two, four), 1) == 12.7


def test_one_degree_of_freedom_never_reads_high():
    """Issue's seeds 3 and 5: r=2 is worse than r=4 by 0.0049, beyond 2 SE of a sigma from the
    spread of r=4's two seeds. That is one degree of freedom: medium at most, and the line
    says what would settle it."""
    scores = table({(1, 0): 3.30, (2, 0): 3.2069, (4, 0): 3.2012, (4, 1): 3.2028, (8, 0): 3.2010})
    rec = recommend(scores, Criterion("relative", 0.001, max_regret=0.5))
    assert not rec.confidence.startswith("high")
    assert "would settle" in rec.confidence


def test_paired_seeds_that_agree_count_as_paired():
    """Task A: the two seeds' differences (0.0705, 0.0508) give a paired SE of 0.0099 —
    half the 0.0215 of the unpaired spread that was quoted."""
    scores = {s.rank: s for s in table(TASK_A)}
    _, df, source = scores[4].noise.test(4, 8)
    se = scores[4].noise.se(4, 8)
    assert source in ("paired", "pair") and df >= 1
    d = [TASK_A[(4, i)] - TASK_A[(8, i)] for i in (0, 1)]
    assert [round(x, 4) for x in d] == [0.0705, 0.0508]
    assert se < 0.0215 / 2


def test_two_well_measured_sides_read_high():
    seeds = range(4)
    losses = {(r, s): {2: 3.10, 4: 3.00, 8: 2.999}[r] + 0.01 * s for r in (2, 4, 8) for s in seeds}
    rec = recommend(table(losses), Criterion("relative", 0.01))
    assert rec.rank == 4 and rec.confidence.startswith("high: r=2 is worse by 0.1000")


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, True])
def test_a_guarantee_outside_zero_one_is_refused_naming_the_flag(bad):
    with pytest.raises(ConfigError, match=r"^--max-regret: expected a share of the val loss"):
        Criterion("knee", max_regret=bad)


def test_a_best_smallest_rank_on_one_degree_of_freedom_is_not_high():
    """The demo's shape: r=4 with two seeds (1 df of seed noise), every other rank one; r=1
    has the best loss. However many validation blocks stand beside it, the seed noise rests
    on one degree of freedom: medium, and the line names the seed that would settle it."""
    blocks = {r: [v + 0.01 * ((i % 5) - 2) for i in range(64)] for r, v in
              {1: 3.4222, 2: 3.4411, 4: 3.4309, 8: 3.4290}.items()}  # fmt: skip
    trials = [trial(r, 0, sum(b) / len(b), b) for r, b in blocks.items()]
    b41 = [x - 0.0024 for x in blocks[4]]
    trials.append(trial(4, 1, sum(b41) / len(b41), b41))
    rec = recommend(rank_scores(trials), Criterion())
    assert rec.rank == 1 and rec.confidence.startswith("medium: r=1 is the best")
    assert "would settle" in rec.confidence
