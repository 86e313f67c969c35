"""The search core: ask/tell strategies over plain records. No torch.

A strategy proposes ``(rank, seed)`` pairs with :meth:`ask` and learns from
:class:`~rankwise.records.TrialResult` records with :meth:`tell`. It is a pure
state machine: replaying the same results gives the same proposals, which is how a
run resumes. A :class:`Criterion` says when a rank is as good as the best one.

Example (the base model scores 4.0 on the validation blocks):
    >>> from rankwise.records import TrialResult
    >>> share = Criterion("share", 0.95)
    >>> ladder = Ladder([1, 2, 4, 8, 16], start_rank=4, criterion=share, base_loss=4.0)
    >>> losses = {1: 3.0, 2: 2.6, 4: 2.5, 8: 2.499, 16: 2.498}
    >>> while (p := ladder.ask()) is not None:
    ...     ladder.tell(TrialResult(key="", rank=p.rank, seed=p.seed, status="complete",
    ...                             best_val_loss=losses[p.rank]))
    >>> [s.rank for s in ladder.scores()], recommend(ladder.scores(), share, base_loss=4.0).rank
    ([2, 4, 8], 4)

The criteria (``--criterion``, each with its ``--threshold`` t; *B* is the best val loss,
*base* the base model's, without an adapter, on the same validation blocks):

- ``relative``: a rank is as good as the best when its loss is within t of it, relative
  to the loss (t = 0.01: within 1%; the historical rule).
- ``share``: a rank is as good as the best when it reaches a share t of the improvement
  over the base model that the best rank reached: (base - loss) >= t * (base - B).
- ``knee``: the knee of the curve of loss against log2 r. A step up the rank list is
  *steep* when, per doubling of r, it gains more than t of the improvement over the base
  model reached at its top. The recommendation is the rank at the top of the last steep
  step (the smallest rank tried when no step is steep).

Without a base-model score, ``share`` and ``knee`` fall back to ``relative`` at its
default threshold, and the reason says so. With several seeds per rank a difference
counts only beyond :data:`Z` standard errors as well. The recommendation is the smallest
rank that is as good as the best (for ``knee``: the knee), or none when no rank improves
on the base model by more than the noise and the criterion's floor: then LoRA does not help
this data at this budget, and the recommendation says so.

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

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .config import ConfigError
from .records import COMPLETE, SKIPPED, TrialResult

__all__ = [
    "CRITERIA",
    "Criterion",
    "beats",
    "noise",
    "improvement_share",
    "plan_ranks",
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


# A difference counts as real only beyond Z standard errors of the difference (~95% for a
# normal error); with one seed per rank the noise is unknown and only the criterion applies.
Z = 2.0

# share and knee: an improvement over the base model below this share of the base loss
# (0.1%) is not a reason to train an adapter, whatever share of it a rank reaches.
MIN_GAIN = 0.001


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


# kind -> (default threshold, the allowed range as text, whether a threshold is inside it).
# Defaults from the planted-rank benchmark (bench/RESULTS.md, "Criterion"): knee 0.01 and
# share 0.99 recommend within a factor 2 of the planted rank k on all five tasks (k = 2..32),
# knee 0.01 equal to k on four. relative keeps the historical 1%.
CRITERIA: dict[str, tuple[float, str, Callable[[float], bool]]] = {
    "relative": (0.01, "a share of the val loss in [0, 1) (0.01 = 1%)", lambda t: 0 <= t < 1),
    "share": (0.99, "a share of the improvement in (0, 1] (0.99 = 99%)", lambda t: 0 < t <= 1),
    "knee": (0.01, "a share of the improvement per doubling in (0, 1)", lambda t: 0 < t < 1),
}


def _pct(x: float) -> str:
    return f"{round(x * 100, 2):g}%"


@dataclass(frozen=True)
class Criterion:
    """When a rank counts as good as the best: ``kind`` and its ``threshold`` (None: the
    kind's default). See the module docstring for the definitions.

    >>> Criterion().describe()
    'at the knee (no doubling of r above it gains more than 1% of its improvement)'
    >>> Criterion("share").describe(), Criterion("relative", 0.005).describe()
    ('at least 99% of the improvement over the base model', 'within 0.5% of the best val loss')
    """

    kind: str = "knee"
    threshold: float | None = None

    def __post_init__(self):
        if self.kind not in CRITERIA:
            raise ConfigError(
                f"--criterion: expected one of {', '.join(CRITERIA)}, got {self.kind!r}"
            )
        default, what, inside = CRITERIA[self.kind]
        t = default if self.threshold is None else self.threshold
        number = isinstance(t, (int, float)) and not isinstance(t, bool)
        if not number or not inside(t):
            raise ConfigError(f"--threshold: the {self.kind} criterion takes {what}, got {t!r}")
        object.__setattr__(self, "threshold", float(t))

    def resolve(self, base: float | None) -> Criterion:
        """The criterion that decides: without a base score, share and knee fall back to
        relative at its default threshold."""
        return self if base is not None or self.kind == "relative" else Criterion("relative")

    def describe(self) -> str:
        t = _pct(self.threshold)
        if self.kind == "relative":
            return f"within {t} of the best val loss"
        if self.kind == "share":
            return f"at least {t} of the improvement over the base model"
        return f"at the knee (no doubling of r above it gains more than {t} of its improvement)"

    def helps(self, best: RankScore, base: float | None) -> bool:
        """Whether the best rank improves on the base model by more than the noise and the
        floor (relative: its threshold; share and knee: :data:`MIN_GAIN` of the base loss)."""
        if base is None:
            return True
        gain = base - best.mean
        floor = (self.threshold if self.kind == "relative" else MIN_GAIN) * abs(base)
        return gain > floor and (best.n < 2 or gain > Z * best.se)

    def as_good(self, score: RankScore, best: RankScore, base: float | None = None) -> bool:
        """Whether ``score`` is as good as ``best``: within the criterion or the noise.
        knee: the step between the two ranks (the whole span, per doubling) is not steep."""
        c = self.resolve(base)
        diff = score.mean - best.mean
        se = noise(score, best)
        if c.kind == "knee":
            doublings = abs(math.log2(best.rank / score.rank)) or 1.0
            return not c._steep(diff, se, doublings, base - best.mean)
        margin = c.threshold * abs(score.mean)
        if c.kind == "share":
            margin = (1 - c.threshold) * max(0.0, base - best.mean)
        return diff <= margin or (se is not None and diff <= Z * se)

    def steep(self, low: RankScore, high: RankScore, base: float) -> bool:
        """knee: whether the step up from rank ``low`` to ``high`` gains, per doubling of r,
        more than ``threshold`` of the improvement over the base model at ``high`` (and
        more than the noise)."""
        doublings = math.log2(high.rank / low.rank)
        return self._steep(low.mean - high.mean, noise(low, high), doublings, base - high.mean)

    def _steep(self, gain: float, se: float | None, doublings: float, improvement: float):
        beyond_noise = se is None or gain > Z * se
        return gain / doublings > self.threshold * improvement and beyond_noise

    def pick(self, scores: list[RankScore], base: float | None = None) -> RankScore | None:
        """The recommended rank's score, or None (nothing completed, or no help)."""
        c = self.resolve(base)
        ok = sorted((s for s in scores if s.ok), key=lambda s: s.rank)
        if not ok:
            return None
        best = min(ok, key=lambda s: (s.mean, s.rank))
        if not c.helps(best, base):
            return None
        if c.kind == "knee":
            # Only steps up to the best rank can lead to it: a steep step up to a rank that
            # is still worse than a smaller one is noise on the curve, not its knee.
            upto = [s for s in ok if s.rank <= best.rank]
            steep = [hi for lo, hi in zip(upto, upto[1:], strict=False) if c.steep(lo, hi, base)]
            return steep[-1] if steep else upto[0]
        return next(s for s in ok if c.as_good(s, best, base))

    def settled(self, scores: list[RankScore], base: float | None = None) -> bool:
        """Whether the ranks above the largest one tried can no longer change the pick,
        given that they gain, all together, at most what the last step gained (U).

        relative and share depend on the rest of the curve only through the best loss: the
        pick is settled when lowering the best by U changes nothing. knee depends on it
        through its steps: settled when the last step is not steep (the later, smaller
        steps are not either) and lowering the best by U does not change whether LoRA helps.
        """
        c = self.resolve(base)
        ok = sorted((s for s in scores if s.ok), key=lambda s: s.rank)
        if len(ok) < 2:
            return False
        prev, top = ok[-2], ok[-1]
        gain = max(0.0, prev.mean - top.mean)
        ahead = RankScore(2 * top.rank, top.mean - gain, top.se, top.n, COMPLETE)
        if c.kind == "knee":
            best = min(ok, key=lambda s: (s.mean, s.rank))
            lowered = min(best, ahead, key=lambda s: (s.mean, s.rank))
            return not c.steep(prev, top, base) and c.helps(best, base) == c.helps(lowered, base)
        now, then = c.pick(ok, base), c.pick([*ok, ahead], base)
        return getattr(now, "rank", None) == getattr(then, "rank", None)


def _criterion(value: Criterion | float) -> Criterion:
    """A Criterion; a bare number is the relative criterion's threshold (the old tolerance)."""
    return value if isinstance(value, Criterion) else Criterion("relative", float(value))


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


@dataclass(frozen=True)
class Recommendation:
    rank: int | None
    loss: float | None
    best_rank: int | None
    best_loss: float | None
    stop_reason: str
    reason: str
    confidence: str = ""
    base_loss: float | None = None
    share: float | None = None  # the pick's share of the best rank's improvement
    lora_helps: bool | None = None  # False: no rank beats the base model; None: no base
    criterion: str = ""


def recommend(
    scores: list[RankScore],
    criterion: Criterion | float,
    stop_reason: str = "",
    base_loss: float | None = None,
    params: Mapping[int, int] | None = None,
) -> Recommendation:
    """The smallest rank as good as the best under ``criterion`` (for knee: the knee).

    ``base_loss``: the base model's val loss, without it share and knee fall back to
    relative. ``params``: trainable parameters per rank (else the rank ratio is used).
    """
    asked = _criterion(criterion)
    c = asked.resolve(base_loss)
    ok = [s for s in scores if s.ok]
    common = {"base_loss": base_loss, "criterion": f"{c.kind} {c.threshold:g}"}
    if not ok:
        why = "no trial completed; nothing to recommend"
        return Recommendation(None, None, None, None, stop_reason, why, **common)
    best = min(ok, key=lambda s: (s.mean, s.rank))
    pick = c.pick(ok, base_loss)
    stopped = f"; stopped: {stop_reason}" if stop_reason else ""
    if pick is None:
        why = _no_help(best, base_loss, c) + stopped
        return Recommendation(
            None, None, best.rank, best.mean, stop_reason, why, lora_helps=False, **common
        )
    why = _reason(pick, best, ok, c, base_loss, params)
    if c is not asked:
        why += (
            f" (no base-model score, so the {asked.kind} criterion fell back to "
            f"relative {_pct(c.threshold)})"
        )
    return Recommendation(
        pick.rank,
        pick.mean,
        best.rank,
        best.mean,
        stop_reason,
        why + stopped,
        _confidence(pick, ok, c, base_loss),
        share=improvement_share(pick.mean, base_loss, best.mean),
        lora_helps=None if base_loss is None else True,
        **common,
    )


def _fmt(s: RankScore) -> str:
    return f"{s.mean:.4f} ± {s.se:.4f}" if s.n > 1 else f"{s.mean:.4f}"


def _share(x: float) -> str:
    """A share as a percentage, rounded down: 99.96% must not read as 100%."""
    return f"{math.floor(x * 1000) / 10:g}%"


def _fewer(pick: RankScore, best: RankScore, params: Mapping[int, int] | None) -> str:
    if params and pick.rank in params and best.rank in params and params[pick.rank]:
        return f"{params[best.rank] / params[pick.rank]:.3g}x"
    return f"{best.rank / pick.rank:.3g}x"


def _no_help(best: RankScore, base: float, c: Criterion) -> str:
    gain = base - best.mean
    floor = c.threshold if c.kind == "relative" else MIN_GAIN
    return (
        f"LoRA does not help this data at this budget: the best rank (r={best.rank}, val loss "
        f"{_fmt(best)}) improves on the base model ({base:.4f}) by {gain:+.4f}, not more than "
        f"{_pct(floor)} of its loss{' or the noise' if best.n > 1 else ''}"
    )


def _reason(pick, best, ok, c: Criterion, base, params) -> str:
    """The recommendation in the words a user thinks in."""
    if base is None:  # the relative criterion, without a base model to compare with
        if pick.rank == best.rank:
            return f"r={pick.rank}: the best val loss ({_fmt(pick)})"
        return (
            f"r={pick.rank}: val loss {_fmt(pick)}, within {_pct(c.threshold)} of the best "
            f"({_fmt(best)} at r={best.rank}){' or the noise' if noise(pick, best) else ''}, "
            f"with {_fewer(pick, best, params)} fewer trainable parameters"
        )
    who = f"r={pick.rank}" + (" is at the knee of the curve and" if c.kind == "knee" else "")
    if pick.rank == best.rank:
        why = (
            f"{who} has the best val loss ({_fmt(pick)}), {base - pick.mean:.4f} below the "
            f"base model ({base:.4f})"
        )
        below = [s for s in ok if s.rank < pick.rank]
        if below:
            nxt = max(below, key=lambda s: s.rank)
            share = improvement_share(nxt.mean, base, best.mean)
            why += f"; r={nxt.rank} reaches {_share(share)} of that improvement"
        return why
    share = improvement_share(pick.mean, base, best.mean)
    return (
        f"{who} reaches {_share(share)} of the improvement over the base model that the best "
        f"rank (r={best.rank}) reached, with {_fewer(pick, best, params)} fewer trainable "
        f"parameters (val loss {_fmt(pick)} vs {_fmt(best)}; base model {base:.4f})"
    )


def _confidence(pick: RankScore, ok: list[RankScore], c: Criterion, base) -> str:
    below = [s for s in ok if s.rank < pick.rank]
    if all(s.n < 2 for s in ok):
        return "unmeasured: one seed per rank, so seed-to-seed noise is unknown (use --seeds 2+)"
    if not below:
        return f"high for the upper side; r={pick.rank} is the smallest rank tried"
    nxt = max(below, key=lambda s: s.rank)
    se = noise(pick, nxt)
    diff = nxt.mean - pick.mean
    if not c.as_good(nxt, pick, base):
        return (
            f"high: r={nxt.rank} is worse by {diff:.4f} "
            f"(beyond the criterion and > {Z:g} SE = {Z * (se or 0):.4f})"
        )
    return (
        f"low: r={nxt.rank} is worse by only {diff:.4f}, within the noise "
        f"({Z:g} SE = {Z * (se or 0):.4f}); more seeds would settle it"
    )


@dataclass
class _Base:
    """Shared bookkeeping: proposals are (rank, seed) for seeds 0..seeds-1."""

    results: list[TrialResult] = field(default_factory=list, init=False)
    stop_reason: str = field(default="", init=False)
    _queue: list[Proposal] = field(default_factory=list, init=False)
    _waiting: set[tuple[int, int]] = field(default_factory=set, init=False)

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
    seeds: int = 1
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
