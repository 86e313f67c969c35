"""When a rank is as good as the best one, and the recommendation in words.

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
default threshold, and the reason says so. Every decision counts a difference only beyond
the noise: a step is steep, and a rank worse than the best, only when the difference clears
the criterion's bar by Student's t standard errors of the paired difference, at the degrees
of freedom behind them (the seeds' and the validation blocks' noise,
:mod:`rankwise.core.noise`; 12.7 SE at 1 df, 1.96 at many).

**The guarantee** (``--max-regret`` g, default :data:`MAX_REGRET`): the recommended rank
never loses more than g of the val loss to the best rank the search trained, beyond the
noise. The criterion may choose a smaller rank only inside it: the answer is the smallest
rank at or above the criterion's pick whose loss is *shown* within g of the best (its
difference plus its 95% half-width at most g x the best loss). A pick the noise cannot
show within g gives way to the next rank up that is; the best rank always is. The yardstick
is the loss itself, so it does not move with how far the base model is from the data.

The recommendation is that rank, or none when no rank improves on the base model by more
than the noise and the criterion's floor: then LoRA does not help this data at this budget,
and the recommendation says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rankwise.core.scores import (
    RankScore,
    critical,
    dof,
    evidence_df,
    half_width,
    improvement_share,
    noise,
)
from rankwise.core.stats import t_critical
from rankwise.errors import ConfigError

# The guarantee's default: the answer loses at most 1% of the val loss to the best rank
# trained (bench/RESULTS.md, "An answer a user can act on").
MAX_REGRET = 0.01

# share and knee: an improvement over the base model below this share of the base loss
# (0.1%) is not a reason to train an adapter, whatever share of it a rank reaches.
MIN_GAIN = 0.001


# kind -> (default threshold, the allowed range as text, whether a threshold is inside it).
# Defaults from the planted-rank benchmark (bench/RESULTS.md, "Criterion"): share 0.99
# recommends within a factor 2 of the planted rank k on all five tasks (k = 2..32).
# relative keeps the historical 1%. knee: see KNEE_THRESHOLD.
CRITERIA: dict[str, tuple[float, str, Callable[[float], bool]]] = {
    "relative": (0.01, "a share of the val loss in [0, 1) (0.01 = 1%)", lambda t: 0 <= t < 1),
    "share": (0.99, "a share of the improvement in (0, 1] (0.99 = 99%)", lambda t: 0 < t <= 1),
    "knee": (0.005, "a share per doubling in (0, 1)", lambda t: 0 < t < 1),
}


# What a share in the criteria is a share of (``--criterion-scale``).
SCALES = {
    "base": "the improvement over the base model",
    "range": "the improvement from the smallest rank to the best",
    "loss": "the val loss",
}
DEFAULT_SCALE = {"relative": "loss", "share": "base", "knee": "loss"}

# The knee's default threshold on each scale. loss (the default): 0.5% of the val loss per
# doubling, a yardstick that does not move with how far the base model is from the data;
# with the 1% guarantee it gave the 6-seed grid's answer on every pool replayed, where 1% of
# the base gap said r=4 for a planted rank of 8 on a far-off base (bench/RESULTS.md, "An
# answer a user can act on"). base: 1% of the improvement over the base model ("Criterion").
# range: 10% of the improvement from the smallest rank ("Stability").
KNEE_THRESHOLD = {"loss": 0.005, "base": 0.01, "range": 0.1}


def _pct(x: float) -> str:
    return f"{round(x * 100, 2):g}%"


@dataclass(frozen=True)
class Criterion:
    """When a rank counts as good as the best: ``kind`` and its ``threshold`` (None: the
    kind's default), measured against the ``scale`` (None: the kind's default). See the
    module docstring for the definitions.

    >>> Criterion().describe()
    'at the knee (no doubling of r above it gains more than 0.5% of the val loss)'
    >>> Criterion("knee", scale="base").describe()
    'at the knee (no doubling of r above it gains more than 1% of the improvement over the base model)'
    >>> Criterion("share", scale="base").describe(), Criterion("relative", 0.005).describe()
    ('at least 99% of the improvement over the base model', 'within 0.5% of the best val loss')
    """

    kind: str = "knee"
    threshold: float | None = None
    scale: str | None = None
    max_regret: float = MAX_REGRET
    """The guarantee: the answer is shown within this share of the best rank's val loss."""

    def __post_init__(self):
        if self.kind not in CRITERIA:
            raise ConfigError(
                f"--criterion: expected one of {', '.join(CRITERIA)}, got {self.kind!r}"
            )
        default, what, inside = CRITERIA[self.kind]
        scale = DEFAULT_SCALE[self.kind] if self.scale is None else self.scale
        if scale not in SCALES:
            raise ConfigError(
                f"--criterion-scale: expected one of {', '.join(SCALES)}, got {scale!r}"
            )
        object.__setattr__(self, "scale", scale)
        if self.kind == "knee":
            default = KNEE_THRESHOLD[scale]
        t = default if self.threshold is None else self.threshold
        number = isinstance(t, (int, float)) and not isinstance(t, bool)
        if not number or not inside(t):
            raise ConfigError(f"--threshold: the {self.kind} criterion takes {what}, got {t!r}")
        object.__setattr__(self, "threshold", float(t))
        g = self.max_regret
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g < 1:
            raise ConfigError(
                f"--max-regret: expected a share of the val loss in (0, 1) (0.01 = 1%), got {g!r}"
            )
        object.__setattr__(self, "max_regret", float(g))

    def resolve(self, base: float | None) -> Criterion:
        """The criterion that decides: without a base score, a criterion measured against
        the base model falls back to relative at its default threshold."""
        if base is not None or self.kind == "relative" or self.scale != "base":
            return self
        return Criterion("relative", max_regret=self.max_regret)

    def describe(self) -> str:
        t = _pct(self.threshold)
        if self.kind == "relative":
            return f"within {t} of the best val loss"
        what = SCALES[self.scale]
        if self.kind == "share":
            return f"at least {t} of {what}"
        return f"at the knee (no doubling of r above it gains more than {t} of {what})"

    def improvement(self, ok: list[RankScore], top: RankScore, base: float | None) -> float:
        """The yardstick a step (up to ``top``) is a share of (see :data:`SCALES`)."""
        if self.scale == "base":
            return base - top.mean
        if self.scale == "loss":
            return abs(top.mean)
        smallest = min(ok, key=lambda s: s.rank)
        return max(0.0, smallest.mean - min(s.mean for s in ok))

    def helps(self, best: RankScore, base: float | None) -> bool:
        """Whether the best rank improves on the base model by more than the noise and the
        floor (relative: its threshold; share and knee: :data:`MIN_GAIN` of the base loss)."""
        if base is None:
            return True
        gain = base - best.mean
        floor = (self.threshold if self.kind == "relative" else MIN_GAIN) * abs(base)
        return gain > floor and (best.n < 2 or gain > t_critical(best.n - 1) * best.se)

    def margin(self, score: RankScore, best: RankScore, ok: list, base: float | None) -> float:
        """How much worse than the best ``score`` may be and count as good (relative, share)."""
        if self.kind == "share":
            return (1 - self.threshold) * max(0.0, self.improvement(ok, best, base))
        return self.threshold * abs(score.mean)

    def as_good(
        self, score: RankScore, best: RankScore, base: float | None = None, ok: list = ()
    ) -> bool:
        """Whether ``score`` is as good as ``best``: within the criterion or the noise.
        knee: the step between the two ranks (the whole span, per doubling) is not steep.
        ``ok``: the curve's completed scores (for the ``range`` scale)."""
        c = self.resolve(base)
        ok = list(ok) or [score, best]
        diff = score.mean - best.mean
        hw = half_width(score, best)
        if c.kind == "knee":
            doublings = abs(math.log2(best.rank / score.rank)) or 1.0
            return not c._steep(diff, hw, doublings, c.improvement(ok, best, base))
        return diff - hw <= c.margin(score, best, ok, base)

    def steep(self, low: RankScore, high: RankScore, base: float, ok: list = ()) -> bool:
        """knee: whether the step up from rank ``low`` to ``high`` gains, per doubling of r,
        more than ``threshold`` of the yardstick at ``high``, beyond the 95% half-width of
        their paired difference."""
        doublings = math.log2(high.rank / low.rank)
        ok = list(ok) or [low, high]
        gain, hw = low.mean - high.mean, half_width(low, high)
        return self._steep(gain, hw, doublings, self.improvement(ok, high, base))

    def _steep(self, gain: float, hw: float, doublings: float, improvement: float):
        """Steep: the gain per doubling clears the bar beyond the half-width ``hw`` (a gain
        within the noise of the bar is not shown to be worth the rank)."""
        return (gain - hw) / doublings > self.threshold * improvement

    # -- the guarantee --------------------------------------------------------------------
    def regret_bar(self, best: RankScore) -> float:
        """How much worse than the best rank the answer may be: g of the best val loss."""
        return self.max_regret * abs(best.mean)

    def within_regret(self, score: RankScore, best: RankScore) -> bool:
        """Whether ``score`` is *shown* within the guarantee of ``best``: its difference plus
        its 95% half-width is at most :meth:`regret_bar`."""
        return score.mean - best.mean + half_width(score, best) <= self.regret_bar(best)

    def _open_regret(self, score: RankScore, best: RankScore) -> bool:
        """The guarantee test the noise leaves open (more seeds may show it either way)."""
        diff, hw = score.mean - best.mean, half_width(score, best)
        return hw > 0 and diff - hw <= self.regret_bar(best) < diff + hw

    def criterion_pick(self, scores: list[RankScore], base: float | None = None):
        """The criterion's own pick, before the guarantee (None: nothing, or no help)."""
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
            steep = [
                hi for lo, hi in zip(upto, upto[1:], strict=False) if c.steep(lo, hi, base, ok)
            ]
            return steep[-1] if steep else upto[0]
        return next(s for s in ok if c.as_good(s, best, base, ok))

    def pick(self, scores: list[RankScore], base: float | None = None) -> RankScore | None:
        """The recommended rank's score, or None (nothing completed, or no help): the
        criterion's pick, raised to the smallest rank at or above it shown within the
        guarantee (the best rank always is)."""
        return self.guaranteed(self.criterion_pick(scores, base), scores)

    def guaranteed(self, first: RankScore | None, scores: list[RankScore]) -> RankScore | None:
        """``first`` (the criterion's pick) raised to the smallest rank at or above it that
        is shown within the guarantee."""
        if first is None:
            return None
        ok = sorted((s for s in scores if s.ok), key=lambda s: s.rank)
        best = min(ok, key=lambda s: (s.mean, s.rank))
        return next((s for s in ok if s.rank >= first.rank and self.within_regret(s, best)), best)

    def settled(self, scores: list[RankScore], base: float | None = None) -> bool:
        """Whether the ranks above the largest one tried can no longer change the pick,
        given that they gain, all together, at most what the last step gained (U).

        The pick is settled when lowering the best by U changes nothing. knee also needs
        the last step not steep (the later, smaller steps are not either).
        """
        c = self.resolve(base)
        ok = sorted((s for s in scores if s.ok), key=lambda s: s.rank)
        if len(ok) < 2:
            return False
        prev, top = ok[-2], ok[-1]
        gain = max(0.0, prev.mean - top.mean)
        # The hypothetical rank above carries the top rank's noise (its trials, its blocks):
        # it has none of its own, and a noise of nothing would read as infinite.
        ahead = dataclasses.replace(
            top, rank=2 * top.rank, mean=top.mean - gain, label=top.noise_key
        )
        if c.kind == "knee" and c.steep(prev, top, base, ok):
            return False
        now = c.pick(ok, base)
        if now is not None and now.rank == top.rank:
            return False  # the step above the answer is not measured yet: climb
        best = min(ok, key=lambda s: (s.mean, s.rank))
        lowered = min(best, ahead, key=lambda s: (s.mean, s.rank))
        if now is not None and not c.within_regret(now, lowered):
            return False  # another gain that size would take the answer past the guarantee
        if c.kind == "knee" and c.scale == "base":
            # The yardstick of a step is fixed by the step itself: only whether LoRA helps
            # at all can change.
            return c.helps(best, base) == c.helps(lowered, base)
        then = c.pick([*ok, ahead], base)
        return getattr(now, "rank", None) == getattr(then, "rank", None)

    def open_questions(self, scores: list[RankScore], base: float | None = None) -> list:
        """The comparisons the pick rests on that the noise leaves open: pairs of ranks
        ``(low, high)`` whose verdict (steep or not; as good or not) would flip within
        :data:`Z` standard errors of their paired difference. More seeds of exactly these
        two ranks settle them (racing)."""
        c = self.resolve(base)
        ok = sorted((s for s in scores if s.ok), key=lambda s: s.rank)
        first = c.criterion_pick(ok, base)
        pick = c.guaranteed(first, ok)
        if pick is None or len(ok) < 2:
            return []
        best = min(ok, key=lambda s: (s.mean, s.rank))
        # The guarantee: a rank between the criterion's pick and the answer that more seeds
        # may show within it (the closest one below the answer).
        held = [s for s in ok if first.rank <= s.rank < pick.rank and c._open_regret(s, best)]
        regret = [(held[-1].rank, best.rank)] if held else []
        if c.kind == "knee":
            upto = [s for s in ok if s.rank <= best.rank]
            steps = [(lo, hi) for lo, hi in zip(upto, upto[1:], strict=False)]
            # The step into the pick and every step above it up to the best decide the knee.
            decisive = [(lo, hi) for lo, hi in steps if hi.rank >= first.rank]
            knee = [(lo.rank, hi.rank) for lo, hi in decisive if c._open_step(lo, hi, base, ok)]
            return _unique(knee + regret)
        below = [s for s in ok if s.rank < first.rank]
        pairs = [(first, best)] + ([(max(below, key=lambda s: s.rank), best)] if below else [])
        found = [(a.rank, b.rank) for a, b in pairs if a.rank != b.rank and c._open(a, b, base, ok)]
        return _unique(found + regret)

    def undecidable(
        self, scores: list[RankScore], pair: tuple[int, int], max_seeds: int, base=None
    ) -> str:
        """Why racing the open comparison ``pair`` to ``max_seeds`` seeds each would most
        likely leave it open ("" if it may settle): its estimate is closer to the bar than
        :data:`Z` standard errors would be at ``max_seeds`` paired seeds (the measured noise,
        shrunk as 1/sqrt(seeds)). Needs the seed noise of both ranks (two seeds each)."""
        c = self.resolve(base)
        ok = sorted((s for s in scores if s.ok), key=lambda s: s.rank)
        by_rank = {s.rank: s for s in ok}
        if pair[0] not in by_rank or pair[1] not in by_rank:
            return ""
        a, b = by_rank[pair[0]], by_rank[pair[1]]
        se = noise(a, b)
        if not se or min(a.n, b.n) < 2 or min(a.n, b.n) >= max_seeds:
            return ""
        bars = []
        if c.kind == "knee":
            bar = c.threshold * c.improvement(ok, b, base) * math.log2(b.rank / a.rank)
            bars.append(max(bar, 0.0))
        else:
            bars.append(c.margin(a, b, ok, base))
        if b.rank == min(ok, key=lambda s: (s.mean, s.rank)).rank:
            bars.append(c.regret_bar(b))  # the guarantee's question about the pair
        distance = min(abs((a.mean - b.mean) - bar) for bar in bars)
        # At max_seeds each: the noise shrinks as 1/sqrt(seeds) and every added seed pair
        # adds a degree of freedom to the pair's own paired estimate.
        df = dof(a, b) + (max_seeds - min(a.n, b.n))
        t = t_critical(df)
        at_max = t * se * math.sqrt(min(a.n, b.n) / max_seeds)
        if distance >= at_max:
            return ""
        return (
            f"r={a.rank} vs r={b.rank} not raced: {distance:.4f} nats from the bar, under "
            f"{t:.3g} SE at {max_seeds} seeds ({at_max:.4f})"
        )

    def _open_step(self, lo: RankScore, hi: RankScore, base, ok) -> bool:
        gain, hw = lo.mean - hi.mean, half_width(lo, hi)
        if not hw:
            return False
        floor = self.threshold * self.improvement(ok, hi, base) * math.log2(hi.rank / lo.rank)
        bar = max(floor, 0.0)
        return gain - hw <= bar < gain + hw

    def _open(self, score: RankScore, best: RankScore, base, ok) -> bool:
        diff, hw = score.mean - best.mean, half_width(score, best)
        if not hw:
            return False
        margin = self.margin(score, best, ok, base)
        return diff - hw <= margin < diff + hw


