"""The ladder's contract (rankwise.core's module docstring), checked with Hypothesis.

Fake worlds: a loss per rank and seed, ranks excluded by budgets known in advance, a
resource limit met at run time from some rank up (memory grows with the rank), ordinary
failures and a time budget that skips every trial after the n-th. Deterministic
(``derandomize=True``) and quick: no torch, a few seconds for the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.core.criteria import Criterion, recommend
from rankwise.core.strategies import Grid, Ladder, plan_ranks
from rankwise.records import COMPLETE, FAILED, SKIPPED, TrialResult

DOUBLINGS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
UNIT = 2.0**-16  # losses on a dyadic grid: sums and differences of them are exact floats
PROFILE = settings(derandomize=True, max_examples=200, deadline=None, database=None)

THRESHOLDS = {  # mostly the values people use, sometimes anything allowed
    "relative": st.sampled_from([0.005, 0.01, 0.02]) | st.floats(0.0, 0.99),
    "share": st.sampled_from([0.9, 0.95, 0.98, 0.99]) | st.floats(0.01, 1.0),
    "knee": st.sampled_from([0.02, 0.05, 0.1, 0.2]) | st.floats(0.001, 0.99),
}


@st.composite
def criteria(draw, kinds=tuple(THRESHOLDS)) -> Criterion:
    kind = draw(st.sampled_from(kinds))
    return Criterion(kind, draw(st.none() | THRESHOLDS[kind]))


@dataclass
class World:
    """What each trial would do: a loss per rank and seed, or a failure."""

    ranks: list[int]
    excluded: dict[int, str]
    start: int
    losses: dict[int, list[float]]
    base: float | None
    limit_from: int | None = None  # ranks >= this hit a resource limit at run time
    failing: set[int] = field(default_factory=set)  # ordinary failures (e.g. NaN)
    time_budget: int | None = None  # trials after this many are skipped

    def result(self, rank: int, seed: int, trained: int) -> TrialResult:
        key = f"r{rank}-s{seed}"
        if self.time_budget is not None and trained >= self.time_budget:
            return TrialResult(key, rank, seed, SKIPPED, "time budget: --max-time")
        if self.limit_from is not None and rank >= self.limit_from:
            return TrialResult(key, rank, seed, FAILED, "out of memory (peak 1 bytes)")
        if rank in self.failing:
            return TrialResult(key, rank, seed, FAILED, "unstable: non-finite loss")
        return TrialResult(key, rank, seed, COMPLETE, best_val_loss=self.losses[rank][seed])

    def completes(self, rank: int) -> bool:
        return rank not in self.failing and (self.limit_from is None or rank < self.limit_from)


def drive(strategy, world: World) -> list[tuple[object, TrialResult]]:
    """Ask/tell until done; returns (proposal, result) in order."""
    log: list[tuple[object, TrialResult]] = []
    while (p := strategy.ask()) is not None:
        trained = sum(r.status != SKIPPED for _, r in log)
        log.append((p, world.result(p.rank, p.seed, trained)))
        strategy.tell(log[-1][1])
    return log


def ladder_for(world: World, criterion: Criterion, seeds: int, patience: int):
    allowed, start, _ = plan_ranks(world.ranks, world.start, world.excluded)
    ladder = Ladder(allowed, start, criterion, patience, seeds, base_loss=world.base)
    return ladder, allowed


@st.composite
def rank_lists(draw):
    ranks = sorted(draw(st.lists(st.sampled_from(DOUBLINGS), min_size=1, unique=True)))
    excluded = draw(st.lists(st.sampled_from(ranks), unique=True))
    return ranks, {r: f"r={r} over a budget" for r in excluded}, draw(st.sampled_from(ranks))


@st.composite
def any_world(draw, seeds: int) -> World:
    """Any curve, noise, failures and budgets."""
    ranks, excluded, start = draw(rank_lists())
    loss = st.floats(0.5, 6.0)
    losses = {r: [draw(loss) for _ in range(seeds)] for r in ranks}
    return World(
        ranks,
        excluded,
        start,
        losses,
        base=draw(st.none() | st.floats(0.5, 6.5)),
        limit_from=draw(st.none() | st.sampled_from(ranks)),
        failing=set(draw(st.lists(st.sampled_from(ranks), unique=True))),
        time_budget=draw(st.none() | st.integers(0, 6)),
    )


@st.composite
def flattening_world(draw, seeds: int) -> World:
    """A curve that falls and then flattens: each doubling of r gains at most half of what
    the doubling before it gained; every seed scatters by the same ±e at every rank.
    Draws are weighted towards the cases where a ladder could go wrong: one seed, the
    base score known, few ranks removed, gains of the size the criteria resolve."""
    dropped = draw(st.lists(st.sampled_from(DOUBLINGS), max_size=3, unique=True))
    ranks = [r for r in DOUBLINGS if r not in dropped]
    excluded = draw(st.lists(st.sampled_from(ranks), max_size=2, unique=True))
    rnd = draw(st.randoms(use_true_random=True))  # uniform draws, seeded by Hypothesis
    base = rnd.randint(3 * 2**16, 6 * 2**16)  # 3 to 6 nats
    m = base - rnd.choice([0, rnd.randint(0, 2**16)])  # the loss at r=1
    gain = rnd.randint(0, 2**15)  # of the doubling 1 -> 2: up to 0.5 nats
    level = {}
    for r in DOUBLINGS:
        level[r] = m
        flat = rnd.random() < 0.1  # now and then the curve stops falling at once
        m, gain = m - gain, 0 if flat else rnd.randint(gain // 4, gain // 2)
    e = rnd.choice([0, 0, 2**6, 2**10])
    scatter = {1: [0], 2: [e, -e], 3: [e, 0, -e]}[seeds]
    return World(
        ranks,
        {r: f"r={r} over a budget" for r in excluded},
        draw(st.sampled_from(ranks)),
        {r: [(level[r] + d) * UNIT for d in scatter] for r in ranks},
        base=draw(st.sampled_from([base * UNIT] * 3 + [None])),
        limit_from=draw(st.sampled_from([None] * 6 + ranks)),
    )


@st.composite
def cases(draw, worlds, kinds=tuple(THRESHOLDS)):
    seeds = draw(st.sampled_from([1, 1, 2, 3]))
    patience = draw(st.sampled_from([1, 1, 2, 3]))
    return draw(worlds(seeds)), draw(criteria(kinds)), seeds, patience


@PROFILE
@given(cases(any_world))
def test_a_there_is_always_an_answer(case):
    world, criterion, seeds, patience = case
    ladder, allowed = ladder_for(world, criterion, seeds, patience)
    log = drive(ladder, world)
    rec = recommend(ladder.scores(), criterion, ladder.stop_reason, base_loss=world.base)
    if world.time_budget is None and any(world.completes(r) for r in allowed):
        assert any(r.ok for _, r in log), "a rank would complete, but the ladder never ran one"
    if any(r.ok for _, r in log):
        assert rec.rank is not None or (
            rec.lora_helps is False and rec.reason.startswith("LoRA does not help")
        )
    assert ladder.done and ladder.stop_reason


@PROFILE
@given(cases(any_world))
def test_c_the_ladder_never_asks_for_an_excluded_rank(case):
    world, criterion, seeds, patience = case
    ladder, allowed = ladder_for(world, criterion, seeds, patience)
    asked = [p for p, _ in drive(ladder, world)]
    assert all(p.rank in allowed and p.rank not in world.excluded for p in asked)
    assert len({(p.rank, p.seed) for p in asked}) == len(asked)  # each trial once


@PROFILE
@given(cases(any_world))
def test_the_ladder_is_replayable(case):
    world, criterion, seeds, patience = case
    log = drive(ladder_for(world, criterion, seeds, patience)[0], world)
    replay = ladder_for(world, criterion, seeds, patience)[0]
    for proposal, result in log:
        assert replay.ask() == proposal
        replay.tell(result)
    assert replay.ask() is None


@pytest.mark.parametrize("kind", sorted(THRESHOLDS))
@settings(PROFILE, max_examples=200)
@given(data=st.data())
def test_b_on_curves_that_flatten_the_ladder_recommends_what_the_grid_does(kind, data):
    world, criterion, seeds, patience = data.draw(cases(flattening_world, (kind,)))
    ladder, allowed = ladder_for(world, criterion, seeds, patience)
    drive(ladder, world)
    grid = Grid(allowed, seeds)
    drive(grid, world)
    got = recommend(ladder.scores(), criterion, base_loss=world.base)
    want = recommend(grid.scores(), criterion, base_loss=world.base)
    assert (got.rank, got.lora_helps) == (want.rank, want.lora_helps), ladder.stop_reason
