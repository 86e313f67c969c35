"""Read a trial's curves: did it overfit, stop while still improving, go unstable, or converge?

Each verdict comes with the numbers that justify it, so a user can check it against
the curves. No torch: this reads :class:`~rankwise.records.TrialResult` records only.

Labels, checked in this order (the first that applies wins):

- ``n/a``: the trial was skipped or failed for a reason other than instability (out of
  memory, an exception), or its curves cannot be read (no, or only one, evaluation).
  The evidence says why; there is no advice about training.
- ``unstable``: a non-finite loss (the trial failed ``unstable: ...``, or a curve holds
  NaN/inf); a training-loss spike (a value more than ``spike_factor`` x the median of the
  previous ``spike_window`` values, after ``spike_warmup`` steps, and at least
  ``spike_min_rise`` nats above it); a validation jump of ``val_jump`` or more between
  consecutive evaluations while the training loss did not fall; or a validation rise of
  ``overfit_rise`` above its minimum while the training loss did not fall either
  (that is divergence, not overfitting). Advice: lower the learning rate.
- ``overfitting``: the last validation loss is ``overfit_rise`` (relative) or more above
  its minimum while the training loss fell over the same span. The trial's score is
  already its best checkpoint. Advice: lower the rank or raise dropout (Qwen#785: train
  loss falling while val loss rises at r=1 was answered "raise r" — the opposite).
- ``still improving``: the last evaluation is the minimum and improved by ``improving``
  (relative) or more on the one before. Advice: train longer.
- ``converged``: none of the above.

Example:
    >>> from rankwise.records import TrialResult
    >>> r = TrialResult(key="r8", rank=8, seed=0, status="complete",
    ...                 train_curve=[(s, 3.0 - 0.01 * s) for s in range(1, 101)],
    ...                 val_curve=[(25, 2.9), (50, 2.8), (75, 2.85), (100, 2.95)])
    >>> diagnose(r).label
    'overfitting'
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any

from rankwise.core.metrics import label, shown
from rankwise.core.scores import rank_scores
from rankwise.records import COMPLETE, FAILED, TrialResult

__all__ = [
    "Diagnosis",
    "Thresholds",
    "diagnose",
    "diagnose_search",
    "OVERFITTING",
    "STILL_IMPROVING",
    "UNSTABLE",
    "CONVERGED",
    "NOT_DIAGNOSED",
]

OVERFITTING = "overfitting"
STILL_IMPROVING = "still improving"
UNSTABLE = "unstable"
CONVERGED = "converged"
NOT_DIAGNOSED = "n/a"

ADVICE = {
    OVERFITTING: "lower the rank or raise dropout (--dropout)",
    STILL_IMPROVING: "train longer (raise --max-steps)",
    UNSTABLE: "lower the learning rate (--lr)",
    CONVERGED: "",
    NOT_DIAGNOSED: "",
}


@dataclass(frozen=True)
class Thresholds:
    """When a curve counts as overfitting, still improving or unstable."""

    overfit_rise: float = 0.02
    """Relative rise of the last val loss above its minimum that counts as overfitting. 2%
    is twice the search's default tolerance (1%): a rise that size changes a rank's verdict."""
    improving: float = 0.002
    """Relative drop of val loss at the last evaluation, over the one before, that counts as
    still improving. The val set is fixed, so any drop is a real change of the weights, not
    sampling noise; 0.2% per interval, kept up for a few more intervals, would move a rank by
    the search's 1% tolerance. (The linear decay to 0 makes the last interval the slowest.)"""
    spike_factor: float = 2.0
    """A training loss above this multiple of the running median is a spike."""
    spike_window: int = 20
    """Steps in the running median a training loss is compared with."""
    spike_warmup: int = 10
    """Steps before spikes are looked for (the loss falls fastest, and most noisily, here)."""
    spike_min_rise: float = 0.25
    """Nats a spike must rise above the running median, so that the noise of a memorised
    loss near 0 (0.05 -> 0.12 is 2.4x) is not taken for a spike."""
    val_jump: float = 0.20
    """Relative rise of val loss between consecutive evaluations that counts as a jump."""

    def __post_init__(self):
        for name in ("overfit_rise", "improving", "spike_min_rise", "val_jump"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
        if not self.spike_factor > 1:
            raise ValueError(f"spike_factor: expected a number > 1, got {self.spike_factor!r}")
        for name in ("spike_window", "spike_warmup"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class Diagnosis:
    """A verdict on one trial: its label, what to do, and the numbers behind it."""

    label: str
    advice: str
    evidence: str
    numbers: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _g(x: float) -> str:
    return format(x, ".4g")


def _pct(x: float) -> str:
    text = f"{x:+.2%}" if abs(x) < 0.01 else f"{x:+.1%}"  # keep small changes visible
    return text.replace("-", "−")


def _verdict(label: str, evidence: str, **numbers) -> Diagnosis:
    return Diagnosis(label, ADVICE[label], evidence, numbers)


# -- reading one curve -------------------------------------------------------------------
def _train_at(train: list[tuple[int, float]], step: int, window: int) -> float | None:
    """Mean training loss over the ``window`` steps ending at ``step`` (one step is noisy)."""
    values = [v for s, v in train if step - window < s <= step]
    if not values:  # e.g. an evaluation at step 0: the first losses describe the same weights
        values = [v for _, v in train[:window]]
    return sum(values) / len(values) if values else None


def _eval_window(val: list[tuple[int, float]]) -> int:
    gaps = [b[0] - a[0] for a, b in zip(val, val[1:], strict=False)]
    return max(1, int(statistics.median(gaps))) if gaps else max(1, val[0][0])


def _non_finite(result: TrialResult) -> Diagnosis | None:
    for name, curve in (("train", result.train_curve), ("val", result.val_curve)):
        bad = [(s, v) for s, v in curve if not math.isfinite(v)]
        if bad:
            step, value = bad[0]
            return _verdict(
                UNSTABLE,
                f"non-finite {name} loss ({value}) at step {step}"
                f" ({len(bad)} of {len(curve)} points)",
                kind="non-finite",
                curve=name,
                step=step,
                count=len(bad),
            )
    return None


def _train_spike(train: list[tuple[int, float]], t: Thresholds) -> Diagnosis | None:
    spikes = []
    for i, (step, value) in enumerate(train):
        if step <= t.spike_warmup or i == 0:
            continue
        median = statistics.median(v for _, v in train[max(0, i - t.spike_window) : i])
        if value > t.spike_factor * median and value - median >= t.spike_min_rise:
            spikes.append((value / median, step, value, median))
    if not spikes:
        return None
    ratio, step, value, median = max(spikes)
    return _verdict(
        UNSTABLE,
        f"train loss spiked to {_g(value)} at step {step}, {ratio:.1f}x the running median"
        f" {_g(median)} ({len(spikes)} spike{'s' * (len(spikes) > 1)} after step {t.spike_warmup})",
        kind="train spike",
        step=step,
        value=value,
        median=median,
        ratio=ratio,
        count=len(spikes),
    )


def _val_jump(result: TrialResult, window: int, t: Thresholds) -> Diagnosis | None:
    val, train = result.val_curve, result.train_curve
    for (s0, v0), (s1, v1) in zip(val, val[1:], strict=False):
        jump = (v1 - v0) / v0
        t0, t1 = _train_at(train, s0, window), _train_at(train, s1, window)
        train_fell = t0 is not None and t1 is not None and t1 < t0
        # A jump while the train loss falls is fast overfitting, judged by its own rule.
        if jump >= t.val_jump and not train_fell:
            return _verdict(
                UNSTABLE,
                f"val loss jumped {_g(v0)} → {_g(v1)} ({_pct(jump)}) between steps {s0} and"
                f" {s1} while train loss did not fall",
                kind="val jump",
                step=s1,
                val_before=v0,
                val_after=v1,
                jump=jump,
            )
    return None


def _rise(result: TrialResult, window: int, t: Thresholds) -> Diagnosis | None:
    """Overfitting (val up, train down), or divergence (val up, train not down)."""
    val, train = result.val_curve, result.train_curve
    s_min, v_min = min(val, key=lambda p: (p[1], p[0]))
    s_end, v_end = val[-1]
    rise = (v_end - v_min) / v_min
    if rise < t.overfit_rise:
        return None
    t_min, t_end = _train_at(train, s_min, window), _train_at(train, s_end, window)
    span = f"val loss {_g(v_end)} at step {s_end} vs min {_g(v_min)} at step {s_min} ({_pct(rise)})"
    numbers = dict(val_min=v_min, val_min_step=s_min, val_final=v_end, val_final_step=s_end)
    numbers["val_rise"] = rise
    if t_min is None or t_end is None:
        return _verdict(UNSTABLE, f"{span}; no train loss recorded", kind="val rise", **numbers)
    change = (t_end - t_min) / t_min
    numbers.update(train_at_min=t_min, train_final=t_end, train_change=change)
    trend = (
        f"train loss {_g(t_min)} → {_g(t_end)} over the same span ({_pct(change)};"
        f" means of the {window} steps up to each evaluation)"
    )
    if change >= 0:
        return _verdict(UNSTABLE, f"{span} while {trend}: diverging", kind="val rise", **numbers)
    gap = v_end - t_end
    return _verdict(
        OVERFITTING,
        f"{span}; {trend}; final val − train gap {_g(gap)}; the score is the best checkpoint"
        f" (step {s_min})",
        gap=gap,
        **numbers,
    )


def _last_interval(result: TrialResult, window: int, t: Thresholds) -> Diagnosis:
    val = result.val_curve
    (s_prev, v_prev), (s_end, v_end) = val[-2], val[-1]
    gain = (v_prev - v_end) / v_prev
    t_end = _train_at(result.train_curve, s_end, window)
    numbers = dict(val_prev=v_prev, val_prev_step=s_prev, val_final=v_end, val_final_step=s_end)
    numbers.update(val_gain=gain, train_final=t_end, val_min=min(v for _, v in val))
    is_min = v_end <= numbers["val_min"]
    last = f"val loss {_g(v_prev)} at step {s_prev} → {_g(v_end)} at step {s_end} ({_pct(-gain)})"
    if is_min and gain >= t.improving:
        d = _verdict(STILL_IMPROVING, f"{last}: still falling at the last evaluation", **numbers)
        if result.time_limited:
            d = dataclasses.replace(
                d, advice=d.advice + " or the time limit (--max-trial-time), which stopped it"
            )
        return d
    best = min(val, key=lambda p: (p[1], p[0]))
    why = f"min {_g(best[1])} at step {best[0]}; {last}: a drop under {t.improving:.1%}"
    if not is_min:
        why = f"min {_g(best[1])} at step {best[0]}; {last}, within {t.overfit_rise:.0%} of it"
    return _verdict(CONVERGED, why, **numbers)


def diagnose(result: TrialResult, **thresholds) -> Diagnosis:
    """Label one trial from its curves (see the module docstring); thresholds: :class:`Thresholds`."""
    t = Thresholds(**thresholds)
    if result.val_loss_curve:
        # Scored by a metric (rankwise.core.metrics): the curves are judged on the validation loss,
        # which moves smoothly and compares with the training loss; an error rate moves in
        # steps of one example (a sixth mistake after five is a 20% "jump").
        result = result.replace(val_curve=result.val_loss_curve)
    if result.status == FAILED and result.reason.startswith("unstable"):
        return _verdict(
            UNSTABLE,
            f"{result.reason} (best val {result.best_val_loss} at step {result.best_step})",
            kind="non-finite",
            reason=result.reason,
            best_val_loss=result.best_val_loss,
            best_step=result.best_step,
        )
    if result.status != COMPLETE:
        reason = f"{result.status}: {result.reason}" if result.reason else result.status
        return _verdict(NOT_DIAGNOSED, f"not diagnosed ({reason})", status=result.status)
    found = _non_finite(result) or _train_spike(result.train_curve, t)
    if found:
        return found
    if (cut := result.extra.get("stopped_early")) is not None:
        # Cut short on purpose (--stop-when-decided): its curve says nothing about capacity.
        return _verdict(
            NOT_DIAGNOSED,
            f"stopped at step {cut.get('step')} of {cut.get('max_steps')}: it could not change "
            "the answer; its score is the predicted final val loss",
            stopped_early=cut,
        )
    if len(result.val_curve) < 2:
        n = len(result.val_curve)
        return _verdict(
            NOT_DIAGNOSED,
            f"{n} evaluation{'s' * (n != 1)}: a curve needs two (lower --eval-every)",
            evaluations=n,
        )
    window = _eval_window(result.val_curve)
    return (
        _val_jump(result, window, t)
        or _rise(result, window, t)
        or _last_interval(result, window, t)
    )


# -- across a search ---------------------------------------------------------------------
def _ranks(ranks: list[int]) -> str:
    names = [f"r={r}" for r in sorted(set(ranks))]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _spread(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.1%}" if f"{lo:.1%}" == f"{hi:.1%}" else f"{lo:.1%}–{hi:.1%}"


def _tail_change(train: list[tuple[int, float]], tail: float) -> float | None:
    """Relative change of the mean train loss, last ``tail`` of the steps vs the stretch before."""
    n = max(1, int(len(train) * tail))
    if len(train) < 2 * n:
        return None
    before = sum(v for _, v in train[-2 * n : -n]) / n
    after = sum(v for _, v in train[-n:]) / n
    return (after - before) / before


def _capacity(results, diagnoses, rank_gain, plateau, tail) -> dict[str, Any] | None:
    """Is the largest rank short of capacity? Precisely, all of:

    - it is the best rank and beats the next smaller one by ``rank_gain`` or more;
    - at that rank, every trial converged (not overfitting, unstable or still improving);
    - its train loss is flat: the mean over the last ``tail`` of the steps fell less than
      ``plateau`` against the stretch before, so more steps would not help;
    - its train loss is high: not below the best val loss by more than ``plateau``, so the
      adapter fits its own training data no better than held-out data (not memorising).

    Ranks are compared by their score (the loss, or a metric's error); train and val are
    compared as losses.
    """
    scores = [s for s in rank_scores(results) if s.ok]
    if len(scores) < 2 or scores[-2].mean <= 0:
        return None
    prev, top = scores[-2], scores[-1]
    gain = (prev.mean - top.mean) / prev.mean
    trials = [(r, d) for r, d in zip(results, diagnoses, strict=True) if r.rank == top.rank]
    if gain < rank_gain or any(d.label != CONVERGED for r, d in trials if r.ok):
        return None
    changes = [_tail_change(r.train_curve, tail) for r, _ in trials if r.ok]
    finals = [r.final_train_loss for r, _ in trials if r.ok]
    if not changes or None in changes or None in finals:
        return None
    change, final = max(changes), sum(finals) / len(finals)
    val_losses = [_best_val_loss(r) for r, _ in trials if r.ok]
    val_loss = sum(val_losses) / len(val_losses)
    if change < -plateau or final < val_loss * (1 - plateau):
        return None
    metric = trials[0][0].metric
    return {
        "rank": top.rank,
        "next_rank": prev.rank,
        "rank_gain": gain,
        "train_final": final,
        "train_tail_change": change,
        "val": top.mean,
        "evidence": (
            f"r={top.rank} still {_beats(metric)} r={prev.rank} by {gain:.1%}"
            f" ({_score(metric, top.mean)} vs {_g(shown(metric, prev.mean))}) and its train loss"
            f" has flattened at {_g(final)}"
            f" ({_pct(change)} over the last {tail:.0%} of steps), no lower than its val loss"
        ),
    }


def _best_val_loss(r: TrialResult) -> float:
    """The lowest finite validation loss of a trial (its score, when scored by loss)."""
    values = [v for _, v in (r.val_loss_curve or r.val_curve) if math.isfinite(v)]
    return min(values) if values else r.best_val_loss


def _beats(metric: str) -> str:
    return "beats" if metric == "loss" else "cuts the error of"


def _score(metric: str, value: float) -> str:
    return f"{'val' if metric == 'loss' else label(metric)} {_g(shown(metric, value))}"


def diagnose_search(
    results: list[TrialResult],
    *,
    rank_gain: float = 0.01,
    plateau: float = 0.01,
    tail: float = 0.25,
    **thresholds,
) -> dict[str, Any]:
    """Summarise the diagnoses of a search's trials across ranks.

    Returns ``counts`` (trials per label), ``trials`` (each trial's key, rank, seed and
    diagnosis), ``overfit_ranks`` / ``improving_ranks`` / ``unstable_ranks`` (a rank is
    listed when any of its seeds got that label), ``smallest_rank`` / ``largest_rank`` and
    whether each ``..._underfits`` (still improving, or for the largest, short of capacity),
    ``raise_rank`` (the evidence dict of :func:`_capacity`'s rule, or None) and ``advice``,
    one paragraph. ``rank_gain`` defaults to the search's default tolerance (1%).
    """
    diagnoses = [diagnose(r, **thresholds) for r in results]
    counts: dict[str, int] = {}
    by_label: dict[str, list[tuple[TrialResult, Diagnosis]]] = {}
    for r, d in zip(results, diagnoses, strict=True):
        counts[d.label] = counts.get(d.label, 0) + 1
        by_label.setdefault(d.label, []).append((r, d))
    ranks = sorted({r.rank for r in results})
    raise_rank = _capacity(results, diagnoses, rank_gain, plateau, tail)

    def ranks_with(label: str) -> list[int]:
        return sorted({r.rank for r, _ in by_label.get(label, [])})

    improving = ranks_with(STILL_IMPROVING)
    return {
        "counts": counts,
        "trials": [
            {"key": r.key, "rank": r.rank, "seed": r.seed, **d.to_dict()}
            for r, d in zip(results, diagnoses, strict=True)
        ],
        "overfit_ranks": ranks_with(OVERFITTING),
        "improving_ranks": improving,
        "unstable_ranks": ranks_with(UNSTABLE),
        "smallest_rank": ranks[0] if ranks else None,
        "largest_rank": ranks[-1] if ranks else None,
        "smallest_underfits": bool(ranks) and ranks[0] in improving,
        "largest_underfits": bool(ranks) and (ranks[-1] in improving or raise_rank is not None),
        "raise_rank": raise_rank,
        "advice": _advice(by_label, raise_rank, len(results)),
    }


def _advice(by_label, raise_rank, n_trials: int) -> str:
    sentences = []
    if by_label.get(UNSTABLE):
        trials = by_label[UNSTABLE]
        first = trials[0][1].evidence
        sentences.append(
            f"{_ranks([r.rank for r, _ in trials])} {'was' if len(trials) == 1 else 'were'}"
            f" unstable ({first}): {ADVICE[UNSTABLE]}."
        )
    if by_label.get(OVERFITTING):
        trials = by_label[OVERFITTING]
        rises = [d.numbers["val_rise"] for _, d in trials]
        falls = [-d.numbers["train_change"] for _, d in trials]
        sentences.append(
            f"{_ranks([r.rank for r, _ in trials])} overfit (val rose {_spread(rises)} above"
            f" its minimum while train loss fell {_spread(falls)}): {ADVICE[OVERFITTING]};"
            " their scores are their best checkpoints."
        )
    if by_label.get(STILL_IMPROVING):
        trials = by_label[STILL_IMPROVING]
        gains = [d.numbers["val_gain"] for _, d in trials]
        sentences.append(
            f"{_ranks([r.rank for r, _ in trials])} {'was' if len(trials) == 1 else 'were'}"
            f" still improving at the last evaluation (val fell {_spread(gains)} over the last"
            f" interval): {ADVICE[STILL_IMPROVING]}; the rank comparison may shift."
        )
    if raise_rank:
        sentences.append(
            f"{raise_rank['evidence']}: raise the rank (try r={2 * raise_rank['rank']})."
        )
    if by_label.get(NOT_DIAGNOSED):
        trials = by_label[NOT_DIAGNOSED]
        sentences.append("; ".join(f"r={r.rank}: {d.evidence}" for r, d in trials) + ".")
    if not n_trials:
        return "No trials to diagnose."
    if len(by_label.get(CONVERGED, [])) == n_trials:
        stands = "" if sentences else ": the rank comparison stands"
        sentences.insert(0, f"All {n_trials} trials converged{stands}.")
    return " ".join(sentences)