def _unique(pairs: list) -> list:
    return list(dict.fromkeys(pairs))


def _criterion(value: Criterion | float) -> Criterion:
    """A Criterion; a bare number is the relative criterion's threshold (the old tolerance)."""
    return value if isinstance(value, Criterion) else Criterion("relative", float(value))


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
    noise: dict | None = None  # the curve's noise model (rankwise.core.noise.Noise.to_dict)
    undecided: str = ""  # the comparisons the noise left open, in words ("" when none)
    max_regret: float | None = None  # the guarantee: a share of the best val loss
    regret: float | None = None  # how much worse than the best the answer is, as a share
    regret_bound: float | None = None  # ... at most, with the noise (95%)
    criterion_rank: int | None = None  # the criterion's own pick, before the guarantee


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
    model = next((s.noise for s in ok if s.noise is not None), None)
    common = {
        "base_loss": base_loss,
        "criterion": f"{c.kind} {c.threshold:g}"
        + (f" of {c.scale}" if c.kind != "relative" else ""),
        "noise": model.to_dict() if model else None,
    }
    if not ok:
        why = "no trial completed; nothing to recommend"
        return Recommendation(None, None, None, None, stop_reason, why, **common)
    best = min(ok, key=lambda s: (s.mean, s.rank))
    first = c.criterion_pick(ok, base_loss)
    pick = c.guaranteed(first, ok)
    stopped = f"; stopped: {stop_reason}" if stop_reason else ""
    if pick is None:
        why = _no_help(best, base_loss, c) + stopped
        return Recommendation(
            None, None, best.rank, best.mean, stop_reason, why, lora_helps=False, **common
        )
    why = _reason(pick, best, ok, c, base_loss, params)
    why += f"; {_guarantee(pick, first, best, c)}"
    undecided = _undecided(pick, ok, c, base_loss)
    if undecided:
        why += f"; {undecided}"
    if c is not asked:
        why += (
            f" (no base-model score, so the {asked.kind} criterion fell back to "
            f"relative {_pct(c.threshold)})"
        )
    confidence = _confidence(pick, ok, c, base_loss)
    if undecided and confidence.startswith("high"):
        # A comparison the answer rests on is open: not high, whatever the other side says.
        confidence = (
            "medium" + confidence[len("high") :] + "; a comparison the answer rests on is open"
        )
    return Recommendation(
        pick.rank,
        pick.mean,
        best.rank,
        best.mean,
        stop_reason,
        why + stopped,
        confidence,
        share=improvement_share(pick.mean, base_loss, best.mean),
        lora_helps=None if base_loss is None else True,
        undecided=undecided,
        max_regret=c.max_regret,
        regret=(pick.mean - best.mean) / abs(best.mean) if best.mean else 0.0,
        regret_bound=(pick.mean - best.mean + half_width(pick, best)) / abs(best.mean)
        if best.mean
        else 0.0,
        criterion_rank=first.rank if first else None,
        **common,
    )


