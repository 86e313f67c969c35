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
default threshold, and the reason says so. With several seeds per rank a difference
counts only beyond :data:`Z` standard errors as well. The recommendation is the smallest
rank that is as good as the best (for ``knee``: the knee), or none when no rank improves
on the base model by more than the noise and the criterion's floor: then LoRA does not help
this data at this budget, and the recommendation says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rankwise.errors import ConfigError
from rankwise.records import COMPLETE
from rankwise.search.scores import RankScore, Z, improvement_share, noise

# share and knee: an improvement over the base model below this share of the base loss
# (0.1%) is not a reason to train an adapter, whatever share of it a rank reaches.
MIN_GAIN = 0.001


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
