"""The search strategies: ask/tell state machines over plain records. No torch.

A strategy proposes ``(rank, seed)`` pairs with :meth:`ask` and learns from
:class:`~rankwise.records.TrialResult` records with :meth:`tell`. It is a pure
state machine: replaying the same results gives the same proposals, which is how a
run resumes. A :class:`~rankwise.core.criteria.Criterion` says when a rank is as good as
the best one.

Example (the base model scores 4.0 on the validation blocks):
    >>> from rankwise.records import TrialResult
    >>> from rankwise.core.criteria import recommend
    >>> share = Criterion("share", 0.95)
    >>> ladder = Ladder([1, 2, 4, 8, 16], start_rank=4, criterion=share, base_loss=4.0)
    >>> losses = {1: 3.0, 2: 2.6, 4: 2.5, 8: 2.499, 16: 2.498}
    >>> while (p := ladder.ask()) is not None:
    ...     ladder.tell(TrialResult(key="", rank=p.rank, seed=p.seed, status="complete",
    ...                             best_val_loss=losses[p.rank]))
    >>> [s.rank for s in ladder.scores()], recommend(ladder.scores(), share, base_loss=4.0).rank
    ([2, 4, 8], 4)

The ladder's contract (checked by ``tests/test_search_properties.py`` with Hypothesis):

1. Before the first trial, :func:`plan_ranks` removes the ranks that budgets known in
   advance exclude (``--max-rank``, ``--max-trainable-params``, ``--max-adapter-size``,
   ``--max-memory`` by prediction), clamps the start rank to the largest allowed rank at or
   below it (the smallest allowed rank if none is below), and says so. The ladder never
   asks for an excluded rank.
2. The climb goes up the allowed ranks from the start. It stops at the largest allowed
   rank, at a resource limit met at run time (a skipped trial, out of memory), or when
   ``patience`` consecutive steps are *settled*: the recommendation would not change even
   if the ranks above the largest one tried gained, all together, as much again as the
   last step did. That bound holds when the curve falls and then flattens, each doubling
   of r gaining at most half of what the doubling before it gained. An ordinary failure
   is passed over.
3. Whenever the climb ends with no completed rank, or with the smallest completed rank as
   the recommendation, and smaller allowed ranks exist, the ladder probes down, one rank
   at a time, until a completed rank is not as good as the best (for ``knee``: the step
   above it is steep), a resource limit stops it after some rank completed, or the smallest
   rank is reached. If the probe leaves the answer unsettled, the climb resumes.
4. Hence (a) whenever an allowed rank would complete, the ladder trains one (unless a time
   budget runs out first): a start rank skipped at run time leads to smaller ranks; and
   once a rank completed there is a recommendation, or the explicit verdict that LoRA does
   not help; and (b) on curves that fall and then flatten as in 2 (with the same
   seed-to-seed scatter at every rank), the ladder recommends what the grid over the
   allowed ranks recommends, under every criterion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rankwise.core.criteria import Criterion, _criterion
from rankwise.core.scores import RankScore, noise, rank_scores
from rankwise.records import SKIPPED, TrialResult


@dataclass(frozen=True)
class Proposal:
    rank: int
    seed: int = 0
    truncations: tuple[int, ...] = ()
    """A nested-rank run at ``rank``: one training whose truncations to these ranks are
    each a point of the curve (:class:`Nested`); empty for an ordinary trial."""


def plan_ranks(
    ranks: list[int], start_rank: int, excluded: Mapping[int, str]
) -> tuple[list[int], int, list[str]]:
    """Remove the ranks budgets known in advance exclude; clamp the start rank.

    ``excluded`` maps a rank to why it is excluded. Returns (allowed ranks, start, notes).

    >>> allowed, start, notes = plan_ranks([1, 2, 4, 8], 4, {8: "r=8 > --max-rank 2",
    ...                                                     4: "r=4 > --max-rank 2"})
    >>> allowed, start
    ([1, 2], 2)
    >>> print("\\n".join(notes))
    excluded before training: r=4 > --max-rank 2; r=8 > --max-rank 2
    start rank r=4 is excluded: starting at r=2, the largest allowed rank below it
    """
    allowed = [r for r in sorted(set(ranks)) if r not in excluded]
    gone = [excluded[r] for r in sorted(set(ranks)) if r in excluded]
    notes = [f"excluded before training: {'; '.join(gone)}"] if gone else []
    if not allowed:
        return [], start_rank, [*notes, "no rank in --ranks fits the budgets"]
    if start_rank in allowed:
        return allowed, start_rank, notes
    below = [r for r in allowed if r <= start_rank]
    start = max(below) if below else allowed[0]
    where = "the largest allowed rank below it" if below else "the smallest allowed rank"
    why = "is excluded" if start_rank in excluded else "is not in --ranks"
    notes.append(f"start rank r={start_rank} {why}: starting at r={start}, {where}")
    return allowed, start, notes


@dataclass
class _Base:
    """Shared bookkeeping: proposals are (rank, seed) for seeds 0..seeds-1, and racing.

    Racing: when the strategy would stop and a comparison its answer rests on is open
    (:meth:`Criterion.open_questions`: within the noise of the paired difference), it asks
    for more seeds of exactly the two ranks compared, both up to the same seeds (so they
    stay paired), at most ``max_seeds`` each, then decides again. A comparison that
    ``max_seeds`` would most likely leave open (:meth:`Criterion.undecidable`: its estimate
    sits closer to the bar than the noise at ``max_seeds`` seeds) is not raced; it stays
    open, and the answer says so.
    """

    results: list[TrialResult] = field(default_factory=list, init=False)
    stop_reason: str = field(default="", init=False)
    races: list[dict] = field(default_factory=list, init=False)
    _queue: list[Proposal] = field(default_factory=list, init=False)
    _waiting: set[tuple[int, int]] = field(default_factory=set, init=False)
    _racing: bool = field(default=False, init=False)
    _first: bool = field(default=True, init=False)

    def ask(self) -> Proposal | None:
        """The next trial to run, or None when the search is over (or waiting on results)."""
        if not self._queue and not self._waiting:
            if not self.stop_reason:
                rank = self._next_rank()
                if rank is not None:
                    self._queue = [Proposal(rank, s) for s in range(self._seeds_for(rank))]
            if not self._queue and self.stop_reason and (race := self._race()):
                self._queue, self._racing, self.stop_reason = race, True, ""
        if not self._queue:
            return None
        p = self._queue.pop(0)
        self._waiting.add((p.rank, p.seed))
        return p

    def tell(self, result: TrialResult) -> None:
        self._waiting.discard((result.rank, result.seed))
        self.results.append(result)
        if not self._waiting and not self._queue:
            if self._racing:
                self._racing = False  # decide again on the next ask
            else:
                self._rank_done(result.rank)

    def scores(self) -> list[RankScore]:
        return rank_scores(self.results)

    def score(self, rank: int) -> RankScore | None:
        return next((s for s in self.scores() if s.rank == rank), None)

    @property
    def done(self) -> bool:
        return bool(self.stop_reason)

    def _seeds_for(self, rank: int) -> int:
        """The first rank trained also measures the seed-to-seed noise (``noise_seeds``)."""
        first, self._first = self._first, False
        return max(self.seeds, min(self.noise_seeds, self._max_seeds)) if first else self.seeds

    @property
    def _max_seeds(self) -> int:
        return max(self.max_seeds, self.seeds)

    def _race(self) -> list[Proposal]:
        """Seeds that would settle the first open comparison (none: the answer stands)."""
        if self._max_seeds <= self.seeds and self.noise_seeds <= self.seeds:
            return []
        criterion = _criterion(self.criterion)
        scores = self.scores()
        for low, high in criterion.open_questions(scores, self.base_loss):
            why = criterion.undecidable(scores, (low, high), self._max_seeds, self.base_loss)
            if why:  # the latest word on this pair replaces an earlier one
                self.races = [
                    r for r in self.races if not (r.get("not_raced") and r["ranks"] == [low, high])
                ]
                self.races.append({"ranks": [low, high], "added": [], "not_raced": why})
                continue
            tried = {r: {t.seed for t in self.results if t.rank == r} for r in (low, high)}
            ok = {r: {t.seed for t in self.results if t.rank == r and t.ok} for r in (low, high)}
            n = max(len(ok[low]), len(ok[high]))
            target = min(n + (len(ok[low]) == len(ok[high])), self._max_seeds)
            props = [
                Proposal(r, s) for r in (low, high) for s in range(target) if s not in tried[r]
            ]
            if props:
                self.races.append(
                    {
                        "ranks": [low, high],
                        "seeds": {str(r): len(ok[r]) for r in ok},
                        "added": [[p.rank, p.seed] for p in props],
                    }
                )
                return props
        return []

    def _next_rank(self) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rank_done(self, rank: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class Grid(_Base):
    """Every rank in ``ranks``, ascending: the whole curve, and the reference for the ladder."""

    ranks: list[int] = field(default_factory=list)
    seeds: int = 1
    criterion: Criterion | float = field(default_factory=Criterion)
    base_loss: float | None = None
    max_seeds: int = 0
    """Racing: at most this many seeds of a rank (0: ``seeds``, no racing)."""
    noise_seeds: int = 0
    """Seeds of the first rank, to measure the noise (0: ``seeds``)."""
    _i: int = field(default=0, init=False)

    def _next_rank(self) -> int | None:
        if self._i >= len(self.ranks):
            self.stop_reason = "grid complete"
            return None
        self._i += 1
        return self.ranks[self._i - 1]

    def _rank_done(self, rank: int) -> None:
        if rank == self.ranks[-1]:
            self.stop_reason = "grid complete"


def _limit(results: list[TrialResult], rank: int) -> TrialResult | None:
    """The result that shows a resource limit at ``rank`` (skipped or out of memory)."""
    return next(
        (r for r in results if r.rank == rank and (r.status == SKIPPED or r.out_of_memory)),
        None,
    )


@dataclass
class Ladder(_Base):
    """Climb the allowed ``ranks`` from ``start_rank`` until the answer is settled, then
    probe down when the smallest rank tried is the answer. The contract is in the module
    docstring. ``ranks`` are the allowed ranks (see :func:`plan_ranks`)."""

    ranks: list[int] = field(default_factory=list)
    start_rank: int = 4
    criterion: Criterion | float = field(default_factory=Criterion)
    patience: int = 1
    seeds: int = 1
    base_loss: float | None = None
    tolerance: float | None = None  # deprecated: Criterion("relative", tolerance)
    max_seeds: int = 0
    """Racing: at most this many seeds of a rank (0: ``seeds``, no racing)."""
    noise_seeds: int = 0
    """Seeds of the start rank, to measure the noise (0: ``seeds``)."""
    _up: list[int] = field(default_factory=list, init=False)
    _down: list[int] = field(default_factory=list, init=False)
    _climbing: bool = field(default=True, init=False)
    _limited: bool = field(default=False, init=False)
    _flat: int = field(default=0, init=False)
    _story: list[str] = field(default_factory=list, init=False)

    def __post_init__(self):
        if self.tolerance is not None:
            self.criterion = Criterion("relative", self.tolerance)
        self.criterion = _criterion(self.criterion)
        ranks = sorted(set(self.ranks))
        self._up = [r for r in ranks if r >= self.start_rank]
        self._down = [r for r in reversed(ranks) if r < self.start_rank]
        if self.criterion.scale == "range" and self._down:
            # The range yardstick runs from the smallest rank: measure it first, or the
            # climb judges its steps against a span that starts at the start rank
            # (bench/RESULTS.md, "Stability").
            self._up.insert(0, self._down.pop())

    # -- what the results say -------------------------------------------------------------
    def _ok(self) -> list[RankScore]:
        return [s for s in self.scores() if s.ok]

    def _pick(self) -> RankScore | None:
        return self.criterion.pick(self.scores(), self.base_loss)

    def _settled(self) -> bool:
        return self.criterion.settled(self.scores(), self.base_loss)

    def _needs_probe(self) -> bool:
        """No rank completed yet, or the smallest completed rank is the answer."""
        ok = self._ok()
        pick = self._pick()
        return not ok or (pick is not None and pick.rank == min(s.rank for s in ok))

    # -- the state machine ------------------------------------------------------------------
    def _next_rank(self) -> int | None:
        if self._climbing and self._up:
            return self._up.pop(0)
        if self._climbing:
            top = max((r.rank for r in self.results), default=None)
            self._end_climb(
                f"reached the largest allowed rank r={top}"
                if top is not None
                else f"no allowed rank at or above the start r={self.start_rank}"
            )
        if self._down and self._needs_probe():
            return self._down.pop(0)
        if self._up and not self._limited and self._ok() and not self._settled():
            self._climbing, self._flat = True, 0  # the probe unsettled the answer
            self._story.append("climbing again: the probe left the answer open")
            return self._up.pop(0)
        self.stop_reason = "; ".join(self._story) or "no rank to try"
        return None

    def _rank_done(self, rank: int) -> None:
        if self._climbing:
            self._climb_step(rank)
        else:
            self._probe_step(rank)

    def _climb_step(self, rank: int) -> None:
        limit = _limit(self.results, rank)
        if limit is not None:
            self._limited = True
            self._end_climb(f"resource limit at r={rank} ({limit.reason})")
            return
        if not self.score(rank).ok or len(self._ok()) < 2:
            return  # an ordinary failure, or nothing to compare with yet: keep climbing
        self._flat = self._flat + 1 if self._settled() else 0
        if self._flat >= self.patience:
            self._end_climb(self._plateau(rank))

    def _plateau(self, rank: int) -> str:
        ok = self._ok()
        prev = max((s for s in ok if s.rank < rank), key=lambda s: s.rank)
        top = next(s for s in ok if s.rank == rank)
        gain = prev.mean - top.mean
        relative = f" ({gain / abs(prev.mean):+.2%})" if prev.mean else ""
        return (
            f"plateau: r={rank} gained {gain:+.4f} over r={prev.rank}{relative}; "
            "another gain that size would not change the "
            f"answer ({self.criterion.resolve(self.base_loss).describe()}"
            f"{' or the noise' if noise(prev, top) else ''})"
        )

    def _end_climb(self, reason: str) -> None:
        self._climbing = False
        self._story.append(reason)

    def _probe_step(self, rank: int) -> None:
        score = self.score(rank)
        limit = _limit(self.results, rank)
        ok = self._ok()
        if limit is not None and ok:
            self._down = []
            self._story.append(f"probe stopped by a resource limit at r={rank} ({limit.reason})")
        elif score.ok and self._pick() is None:
            self._story.append(f"probed down to r={rank}: no rank improves on the base model")
        elif score.ok and not self._needs_probe():
            self._story.append(
                f"probed down to r={rank}, which is not "
                f"{self.criterion.resolve(self.base_loss).describe()}"
            )
        elif score.ok and not self._down:
            self._story.append(f"probed down to the smallest allowed rank r={rank}")


@dataclass
class Nested(_Base):
    """One nested-rank run per seed at the largest allowed rank: each of its truncations to
    the allowed ``ranks`` is a point of the curve (:mod:`rankwise.training.nested`). Ranks a
    budget excludes are told as skipped results before the first ask.

    >>> nested = Nested(ranks=[1, 2, 4], seeds=1, distribution="uniform")
    >>> nested.ask()
    Proposal(rank=4, seed=0, truncations=(1, 2, 4))
    >>> for r in (1, 2, 4):
    ...     nested.tell(TrialResult(key="", rank=r, seed=0, status="complete", best_val_loss=1 / r))
    >>> nested.ask() is None, nested.stop_reason
    (True, 'one nested run per seed at r_max=4, ranks 1,2,4 drawn uniform')
    """

    ranks: list[int] = field(default_factory=list)
    seeds: int = 1
    distribution: str = "uniform"
    excluded: list[int] = field(default_factory=list)
    """Allowed by --ranks but over a budget: reported in the stop reason."""
    criterion: Criterion | float = field(default_factory=Criterion)
    base_loss: float | None = None
    max_seeds: int = 0
    noise_seeds: int = 0
    _s: int = field(default=0, init=False)

    def ask(self) -> Proposal | None:
        if self._waiting or self.stop_reason:
            return None
        if not self.ranks or self._s >= self.seeds:
            self.stop_reason = self._story()
            return None
        seed, self._s = self._s, self._s + 1
        self._waiting = {(r, seed) for r in self.ranks}
        return Proposal(self.ranks[-1], seed, truncations=tuple(self.ranks))

    def _story(self) -> str:
        if not self.ranks:
            return "no rank fits the budgets"
        over = f"; r={self.excluded[0]} and above over budget" if self.excluded else ""
        return (
            f"one nested run per seed at r_max={self.ranks[-1]}, ranks "
            f"{','.join(map(str, self.ranks))} drawn {self.distribution}{over}"
        )

    def _rank_done(self, rank: int) -> None:
        pass  # a run's truncations arrive together; the next ask decides