def _guarantee(pick: RankScore, first: RankScore, best: RankScore, c: Criterion) -> str:
    """The guarantee in words: how much the answer gives up to the best rank, at most."""
    g = _pct(c.max_regret)
    if pick.rank == best.rank:
        said = f"no rank trained beats r={pick.rank}, so it is within {g} of the best"
    else:
        diff, hw = pick.mean - best.mean, half_width(pick, best)
        said = (
            f"r={pick.rank} gives up {diff / abs(best.mean):.2%} of the val loss to r={best.rank}, "
            f"at most {(diff + hw) / abs(best.mean):.2%} with the noise: within the {g} guarantee"
        )
    if first is not None and first.rank != pick.rank:
        said += f" (r={first.rank}, the criterion's pick, is not shown within {g} of the best)"
    return said


def _undecided(pick: RankScore, ok: list[RankScore], c: Criterion, base) -> str:
    """The open comparisons, in words: which ranks the noise cannot tell apart."""
    pairs = c.open_questions(ok, base)
    if not pairs:
        return ""
    span = [s for s in ok if min(min(p) for p in pairs) <= s.rank <= max(max(p) for p in pairs)]
    worst = max(span, key=lambda s: s.mean)
    best = min(span, key=lambda s: s.mean)
    se = noise(worst, best) or 0.0
    lo, hi = span[0].rank, span[-1].rank
    seeds = "/".join(str(s.n) for s in span)
    gap = worst.mean - best.mean
    if gap <= half_width(worst, best):
        said = (
            f"r={lo} to r={hi} are indistinguishable at this budget (best-to-worst "
            f"{gap:.4f} ± {se:.4f} nats, seeds {seeds})"
        )
    else:  # a real difference, but too close to the criterion's bar to call
        said = (
            f"whether r={lo} to r={hi} differ by enough to matter is within the noise at this "
            f"budget (best-to-worst {gap:.4f} ± {se:.4f} nats, seeds {seeds})"
        )
    if pick.rank == lo:
        return f"{said}: r={lo}, the smallest, is recommended"
    return f"{said}: r={pick.rank} is recommended"


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


