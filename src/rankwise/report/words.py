"""The recommendation in the words a user reads: one headline, then short evidence lines.

The headline is one sentence with the rank, why, and how sure: what the next rank up would
add and for how many more parameters, what the next rank down loses, and that difference
in standard errors of the paired difference ("4 SE"; "noise unmeasured" with one seed).
Percentages are of the val loss (a task metric: points of it). The evidence lines say the
rest, one fact a line, never a parenthesis inside a parenthesis (:func:`unnest`).

Built from the search core's :class:`~rankwise.core.criteria.Recommendation` and the
per-rank scores only, so a provisional answer and an old recommendation.json read alike.

Example:
    >>> from rankwise.core.criteria import Criterion, recommend
    >>> from rankwise.core.scores import rank_scores
    >>> from rankwise.records import TrialResult
    >>> t = lambda r, v: TrialResult(key=f"r{r}", rank=r, seed=0, status="complete",
    ...                              best_val_loss=v)
    >>> scores = rank_scores([t(4, 3.10), t(8, 3.00), t(16, 2.999)])
    >>> rec = recommend(scores, Criterion("knee", 0.05), base_loss=4.0)
    >>> headline(rec, scores)
    'r=8: r=16 gains 0.033% more for twice the parameters; r=4 is 3.3% worse (noise unmeasured)'
    >>> unnest("answer (at the knee (no doubling gains more than 1%) or the noise)")
    'answer (at the knee, no doubling gains more than 1%, or the noise)'
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from rankwise.config import VLLM_RANKS
from rankwise.core import metrics
from rankwise.core.criteria import Criterion, Recommendation
from rankwise.core.scores import RankScore, noise

__all__ = ["headline", "evidence", "unnest"]

_FLAG = re.compile(r"--[a-z][a-z-]*")


def headline(
    rec: Recommendation,
    scores: list[RankScore],
    metric: str = "loss",
    params: Mapping[int, int] | None = None,
    serve_cap: int | None = None,
    moved: str = "",
) -> str:
    """One sentence: the rank, why, and how sure. ``params``: trainable parameters per
    rank (else the rank ratio); ``serve_cap``: the --serve rank cap; ``moved``: the verdict
    of a stage after the curve that changed the answer."""
    ok = sorted((s for s in scores if s.ok), key=lambda s: s.rank)
    by_rank = {s.rank: s for s in ok}
    if rec.rank is None:
        return _no_rank(rec, by_rank, metric)
    pick = by_rank.get(rec.rank)
    if moved or pick is None:
        why = unnest(moved) or metrics.describe(metric, rec.loss)
        return f"r={rec.rank}: {why}"
    lead = f"r={pick.rank}" + (
        f", {metrics.describe(metric, pick.mean)}" if metric != "loss" else ""
    )
    if rec.undecided and (said := _undecided(rec, pick, ok, metric)):
        return f"{lead}: {said}"
    below = [s for s in ok if s.rank < pick.rank]
    down = below[-1] if below else None
    best = by_rank.get(rec.best_rank)
    above = [s for s in ok if s.rank > pick.rank]
    up = best if best and best.rank > pick.rank else (above[0] if above else None)
    clauses = []
    if up is None:  # nothing above it completed: say why
        lead += f", {_top(pick, scores, serve_cap, alone=down is None)}"
    else:
        clauses.append(_upper(pick, up, metric, params, sure=down is None))
    if down is None and up is not None:
        lead += ", the smallest rank tried"
    elif down is not None:
        clauses.append(_lower(pick, down, metric))
    return f"{lead}: {'; '.join(clauses)}" if clauses else lead


def _upper(pick, up, metric, params, sure: bool) -> str:
    """What the rank above the pick would add (the best rank, when it is above)."""
    gain = pick.mean - up.mean
    if gain <= 0:
        said = f"r={up.rank} is no better"
    else:
        more = _ratio(pick.rank, up.rank, params)
        said = (
            f"r={up.rank} gains {_amount(gain, pick.mean, metric)} more for {more} the parameters"
        )
    return said + (f" ({_sure(pick, up)})" if sure else "")


def _top(pick, scores, cap, alone: bool) -> str:
    """Why no rank above the pick completed: a budget, memory, the serving cap, the list."""
    above = [s for s in scores if not s.ok and s.rank > pick.rank]
    blocked = min(above, key=lambda s: s.rank, default=None)
    if blocked is not None:
        if "memory" in blocked.reason and blocked.status != "skipped":
            return f"the largest rank that fits in memory: r={blocked.rank} ran out"
        flag = _FLAG.search(blocked.reason)
        if flag:
            return f"the largest rank within {flag.group()}"
        return f"the largest rank that completed: r={blocked.rank} {blocked.status}"
    bigger = [r for r in VLLM_RANKS if r > pick.rank]
    if cap is not None and (not bigger or bigger[0] > cap):
        return f"the largest rank vLLM serves at --max-lora-rank {cap}"
    return "the only rank that completed" if alone else "the largest rank tried"


def _lower(pick: RankScore, down: RankScore, metric: str) -> str:
    diff = down.mean - pick.mean
    word = "worse" if diff > 0 else "better"
    return f"r={down.rank} is {_amount(diff, pick.mean, metric)} {word} ({_sure(pick, down)})"


def _undecided(rec, pick, ok, metric) -> str:
    """The comparisons the noise left open, from the span the core named ("" if none)."""
    found = re.search(r"r=(\d+) to r=(\d+)", rec.undecided)
    if not found:
        return ""
    lo, hi = int(found.group(1)), int(found.group(2))
    span = [s for s in ok if lo <= s.rank <= hi]
    if len(span) < 2:
        return ""
    worst, best = max(span, key=lambda s: s.mean), min(span, key=lambda s: s.mean)
    names = f"r={lo} and r={hi}" if len(span) == 2 else f"r={lo} to r={hi}"
    apart = f"{_amount(worst.mean - best.mean, best.mean, metric)} apart ({_sure(worst, best)})"
    raised = rec.criterion_rank not in (None, rec.rank)
    taken = (
        f"the {'smaller' if len(span) == 2 else 'smallest'} is recommended"
        if pick.rank == lo
        else f"r={pick.rank} is recommended, the smallest shown within "
        f"{_pct(rec.max_regret)} of the best"
        if raised
        else f"r={pick.rank} is recommended"
    )
    if "indistinguishable" in rec.undecided:
        return f"{names} are indistinguishable at this budget, {apart}; {taken}"
    return f"whether {names} differ by enough to matter is within the noise, {apart}; {taken}"


def _no_rank(rec: Recommendation, by_rank: dict, metric: str) -> str:
    best = by_rank.get(rec.best_rank)
    if not by_rank:
        stopped = f"; {rec.stop_reason}" if rec.stop_reason else ""
        return f"No rank: no trial completed; nothing to recommend{stopped}"
    if rec.lora_helps is False and best is not None and rec.base_loss is not None:
        gain = rec.base_loss - best.mean
        word = "gains only" if gain >= 0 else "loses"
        sure = f"{_z(gain, best.se)} SE" if best.n > 1 and best.se else "noise unmeasured"
        return (
            "No rank: LoRA does not help this data at this budget; the best, "
            f"r={best.rank}, {word} {_amount(gain, rec.base_loss, metric)} over the base model "
            f"({sure})"
        )
    return f"No rank: {unnest(rec.reason.split('; ')[0])}"


def _sure(a: RankScore, b: RankScore) -> str:
    """The difference of ``a`` and ``b`` in standard errors of their paired difference."""
    se = noise(a, b)
    if se is None:
        return "noise unmeasured"
    return f"{_z(a.mean - b.mean, se)} SE" if se > 0 else "no noise between them"


def _z(diff: float, se: float) -> str:
    z = abs(diff) / se
    return f"{z:.0f}" if z >= 3 else f"{z:.1f}"


def _amount(diff: float, ref: float, metric: str) -> str:
    """A difference of two scores: a percentage of the loss, or points of the metric."""
    if metric != "loss":
        return f"{_digits(abs(diff) * 100)} points"
    return f"{_digits(abs(diff) / abs(ref) * 100)}%" if ref else f"{abs(diff):.4f}"


def _digits(x: float) -> str:
    """Two significant digits, never in scientific notation: 0.2, 1.8, 12, 140."""
    if x >= 10:
        return f"{x:.0f}"
    if x == 0:
        return "0"
    return f"{x:.{max(1, 1 - math.floor(math.log10(x)))}f}".rstrip("0").rstrip(".")


def _ratio(low: int, high: int, params: Mapping[int, int] | None) -> str:
    if params and params.get(low) and params.get(high):
        k = params[high] / params[low]
    else:
        k = high / low
    return "twice" if math.isclose(k, 2, rel_tol=0.01) else f"{k:.3g}x"


# -- the evidence ----------------------------------------------------------------------------
def evidence(
    rec: Recommendation,
    scores: list[RankScore],
    criterion: Criterion,
    metric: str = "loss",
    params: Mapping[int, int] | None = None,
    more: list[str] = (),
    serve_cap: int | None = None,
) -> list[str]:
    """The headline's grounds, one short line each: the criterion, the scores, the ranks
    above the answer that did not complete, how sure, what stayed open, ``more``
    (forgetting), why the search stopped, the noise."""
    c = criterion.resolve(rec.base_loss)
    lines = [f"criterion: {unnest(c.describe())}"]
    if c is not criterion:
        lines.append(
            f"no base-model score, so the {criterion.kind} criterion fell back to "
            f"relative {_pct(c.threshold)}"
        )
    lines += _scores_lines(rec, scores, metric, params)
    lines += _guarantee_lines(rec)
    lines += [
        unnest(f"r={s.rank} {s.status}: {s.reason}" if s.reason else f"r={s.rank} {s.status}")
        for s in scores
        if not s.ok and (rec.rank is None or s.rank > rec.rank)
    ]
    if serve_cap is not None:
        lines.append(f"--serve: only ranks vLLM loads up to --max-lora-rank {serve_cap} were tried")
    if rec.confidence:
        lines.append(f"confidence: {unnest(rec.confidence)}")
    if rec.undecided:
        lines.append(unnest(rec.undecided))
    lines += [unnest(m) for m in more if m]
    parts = [p for p in _top_level_split(rec.stop_reason) if p]
    lines += [unnest(("stopped: " if i == 0 else "") + p) for i, p in enumerate(parts)]
    if (said := _noise_line(rec.noise, metric)) is not None:
        lines.append(said)
    return lines


def _scores_lines(rec, scores, metric, params) -> list[str]:
    by_rank = {s.rank: s for s in scores if s.ok}
    pick, best = by_rank.get(rec.rank), by_rank.get(rec.best_rank)
    lines = []
    said = []
    if pick is not None:
        said.append(
            f"r={pick.rank} {_value(pick, metric)}" + (", the best" if pick is best else "")
        )
    if best is not None and best is not pick:
        said.append(f"best r={best.rank} {_value(best, metric)}")
    if rec.base_loss is not None:
        said.append(f"base model {metrics.shown(metric, rec.base_loss):.4f}")
    if said:
        lines.append(f"{metrics.label(metric)}: " + "; ".join(said))
    if pick is not None and best is not None and best.rank != pick.rank and rec.share is not None:
        fewer = _ratio(pick.rank, best.rank, params).replace("twice", "2x")
        lines.append(
            f"r={pick.rank} reaches {math.floor(rec.share * 1000) / 10:g}% of r={best.rank}'s "
            f"improvement over the base model, with {fewer} fewer trainable parameters"
        )
    return lines


def _guarantee_lines(rec: Recommendation) -> list[str]:
    """--max-regret: what the answer may lose to the best rank trained."""
    g, bound, first = rec.max_regret, rec.regret_bound, rec.criterion_rank
    if g is None or rec.rank is None:
        return []
    lines = []
    if first is not None and first != rec.rank:
        lines.append(
            f"r={first}, the criterion's pick, is not shown within {_pct(g)} of the best: "
            f"the guarantee raised the answer to r={rec.rank}"
        )
    if bound is not None and rec.rank != rec.best_rank:
        lines.append(
            f"guarantee: r={rec.rank} loses at most {bound:.2%} of the val loss to "
            f"r={rec.best_rank}, within --max-regret {_pct(g)}"
        )
    return lines


def _pct(x: float) -> str:
    return f"{round(x * 100, 2):g}%"


def _value(s: RankScore, metric: str) -> str:
    spread = f" ± {s.se:.4f}" if s.n > 1 else ""
    return f"{metrics.shown(metric, s.mean):.4f}{spread}"


def _noise_line(model: dict | None, metric: str) -> str | None:
    if not isinstance(model, dict):
        return None
    if model.get("sigma") is None:
        return "noise: seed to seed not measured, one seed per rank; --max-seeds 2+ measures it"
    how = "paired by seed" if model.get("source") == "paired" else "spread of one rank"
    unit = " nats" if metric == "loss" else ""
    return f"noise: {model['sigma']:.4f}{unit} per trial seed to seed, {how}, {model.get('df')} df"


def _top_level_split(text: str) -> list[str]:
    """``text`` split at the "; " that stand outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and text.startswith("; ", i):
            parts.append(text[start:i])
            start = i + 2
    return [*parts, text[start:]] if text else []


def unnest(text: str) -> str:
    """``text`` with no parenthesis inside another: an inner one becomes commas."""
    out, depth = [], 0
    for ch in text:
        if ch == "(":
            depth += 1
            out.append("(" if depth == 1 else "\0")
        elif ch == ")" and depth > 0:
            out.append(")" if depth == 1 else "\0")
            depth -= 1
        else:
            out.append(ch)
    s = re.sub(r"(\s*\0\s*)+", ", ", "".join(out))
    return re.sub(r", ([);:.]|$)", r"\1", s)
