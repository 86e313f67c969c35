"""The answer over the training budget: the recommendation recomputed at every evaluation
step from the stored validation curves (free: no training).

Each trial's score at step t is its best validation loss up to t, as if training had stopped
there; the criterion then picks a rank at every t. An answer that still moved in the last
quarter of the steps says the budget decides the rank: a longer fine-tune may want another.

Example (r=4 catches up with r=8 late in training):
    >>> from rankwise.records import TrialResult
    >>> from rankwise.core.criteria import Criterion
    >>> curves = {2: [(10, 3.3), (20, 3.2), (40, 3.15)], 4: [(10, 3.2), (20, 3.1), (40, 3.0)],
    ...           8: [(10, 3.1), (20, 3.05), (40, 2.999)]}
    >>> trials = [TrialResult(key=f"r{r}", rank=r, seed=0, status="complete",
    ...                       best_val_loss=min(v for _, v in c), val_curve=c)
    ...           for r, c in curves.items()]
    >>> by_step = answer_by_step(trials, Criterion("knee", 0.01), base=4.0)
    >>> [(a["step"], a["rank"]) for a in by_step]
    [(10, 8), (20, 8), (40, 4)]
    >>> moved(by_step)
    'the answer moved r=8 → r=4 over the last 20 steps; a longer fine-tune may need a smaller rank'
"""

from __future__ import annotations

from rankwise.core.criteria import Criterion
from rankwise.core.scores import rank_scores
from rankwise.records import TrialResult

__all__ = ["answer_by_step", "moved"]


def answer_by_step(results: list[TrialResult], criterion: Criterion, base: float | None):
    """``[{"step": t, "rank": r or None}, ...]`` at every evaluation step of the trials."""
    steps = sorted({s for r in results if r.ok for s, _ in r.val_curve if s > 0})
    out = []
    for t in steps:
        upto = [_at(r, t) for r in results if r.ok]
        pick = criterion.pick(rank_scores([r for r in upto if r is not None]), base)
        out.append({"step": t, "rank": pick.rank if pick else None})
    return out


def _at(r: TrialResult, step: int) -> TrialResult | None:
    """``r`` as if it had stopped at ``step``: its best validation loss so far."""
    if r.extra.get("stopped_early") and r.val_curve and step > r.val_curve[-1][0]:
        return r.replace(val_blocks=[])  # past its stop: the final loss it was told as
    seen = [v for s, v in r.val_curve if s <= step and v == v]  # v == v: not NaN
    if not seen:
        return None
    return r.replace(best_val_loss=min(seen), val_blocks=[])


def moved(by_step: list[dict]) -> str | None:
    """A warning when the answer changed in the last quarter of the steps (else None)."""
    if len(by_step) < 2:
        return None
    last, final = by_step[-1]["step"], by_step[-1]["rank"]
    quarter = last - last / 4
    changes = [(a, b) for a, b in zip(by_step, by_step[1:], strict=False) if a["rank"] != b["rank"]]
    late = [(a, b) for a, b in changes if b["step"] > quarter]
    if not late or final is None:
        return None
    start = next(a for a in reversed(by_step) if a["step"] <= late[0][0]["step"])
    before = start["rank"]
    if before is None:
        return None
    way = "smaller" if final < before else "larger"
    return (
        f"the answer moved r={before} → r={final} over the last {last - start['step']} steps; "
        f"a longer fine-tune may need a {way} rank"
    )