def _df_words(df: float) -> str:
    return "many df" if math.isinf(df) or df > 100 else f"{df:.3g} df"


def _confidence(pick: RankScore, ok: list[RankScore], c: Criterion, base) -> str:
    """How sure the answer is, from both sides, and what evidence is missing.

    ``high`` needs the noise behind each side measured on two or more degrees of freedom:
    from one, a sigma is itself a guess (t = 12.7)."""
    model = next((s.noise for s in ok if s.noise is not None), None)
    if (model is None or model.sigma is None) and all(s.n < 2 for s in ok):
        return (
            "unmeasured: one seed per rank, so seed-to-seed noise is unknown (use --max-seeds 2+)"
        )
    best = min(ok, key=lambda s: (s.mean, s.rank))
    below = [s for s in ok if s.rank < pick.rank]
    if not below:
        if pick.rank == best.rank:
            # No rank beats it: judged against the runner-up, on the noise behind that pair.
            rest = [s for s in ok if s.rank != pick.rank]
            if not rest:
                return f"medium: r={pick.rank} is the only rank trained"
            second = min(rest, key=lambda s: (s.mean, s.rank))
            df = evidence_df(pick, second)
            said = (
                f"r={pick.rank} is the best and the smallest rank tried "
                f"(r={second.rank} is next; {_df_words(df)})"
            )
            if df >= 2:
                return f"high for the upper side: {said}"
            return f"medium: {said}; {_more_seeds(pick, second)}"
        df = evidence_df(pick, best)
        level = "high" if df >= 2 else "medium"
        said = (
            f"{level}: r={pick.rank} is the smallest rank tried and is shown within "
            f"{_pct(c.max_regret)} of the best (r={best.rank}; {_df_words(df)})"
        )
        return said + ("" if df >= 2 else f"; {_more_seeds(pick, best)}")
    nxt = max(below, key=lambda s: s.rank)
    hw, df = half_width(nxt, pick), evidence_df(nxt, pick)
    diff = nxt.mean - pick.mean
    t = critical(nxt, pick)
    outside = nxt.mean - best.mean - half_width(nxt, best) > c.regret_bar(best)
    if not c.as_good(nxt, pick, base) or outside:
        shown = f"r={nxt.rank} is worse by {diff:.4f} ({t:.3g} SE = {hw:.4f}; {_df_words(df)})"
        if df >= 2:
            return f"high: {shown}"
        return (
            f"medium: {shown}, a noise measured on one degree of freedom; {_more_seeds(nxt, pick)}"
        )
    if not c.within_regret(nxt, best):
        return (
            f"low: r={nxt.rank} is worse by only {diff:.4f} ({t:.3g} SE = {hw:.4f}; "
            f"{_df_words(df)}), not shown within {_pct(c.max_regret)} of the best; "
            f"{_more_seeds(nxt, pick)}"
        )
    return (
        f"low: r={nxt.rank} is worse by only {diff:.4f}, within the noise ({t:.3g} SE = "
        f"{hw:.4f}, {_df_words(df)}); {_more_seeds(nxt, pick)}"
    )


def _more_seeds(a: RankScore, b: RankScore) -> str:
    """The evidence that would settle ``a`` against ``b``, in words."""
    lo, hi = sorted((a, b), key=lambda s: s.rank)
    if lo.n != hi.n:
        fewer = min((lo, hi), key=lambda s: s.n)
        return f"one more seed of r={fewer.rank} would settle r={lo.rank} vs r={hi.rank}"
    if lo.n == 1:
        return f"a second seed of r={lo.rank} and r={hi.rank} would settle it"
    return f"more seeds of r={lo.rank} and r={hi.rank} ({lo.n} each now) would settle it"
