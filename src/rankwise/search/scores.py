"""Per-rank scores pooled over seeds, and the noise of a difference between two ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rankwise.records import COMPLETE, TrialResult


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


# A difference counts as real only beyond Z standard errors of the difference (~95% for a
# normal error); with one seed per rank the noise is unknown and only the criterion applies.
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


def improvement_share(score_mean: float, base: float | None, best: float) -> float | None:
    """(base - loss) / (base - best): how much of the best rank's improvement over the base
    model a rank reaches (1.0 at the best). None without a base score or an improvement.

    >>> improvement_share(3.5, base=4.0, best=3.0)
    0.5
    """
    if base is None or not base > best:
        return None
    return (base - score_mean) / (base - best)
