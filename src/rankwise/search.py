"""The search core: ask/tell strategies over plain records. No torch.

A strategy proposes ``(rank, seed)`` pairs with :meth:`ask` and learns from
:class:`~rankwise.records.TrialResult` records with :meth:`tell`. It is a pure
state machine: replaying the same results gives the same proposals, which is how a
run resumes.

Example:
    >>> from rankwise.records import TrialResult
    >>> ladder = Ladder(ranks=[1, 2, 4, 8, 16], start_rank=4, tolerance=0.01)
    >>> losses = {1: 3.0, 2: 2.6, 4: 2.5, 8: 2.499, 16: 2.498}
    >>> while (p := ladder.ask()) is not None:
    ...     ladder.tell(TrialResult(key="", rank=p.rank, seed=p.seed, status="complete",
    ...                             best_val_loss=losses[p.rank]))
    >>> [s.rank for s in ladder.scores()], recommend(ladder.scores(), 0.01).rank
    ([2, 4, 8], 4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .records import COMPLETE, SKIPPED, TrialResult

__all__ = [
    "beats",
    "noise",
    "Proposal",
    "RankScore",
    "Recommendation",
    "Ladder",
    "Grid",
    "recommend",
    "rank_scores",
]


@dataclass(frozen=True)
class Proposal:
    rank: int
    seed: int = 0


@dataclass(frozen=True)
class RankScore:
    """Best val loss of one rank, pooled over seeds (mean ± standard error)."""

    rank: int
    mean: float | None
    se: float
    n: int
    status: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.mean is not None


def rank_scores(results: list[TrialResult]) -> list[RankScore]:
    """Pool results by rank. A rank with no successful seed keeps its failure status."""
    by_rank: dict[int, list[TrialResult]] = {}
    for r in results:
        by_rank.setdefault(r.rank, []).append(r)
    scores = []
    for rank in sorted(by_rank):
        trials = by_rank[rank]
        values = [t.best_val_loss for t in trials if t.ok]
        if not values:
            first = trials[0]
            scores.append(RankScore(rank, None, 0.0, 0, first.status, first.reason))
            continue
        mean = sum(values) / len(values)
        se = 0.0
        if len(values) > 1:
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
            se = math.sqrt(var / len(values))
        scores.append(RankScore(rank, mean, se, len(values), COMPLETE))
    return scores


@dataclass(frozen=True)
class Recommendation:
    rank: int | None
    loss: float | None
    best_rank: int | None
    best_loss: float | None
    stop_reason: str
    reason: str
    confidence: str = ""


# A difference counts as real only beyond Z standard errors of the difference (~95% for a
# normal error); with one seed per rank the noise is unknown and only the tolerance applies.
Z = 2.0


def noise(a: RankScore, b: RankScore) -> float | None:
    """Standard error of the difference of two rank means (None if either has one seed)."""
    if a.n < 2 or b.n < 2:
        return None
    return math.sqrt(a.se**2 + b.se**2)


def beats(better: RankScore, worse: RankScore, tolerance: float) -> bool:
    """True if ``better`` improves on ``worse`` by more than the tolerance and the noise."""
    diff = worse.mean - better.mean
    se = noise(better, worse)
    return diff > tolerance * abs(worse.mean) and (se is None or diff > Z * se)


def recommend(scores: list[RankScore], tolerance: float, stop_reason: str = "") -> Recommendation:
    """The smallest rank that the best rank does not beat (by tolerance and noise)."""
    ok = [s for s in scores if s.ok]
    if not ok:
        return Recommendation(
            None, None, None, None, stop_reason, "no trial completed; nothing to recommend"
        )
    best = min(ok, key=lambda s: (s.mean, s.rank))
    pick = min((s for s in ok if not beats(best, s, tolerance)), key=lambda s: s.rank)
    if pick.rank == best.rank:
        why = f"r={pick.rank}: best val loss {_fmt(pick)}"
    else:
        why = (
            f"r={pick.rank}: val loss {_fmt(pick)} (best {_fmt(best)} at r={best.rank}, "
            f"within {tolerance:.0%}{' or the noise' if noise(pick, best) else ''}); "
            f"{best.rank / pick.rank:.1f}x fewer trainable params"
        )
    if stop_reason:
        why += f"; stopped: {stop_reason}"
    return Recommendation(
        pick.rank,
        pick.mean,
        best.rank,
        best.mean,
        stop_reason,
        why,
        _confidence(pick, ok, tolerance),
    )


def _fmt(s: RankScore) -> str:
    return f"{s.mean:.4f} ± {s.se:.4f}" if s.n > 1 else f"{s.mean:.4f}"


def _confidence(pick: RankScore, ok: list[RankScore], tolerance: float) -> str:
    below = [s for s in ok if s.rank < pick.rank]
    if all(s.n < 2 for s in ok):
        return "unmeasured: one seed per rank, so seed-to-seed noise is unknown (use --seeds 2+)"
    if not below:
        return f"high for the upper side; r={pick.rank} is the smallest rank tried"
    nxt = max(below, key=lambda s: s.rank)
    se = noise(pick, nxt)
    diff = nxt.mean - pick.mean
    if beats(pick, nxt, tolerance):
        return (
            f"high: r={nxt.rank} is worse by {diff:.4f} "
            f"(> {tolerance:.0%} and > {Z:g} SE = {Z * (se or 0):.4f})"
        )
    return (
        f"low: r={nxt.rank} is worse by only {diff:.4f}, within the noise "
        f"({Z:g} SE = {Z * (se or 0):.4f}); more seeds would settle it"
    )


@dataclass
class _Base:
    """Shared bookkeeping: proposals are (rank, seed) for seeds 0..seeds-1."""

    seeds: int = 1
    results: list[TrialResult] = field(default_factory=list)
    stop_reason: str = ""
    _queue: list[Proposal] = field(default_factory=list)
    _waiting: set[tuple[int, int]] = field(default_factory=set)

    def ask(self) -> Proposal | None:
        """The next trial to run, or None when the search is over (or waiting on results)."""
        if not self._queue and not self._waiting and not self.stop_reason:
            rank = self._next_rank()
            if rank is not None:
                self._queue = [Proposal(rank, s) for s in range(self.seeds)]
        if not self._queue:
            return None
        p = self._queue.pop(0)
        self._waiting.add((p.rank, p.seed))
        return p

    def tell(self, result: TrialResult) -> None:
        self._waiting.discard((result.rank, result.seed))
        self.results.append(result)
        if not self._waiting and not self._queue:
            self._rank_done(result.rank)

    def scores(self) -> list[RankScore]:
        return rank_scores(self.results)

    def score(self, rank: int) -> RankScore | None:
        return next((s for s in self.scores() if s.rank == rank), None)

    @property
    def done(self) -> bool:
        return bool(self.stop_reason)

    def _next_rank(self) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rank_done(self, rank: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class Grid(_Base):
    """Every rank in ``ranks``, ascending: the whole curve, and the reference for the ladder."""

    ranks: list[int] = field(default_factory=list)
    _i: int = 0

    def _next_rank(self) -> int | None:
        if self._i >= len(self.ranks):
            self.stop_reason = "grid complete"
            return None
        self._i += 1
        return self.ranks[self._i - 1]

    def _rank_done(self, rank: int) -> None:
        if rank == self.ranks[-1]:
            self.stop_reason = "grid complete"


@dataclass
class Ladder(_Base):
    """Start at ``start_rank``, climb while the gain beats ``tolerance``, then, if the start
    already sat on the plateau, probe downward for the smallest rank that stays within it."""

    ranks: list[int] = field(default_factory=list)
    start_rank: int = 4
    tolerance: float = 0.01
    patience: int = 1
    _phase: str = "climb"
    _climb: list[int] = field(default_factory=list)
    _down: list[int] = field(default_factory=list)
    _flat: int = 0
    _last_ok: int | None = None

    def __post_init__(self):
        self._climb = [r for r in self.ranks if r >= self.start_rank]
        self._down = sorted((r for r in self.ranks if r < self.start_rank), reverse=True)

    def _next_rank(self) -> int | None:
        if self._phase == "climb":
            if self._climb:
                return self._climb.pop(0)
            self._end_climb(
                f"reached the largest allowed rank r={self._last_tried()}", plateau=False
            )
        if self._phase == "down" and self._down:
            return self._down.pop(0)
        if not self.stop_reason:
            self.stop_reason = self._climb_reason
        return None

    def _last_tried(self) -> int | None:
        return self.results[-1].rank if self.results else None

    def _rank_done(self, rank: int) -> None:
        score = self.score(rank)
        if self._phase == "down":
            best = min((s for s in self.scores() if s.ok), key=lambda s: s.mean)
            if not score.ok or beats(best, score, self.tolerance):
                self._phase = "done"
                self.stop_reason = (
                    f"{self._climb_reason}; probed down to r={rank}, which is "
                    f"outside the {self.tolerance:.0%} tolerance"
                )
            elif not self._down:
                self.stop_reason = (
                    f"{self._climb_reason}; probed down to the smallest rank r={rank}"
                )
            return
        if not score.ok:
            limit = any(
                r.status == SKIPPED or r.out_of_memory for r in self.results if r.rank == rank
            )
            if limit:
                self._end_climb(f"resource limit at r={rank} ({score.reason})", plateau=False)
            return  # an ordinary failure: keep climbing from the last good rank
        prev = self._last_ok
        self._last_ok = rank
        if prev is None:
            return
        prev_score = self.score(prev)
        gain = (prev_score.mean - score.mean) / abs(prev_score.mean)
        self._flat = 0 if beats(score, prev_score, self.tolerance) else self._flat + 1
        if self._flat >= self.patience:
            self._end_climb(
                f"plateau: r={rank} gained {gain:+.2%} over r={prev} "
                f"(< {self.tolerance:.0%}{self._noise_note(score, prev_score)})",
                plateau=True,
            )

    @staticmethod
    def _noise_note(a: RankScore, b: RankScore) -> str:
        return " or within the noise" if noise(a, b) else ""

    def _end_climb(self, reason: str, plateau: bool) -> None:
        self._climb_reason = reason
        self._phase = "done"
        if plateau and self._down:
            ok = [s for s in self.scores() if s.ok]
            best = min(ok, key=lambda s: s.mean)
            smallest_good = min(s.rank for s in ok if not beats(best, s, self.tolerance))
            if smallest_good == min(s.rank for s in ok):
                self._phase = "down"  # the start is on the plateau: look below it
                return
        self.stop_reason = reason

    _climb_reason: str = ""
