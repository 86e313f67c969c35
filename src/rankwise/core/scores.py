"""Per-rank scores pooled over seeds, and the noise of a difference between two ranks.

A rank's score is its mean best val loss over seeds, adjusted for the seed effects when the
seeds are paired (:mod:`rankwise.core.noise`); every score of one curve shares that
curve's :class:`~rankwise.core.noise.Noise`, so a difference between two of them is paired
by seed and by validation block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rankwise.core.noise import Noise
from rankwise.core.stats import t_critical
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
    noise: Noise | None = field(default=None, compare=False, repr=False)
    """The curve's noise model (shared by its scores); None: unpaired, as before."""
    label: str | None = field(default=None, compare=False, repr=False)
    """Its name in the noise model when that is not the rank (:func:`paired_scores`)."""

    @property
    def noise_key(self):
        return self.rank if self.label is None else self.label

    @property
    def ok(self) -> bool:
        return self.mean is not None


def rank_scores(results: list[TrialResult]) -> list[RankScore]:
    """Pool results by rank. A rank with no successful seed keeps its failure status."""
    by_rank: dict[int, list[TrialResult]] = {}
    for r in results:
        by_rank.setdefault(r.rank, []).append(r)
    model = curve_noise(results)
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
        scores.append(RankScore(rank, model.mean(rank), se, len(values), COMPLETE, noise=model))
    return scores


def paired_scores(groups: dict[str, list[TrialResult]]) -> dict[str, RankScore]:
    """One score per named group of trials (a variant, a target set, a rank pattern), all
    sharing one noise model, so two groups trained with the same seeds are compared paired
    by seed and validation block. Groups with no completed trial are left out.

    >>> from rankwise.records import TrialResult
    >>> t = lambda r, s, v: TrialResult(key="", rank=r, seed=s, status="complete", best_val_loss=v)
    >>> s = paired_scores({"uniform": [t(8, 0, 3.0), t(8, 1, 3.2), t(8, 2, 3.1)],
    ...                    "pattern": [t(8, 0, 3.01), t(8, 1, 3.21), t(8, 2, 3.11)]})
    >>> round(s["pattern"].mean - s["uniform"].mean, 4), round(noise(s["pattern"], s["uniform"]), 4)
    (0.01, 0.0)
    """
    ok = {name: [r for r in results if r.ok] for name, results in groups.items()}
    ok = {name: rs for name, rs in ok.items() if rs}
    losses = {(name, r.seed): r.best_val_loss for name, rs in ok.items() for r in rs}
    blocks = {(name, r.seed): r.val_blocks for name, rs in ok.items() for r in rs if r.val_blocks}
    model = Noise.fit(losses, blocks)
    out = {}
    for name, rs in ok.items():
        values = [r.best_val_loss for r in rs]
        m = sum(values) / len(values)
        se = (
            math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))
            if len(values) > 1
            else 0.0
        )
        out[name] = RankScore(
            rs[0].rank, model.mean(name), se, len(values), COMPLETE, noise=model, label=name
        )
    return out


def curve_noise(results: list[TrialResult]) -> Noise:
    """The noise model of the completed trials in ``results`` (one curve)."""
    ok = {(r.rank, r.seed): r for r in results if r.ok}
    losses = {k: r.best_val_loss for k, r in ok.items()}
    blocks = {k: r.val_blocks for k, r in ok.items() if r.val_blocks}
    return Noise.fit(losses, blocks)


# The normal's two-sided 95% point: a difference counts as real beyond Z standard errors
# only when its standard error is known from many degrees of freedom; otherwise beyond
# Student's t at its degrees of freedom (:func:`critical`). With no measured noise only the
# criterion applies.
Z = 1.96


def noise(a: RankScore, b: RankScore) -> float | None:
    """Standard error of ``a.mean - b.mean``: from the curve's noise model (paired by seed
    and validation block) when both scores share one, else unpaired (None with one seed)."""
    if a.noise is not None and a.noise is b.noise:
        return a.noise.se(a.noise_key, b.noise_key, a.n, b.n)
    if a.n < 2 or b.n < 2:
        return None
    return math.sqrt(a.se**2 + b.se**2)


def _test(a: RankScore, b: RankScore) -> tuple[float | None, float]:
    """``(se, df)`` of ``a.mean - b.mean``: the curve's noise model when both scores share
    one, else the two scores' own spreads (pooled df)."""
    if a.noise is not None and a.noise is b.noise:
        return a.noise.test(a.noise_key, b.noise_key, a.n, b.n)[:2]
    return noise(a, b), max(1, a.n + b.n - 2)


def critical(a: RankScore, b: RankScore) -> float:
    """How many standard errors of ``a.mean - b.mean`` make the difference real: Student's
    t at the degrees of freedom behind :func:`noise` (12.7 at 1 df, 4.30 at 2, 1.96 at many).
    """
    return t_critical(_test(a, b)[1])


def dof(a: RankScore, b: RankScore) -> float:
    """The degrees of freedom behind :func:`noise` (``inf``: the validation blocks only)."""
    return _test(a, b)[1]


def evidence_df(a: RankScore, b: RankScore) -> float:
    """The degrees of freedom a verdict on ``a - b`` rests on: the smaller of the whole
    standard error's and its seed-noise estimate's (a sigma from one seed pair is one df,
    however many validation blocks stand beside it)."""
    df = dof(a, b)
    if a.noise is not None and a.noise is b.noise:
        seed = a.noise.seed_df(a.noise_key, b.noise_key, a.n, b.n)
        return df if seed is None else min(df, seed)
    return df


def half_width(a: RankScore, b: RankScore) -> float:
    """The 95% half-width of ``a.mean - b.mean``: :func:`critical` x :func:`noise` (0 when
    the noise is unknown)."""
    se, df = _test(a, b)
    return t_critical(df) * se if se else 0.0


def beats(better: RankScore, worse: RankScore, tolerance: float) -> bool:
    """True if ``better`` improves on ``worse`` by more than the tolerance and the noise."""
    diff = worse.mean - better.mean
    se = noise(better, worse)
    return diff > tolerance * abs(worse.mean) and (se is None or diff > half_width(better, worse))


def improvement_share(score_mean: float, base: float | None, best: float) -> float | None:
    """(base - loss) / (base - best): how much of the best rank's improvement over the base
    model a rank reaches (1.0 at the best). None without a base score or an improvement.

    >>> improvement_share(3.5, base=4.0, best=3.0)
    0.5
    """
    if base is None or not base > best:
        return None
    return (base - score_mean) / (base - best)
